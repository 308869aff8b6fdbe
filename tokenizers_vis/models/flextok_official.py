"""Weight-exact compatibility with the released FlexTok checkpoints (apple/ml-flextok, Hub repos
`EPFL-VILAB/flextok_d12_d12_in1k`, `_d18_d18_in1k`, `_d18_d28_in1k`, `_d18_d28_dfn`).

A released repo holds the weights as safetensors, its config in Hydra `_target_` form
(`flextok.flextok_wrapper.FlexTok(vae, encoder, decoder, regularizer, ...)`) in `config.json`
and/or in the safetensors metadata (one entry per top-level key, a Python-literal string).
`load_official(folder)` converts the config (`convert_config`) and the weights (`convert_state_dict`,
the one mapping below), then loads strictly into our `FlexTok`.

The VAE is rebuilt from `OFFICIAL_VAE_CONFIG` (its weights are in the checkpoint, so nothing is
downloaded); the keys of the released VAE match it. A config may carry
`reference_fixture.vae_effective_diffusers_config` (the small test fixture does), which wins.

Importing this module registers the layout as the official format "flextok" (models/official.py),
through which `load_tokenizer` reads such folders. There is no writer: our FlexTok is not saved
in the released layout.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tokenizers_vis.models.flextok import FlexTok
from tokenizers_vis.models.official import OfficialFormat, register_official_format
from tokenizers_vis.nn.weights import read_state_file

OFFICIAL_TARGET = "flextok.flextok_wrapper.FlexTok"
# The diffusers AutoencoderKL of the released FlexTok VAE (SDXL-style blocks, 16 latent channels).
OFFICIAL_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
# Keys of diffusers' AutoencoderKL constructor that the fixture's effective config may carry.
_VAE_KEYS = set(OFFICIAL_VAE_CONFIG) | {"scaling_factor", "shift_factor", "latents_mean", "latents_std"}

ENC, DEC = "encoder.module_dict.", "decoder.module_dict."
# Official name -> ours, for the tensors that only change name (prefix replacements, first match).
RENAMES: tuple[tuple[str, str], ...] = (
    ("vae.vae.", "vae.model."),
    (ENC + "enc_register_module.registers", "encoder.registers"),
    (ENC + "enc_transformer.blocks.", "encoder.transformer.blocks."),
    (ENC + "enc_to_latents.proj.", "encoder.head."),
    (DEC + "dec_from_latents.proj.", "decoder.token_embed."),
    (DEC + "dec_nested_dropout.dropout_mask_token", "decoder.mask_token"),
    (DEC + "dec_latent_dropout.nullcond", "decoder.null_condition"),
    (DEC + "dec_time_embedder.mlp.", "decoder.time_embed.mlp."),
    (DEC + "dec_transformer.blocks.", "decoder.transformer.blocks."),
    (DEC + "dec_to_patches.adaLN_modulation.1.", "decoder.head.modulation."),
    (DEC + "dec_to_patches.proj.", "decoder.head.proj."),
)
"""The mapping, official -> ours. Renames above, plus these tensor changes:

    official                                         ours
    *_patch_emb.patch_proj.weight [D, p*p*C]         {encoder,decoder}.patch_embed.proj.weight [D, C, p, p]
      (Linear on (p q c)-ordered patches)              (the same numbers as a strided conv)
    *_patch_emb.patch_proj.bias                      {encoder,decoder}.patch_embed.proj.bias
    blocks.{i}.attn.wq / wk / wv  [D, D] each        blocks.{i}.attn.qkv.weight [3D, D] (q, k, v stacked)
    blocks.{i}.mlp.fc1 (gate), fc3 (value), fc2      blocks.{i}.mlp.fc1 = [fc3; fc1] (value, gate), mlp.fc2
    blocks.{i}.adaLN_modulation.1                    blocks.{i}.modulation (same chunk order)
    dec_registers_posemb_module.posembs [1,1,D,N]    decoder.register_pos_embed [N, D] (transposed)
    enc/dec sincos posembs [1, D, H, W] (frozen)     not stored: recomputed (checked to agree, then dropped)
"""


def is_official_flextok_config(config: Mapping[str, Any]) -> bool:
    return isinstance(config, Mapping) and config.get("_target_") == OFFICIAL_TARGET


def read_official_config(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The `_target_` config of a released FlexTok folder (config.json, else safetensors metadata)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if is_official_flextok_config(config):
            return config
    for weights in sorted(directory.glob("*.safetensors")):
        with safe_open(str(weights), "pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("_target_") == OFFICIAL_TARGET:
            return {k: (v if k == "_target_" else ast.literal_eval(v)) for k, v in metadata.items()}
    return None


def _vae_config(config: Mapping[str, Any]) -> dict[str, Any]:
    effective = (config.get("reference_fixture") or {}).get("vae_effective_diffusers_config")
    vae = {k: v for k, v in dict(effective or OFFICIAL_VAE_CONFIG).items() if k in _VAE_KEYS}
    vae["latent_channels"] = int(config["vae"].get("latent_channels", vae["latent_channels"]))
    return vae


def convert_config(config: Mapping[str, Any], image_size: int | None = None) -> dict[str, Any]:
    """Our FlexTok keyword arguments for an official `_target_` config."""
    enc, dec = config["encoder"]["module_dict"], config["decoder"]["module_dict"]
    enc_t, dec_t = enc["enc_transformer"], dec["dec_transformer"]
    if image_size is None:
        image_size = int((config.get("reference_fixture") or {}).get("image_size", 256))
    time = dec["dec_time_embedder"]
    if float(time.get("max_timestep", 1.0)) != 1.0 or int(time.get("frequency_embedding_size", 256)) != 256:
        raise ValueError("only the released time embedding (max_timestep 1.0, 256 frequencies) is supported")
    return {
        "image_size": image_size,
        "vae": {"pretrained": None, "config": _vae_config(config),
                "scaling_factor": float(config["vae"]["scaling_factor"])},
        "patch_size": int(enc["enc_patch_emb"]["patch_sizes"][0]),
        "num_registers": int(enc["enc_register_module"]["n_max"]),
        "encoder_width": int(enc_t["dim"]),
        "encoder_depth": int(enc_t["depth"]),
        "encoder_heads": int(enc_t["dim"]) // int(enc_t["head_dim"]),
        "decoder_width": int(dec_t["dim"]),
        "decoder_depth": int(dec_t["depth"]),
        "decoder_heads": int(dec_t["dim"]) // int(dec_t["head_dim"]),
        "mlp_ratio": float(enc_t.get("mlp_ratio", 4.0)),
        "levels": [int(level) for level in config["regularizer"]["levels"]],
        "cond_dropout": float(dec["dec_latent_dropout"].get("dropout_prob", 0.1)),
    }


def _patch_weight(weight: torch.Tensor, channels: int) -> torch.Tensor:
    d, n = weight.shape
    p = int(round((n // channels) ** 0.5))
    return weight.reshape(d, p, p, channels).permute(0, 3, 1, 2).contiguous()


def _rename(name: str) -> str | None:
    for official, ours in RENAMES:
        if name.startswith(official):
            return ours + name[len(official):]
    return None


def convert_state_dict(state: Mapping[str, torch.Tensor], channels: int) -> dict[str, torch.Tensor]:
    """Official state_dict -> ours (see the mapping above). Raises on any key it does not know."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in state.items():
        if name.endswith("posemb_module.posembs") and "registers" not in name:
            part = "encoder" if name.startswith(ENC) else "decoder"
            out[f"_sincos.{part}"] = value  # checked against ours by `load_official`, then dropped
            continue
        if name == DEC + "dec_registers_posemb_module.posembs":
            out["decoder.register_pos_embed"] = value[0, 0].t().contiguous()
            continue
        if "_patch_emb.patch_proj." in name:
            part = "encoder" if name.startswith(ENC) else "decoder"
            kind = name.rsplit(".", 1)[1]
            out[f"{part}.patch_embed.proj.{kind}"] = _patch_weight(value, channels) if kind == "weight" else value
            continue
        ours = _rename(name)
        if ours is None:
            raise KeyError(f"official FlexTok key {name!r} has no counterpart in the mapping")
        stem, leaf = ours.rsplit(".", 1)
        if stem.endswith((".attn.wq", ".attn.wk", ".attn.wv", ".mlp.fc1", ".mlp.fc3")):
            base, which = stem.rsplit(".", 1)
            pending.setdefault(base, {})[which] = value
            continue
        out[ours.replace(".adaLN_modulation.1.", ".modulation.")] = value
    for base, parts in pending.items():
        if base.endswith(".attn"):
            out[f"{base}.qkv.weight"] = torch.cat([parts["wq"], parts["wk"], parts["wv"]])
        else:
            out[f"{base}.fc1.weight"] = torch.cat([parts["fc3"], parts["fc1"]])
    return out


def load_official(directory: str | os.PathLike, config: Mapping[str, Any] | None = None,
                  image_size: int | None = None) -> FlexTok:
    """Our FlexTok, in eval mode, from a released FlexTok folder (or one in its layout)."""
    directory = Path(directory)
    config = config or read_official_config(directory)
    if config is None:
        raise ValueError(f"{directory} holds no official FlexTok config (config.json or safetensors metadata)")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_state_file(file))
    kwargs = convert_config(config, image_size)
    model = FlexTok(**kwargs)
    converted = convert_state_dict(state, model.latent_channels)
    for part in ("encoder", "decoder"):
        official = converted.pop(f"_sincos.{part}", None)
        if official is not None:
            ours = getattr(model, part).pos_embed
            grid = int(ours.shape[0] ** 0.5)
            cropped = official[0, :, :grid, :grid].flatten(1).t()
            if not torch.allclose(cropped, ours, atol=1e-5):
                raise ValueError(f"the official {part} sin-cos position embedding differs from ours")
    model.load_state_dict(converted, strict=True)
    return model.eval()


def is_official_flextok_folder(directory: str | os.PathLike) -> bool:
    """True for a folder holding a FlexTok `_target_` config (config.json or safetensors metadata)."""
    return Path(directory).is_dir() and read_official_config(directory) is not None


OFFICIAL_FORMAT = register_official_format(OfficialFormat(
    name="flextok", recognise=is_official_flextok_folder, load=load_official,
))
