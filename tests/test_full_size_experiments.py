"""Every experiment file of a released recipe builds, on the meta device, the released architecture:
parameter names and shapes equal the official `full_size_keys.json` (through each model's official
key mapping), and parameter counts equal the official ones and the README's experiments table.

Pretrained parts (the TokenFlow towers, the FlexTok VAE) are replaced by their architectures with
random weights, so nothing is read or downloaded; their names and shapes are what is compared."""

import functools
import json
import re

import hydra
import pytest
import torch
from helpers import EXPERIMENTS, REPO_ROOT, compose_train, reference_path
from omegaconf import OmegaConf, open_dict

from tokenizers_vis.config import prepare_config
from tokenizers_vis.models.divot_official import official_state_dicts as divot_official_state_dicts
from tokenizers_vis.models.flextok_official import OFFICIAL_VAE_CONFIG, convert_state_dict
from tokenizers_vis.models.layton_official import SDXL_UNET_CONFIG, SDXL_VAE_CONFIG
from tokenizers_vis.models.layton_official import official_state_dict as layton_official_state_dict
from tokenizers_vis.models.seed_official import official_state_dict as seed_official_state_dict
from tokenizers_vis.models.titok_official import official_state_dict as titok_official_state_dict
from tokenizers_vis.models.tokenflow_official import CLIP_B16, SIGLIP_SO400M
from tokenizers_vis.models.tokenflow_official import official_state_dict as tokenflow_official_state_dict

# experiment -> (reference folder, its official entry in full_size_keys.json); None: a recipe of ours
# with no released checkpoint, pinned by the README's count only.
RELEASED = {
    "titok_s128": ("titok", "titok_s128"),
    "titok_b64": ("titok", "titok_b64"),
    "titok_l32": ("titok", "titok_l32"),
    "titok_bl64_vq8k": ("titok", "titok_bl64_vq8k"),
    "titok_bl128_vq8k": ("titok", "titok_bl128_vq8k"),
    "titok_sl256_vq8k": ("titok", "titok_sl256_vq8k"),
    "titok_ll32_vae": ("titok", "titok_ll32_vae_c16"),
    "titok_bl64_vae": ("titok", "titok_bl64_vae_c16"),
    "titok_bl128_vae": ("titok", "titok_bl128_vae_c16"),
    "titok_b": None,  # the one-stage TiTok-B-64 recipe with a pixel head: the release has no such model
    "flextok_d12_d12": ("flextok", "flextok_d12_d12"),
    "flextok_d18_d18": ("flextok", "flextok_d18_d18"),
    "flextok_d18_d28": ("flextok", "flextok_d18_d28"),
    # The released clipb file has the "enhanced" decoder; the experiment's standard one is stage 1's.
    "tokenflow_clipb": ("tokenflow", "tokenflow_clipb_32k_stage1"),
    "tokenflow_siglip_384": ("tokenflow", "tokenflow_siglip_32k"),
    "tokenflow_vitamin_xl": None,  # no released ViTamin-XL TokenFlow
    "layton_sdxl": ("layton", "entries"),
    # Both SEED stages build the text branch (a stage-1 run loads strictly into stage 2): the release's
    # stage-1 ITC model and its seed_quantizer.pt together, on the EVA ViT-g.
    "seed": ("seed", "released_seed_quantizer"),
    "divot": ("divot", "encoder"),
}
# Small CPU recipes: no paper or release to match (README counts only).
DEMOS = {"demo", "flextok_demo", "tokenflow_demo", "layton_demo", "seed_demo", "divot_demo"}
# Parts that only training uses and releases do not ship: FlexTok's REPA projection head.
TRAINING_ONLY = ("repa_projector.",)
# The released architectures of pretrained parts that configs name by hub id, per tokenizer class
# (the TokenFlow towers are handled by kind below).
ARCHITECTURES = {
    "FlexTok": {"vae": OFFICIAL_VAE_CONFIG},
    "Layton": {"unet": SDXL_UNET_CONFIG, "vae": SDXL_VAE_CONFIG},
    "Divot": {"frame_vit": None},  # None: the config already states the architecture
}


def readme_params() -> dict[str, tuple[float, float | None]]:
    """experiment -> (params in M, frozen VAE params in M or None) from the README's experiments table."""
    rows = {}
    for line in (REPO_ROOT / "README.md").read_text().splitlines():
        match = re.match(r"^\| `([\w]+)` \|.*\| ([\d.]+)M(?: \(\+ ([\d.]+)M frozen VAE\))?(?: \(\+ VAE\))? \|$", line)
        if match:
            rows[match[1]] = (float(match[2]), float(match[3]) if match[3] else None)
    return rows


@functools.cache
def build(experiment):
    """The experiment's tokenizer on the meta device, pretrained parts as random architectures
    (cached: both tests read the same builds, and meta tensors hold no memory)."""
    cfg = compose_train([f"experiment={experiment}"], "/nonexistent/run")  # nothing is written: no run starts
    for stage in cfg.model.get("stages") or {}:
        # The weight files a stage requires (teachers, stage-1 runs) do not change the architecture.
        with open_dict(cfg.model.stages[stage]):
            cfg.model.stages[stage].required = {}
    cfg = prepare_config(cfg)
    tokenizer_cfg = cfg.model.tokenizer
    with open_dict(tokenizer_cfg):
        for key, architecture in ARCHITECTURES.get(tokenizer_cfg._target_.rsplit(".", 1)[-1], {}).items():
            part = tokenizer_cfg.get(key)
            if part is not None and part.get("pretrained") is not None:
                part.pretrained, part.config = None, architecture or part.config
        tower = tokenizer_cfg.get("semantic_encoder")
        if tower is not None:
            architecture = {"openai_clip": CLIP_B16, "siglip": SIGLIP_SO400M}.get(tower.kind)
            tower.pretrained = None
            if architecture is not None:
                tower.config = OmegaConf.merge(architecture, tower.get("config") or {})
    with torch.device("meta"):
        return hydra.utils.instantiate(tokenizer_cfg)


def counts_by_part(named) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, tensor in named:
        counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + tensor.numel()
    return counts


def test_every_experiment_is_a_released_recipe_or_a_demo():
    """A new experiment file must say which release it reproduces (an entry above), so that its
    architecture is pinned the moment it lands."""
    assert set(EXPERIMENTS) == set(RELEASED) | DEMOS, "add new experiments to RELEASED (or DEMOS)"


@pytest.mark.parametrize("experiment", sorted(e for e in RELEASED if RELEASED[e]))
def test_names_and_shapes_equal_the_official_release(experiment, shared_dir):
    model, entry = RELEASED[experiment]
    keys = json.loads(reference_path(shared_dir, model, "full_size_keys.json").read_text())
    tokenizer = build(experiment)
    if model == "layton":  # entries: [name, shape, dtype]; totals: elements of the whole state dict
        ours = {k: list(v.shape) for k, v in layton_official_state_dict(tokenizer).items()}
        assert ours == {name: shape for name, shape, _ in keys[entry]}
        assert sum(v.numel() for v in tokenizer.state_dict().values()) == keys["totals"]["elements"]
        return
    if model == "seed":
        quantizer, vit = seed_official_state_dict(tokenizer)
        listed = {name: shape for name, shape, _ in keys["stage1_itc_model"] + keys[entry]}
        # The official stage-1 class also carries BERT's masked-LM head, which ITC never uses.
        expected = {k: v for k, v in listed.items() if not k.startswith("Qformer.cls.")}
        assert {k: list(v.shape) for k, v in quantizer.items()} == expected
        assert {f"visual_encoder.{k}": list(v.shape) for k, v in vit.items()} == \
            {name: shape for name, shape, _ in keys["eva_vit_g"]}
        assert sum(v.numel() for v in vit.values()) == keys["counts"]["eva_vit_g"]["params"]
        return
    if model == "divot":  # per part: [{key, shape}, ...]; the tokenizer and the de-tokenizer's three models
        def shapes(part):
            return {e["key"]: list(e["shape"]) for e in keys[part]["keys"]}

        encoder, detokenizer = divot_official_state_dicts(tokenizer)
        # The official encoder keeps six tensors of the deleted OpenCLIP text tower; nothing uses them.
        listed = {k: v for k, v in shapes("encoder").items()
                  if not (k.startswith("vit_model.model.") and ".visual." not in k)}
        assert len(shapes("encoder")) - len(listed) == 6
        assert {k: list(v.shape) for k, v in encoder.items()} == listed
        for part, prefix in (("detok_image_proj_model", "image_proj_model."), ("detok_diffusion_model", "diffusion_model."),
                             ("detok_first_stage_model", "first_stage_model.")):
            ours = {k[len(prefix):]: list(v.shape) for k, v in detokenizer.items() if k.startswith(prefix)}
            assert ours == shapes(part), part
        return
    expected, official_counts = keys[entry], keys["_param_counts"][entry]
    if model == "titok":
        ours = {k: list(v.shape) for k, v in titok_official_state_dict(tokenizer).items()}
        assert ours == expected
        assert counts_by_part(tokenizer.named_parameters()) == {k: v for k, v in official_counts.items() if k != "_total"}
    elif model == "tokenflow":
        official = tokenflow_official_state_dict(tokenizer)
        ours = {k: list(v.shape) for k, v in official.items()}
        assert set(ours) == set(expected), (sorted(set(ours) ^ set(expected))[:5])
        assert {k: v for k, v in ours.items() if v != expected[k]} == {}
        # Counted in the official layout: its totals include the quantizer's 131072-entry usage log
        # and SigLIP's input scaling, and lack the semantic decoder's k bias (zero, packed into qkv here).
        assert counts_by_part(official.items()) == {k: v for k, v in official_counts.items() if k != "_total"}
    else:  # flextok: the official names converted by the one mapping land exactly on ours
        converted = convert_state_dict({k: torch.empty(v, device="meta") for k, v in expected.items()}, 16)
        sincos = {k: v for k, v in converted.items() if k.startswith("_sincos.")}
        assert len(sincos) == 2
        ours = {k: tuple(v.shape) for k, v in tokenizer.state_dict().items() if not k.startswith(TRAINING_ONLY)}
        assert {k: tuple(v.shape) for k, v in converted.items() if k not in sincos} == ours
        # The official totals include the two sin-cos tables, which we recompute instead of storing.
        parameters = sum(v.numel() for k, v in tokenizer.named_parameters() if not k.startswith(TRAINING_ONLY))
        assert parameters == official_counts["_total"] - sum(v.numel() for v in sincos.values())
        assert sum(v.numel() for k, v in tokenizer.named_parameters() if k.startswith("vae.")) == official_counts["vae"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_readme_table_states_each_experiments_parameter_count(experiment):
    rows = readme_params()
    assert experiment in rows, f"README's experiments table has no row for {experiment}"
    params, vae = rows[experiment]
    tokenizer = build(experiment)
    frozen_vae = sum(v.numel() for k, v in tokenizer.named_parameters() if k.startswith("vae."))
    total = sum(v.numel() for k, v in tokenizer.named_parameters()
                if not k.startswith(("vae.", *TRAINING_ONLY)))
    assert round(total / 1e6, 1) == params
    if vae is not None:
        assert round(frozen_vae / 1e6, 1) == vae
