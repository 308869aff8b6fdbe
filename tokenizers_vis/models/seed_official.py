"""The official SEED-2 tokenizer (AILab-CVC/SEED, `Blip2QformerQuantizer`): config and weight conversion.

A folder in the official layout holds:
  seed_quantizer.pt    the released tokenizer (every entry but the ViT; bare, or under "model" /
                       "state_dict");
  eva_vit_g.pth        BLIP-2's EVA ViT-g, its own names (no `visual_encoder.` prefix);
  official_args.json   {"constructor_kwargs", "qformer_bert_config", "reverse_qformer_bert_config"
                       (with use_qformer_image), "eva_vit_config"}: the reference fixtures' JSON
                       fields, which the official code otherwise hard-codes (`RELEASED_ARGS`).

`load_official_seed(folder)` builds our `SEED` and loads both files strictly after this mapping
(official -> ours; everything not listed keeps its name):

    visual_encoder.* (eva_vit_g.pth: bare)    visual_encoder.*   (timm's Eva: the same layout)
    query_tokens [1, N, D]                    qformer.queries.weight [N, D]
    Qformer.bert.embeddings.LayerNorm.*       qformer.input_norm.*
    Qformer.bert.embeddings.position_ids      checked to be arange, dropped; written back from
                                              max_position_embeddings
    Qformer.bert.embeddings.word_embeddings   text_embeddings.word.weight       (stage 1 only)
    Qformer.bert.embeddings.position_embeddings text_embeddings.position.weight (stage 1 only)
    Qformer.bert.encoder.layer.{i}.
      attention.self.{query,key,value}.*      qformer.blocks.{i}.attn.qkv.*  (cat q, k, v: rows)
      attention.output.dense.*                qformer.blocks.{i}.attn.proj.*
      attention.output.LayerNorm.*            qformer.blocks.{i}.norm1.*
      crossattention.self.{query,key,value}.* qformer.blocks.{i}.cross_attn.{q,k,v}.*
      crossattention.output.dense.*           qformer.blocks.{i}.cross_attn.proj.*
      crossattention.output.LayerNorm.*       qformer.blocks.{i}.norm_cross.*
      intermediate_query.dense.*              qformer.blocks.{i}.mlp.fc1.*
      output_query.dense.*                    qformer.blocks.{i}.mlp.fc2.*
      output_query.LayerNorm.*                qformer.blocks.{i}.norm2.*
      intermediate.dense.*                    qformer.text_blocks.{i}.mlp.fc1.*  (stage 1 only)
      output.dense.* / output.LayerNorm.*     qformer.text_blocks.{i}.mlp.fc2.* / norm2.*
    Qformer.cls.*                             dropped: BLIP-2's LM head, unused by SEED
    reverse_tokens [1, 1, D]                  reverse_qformer.queries.weight [1, D]
    Reverse_Qformer.bert.*                    reverse_qformer.* (as Qformer.bert.*)

`official_state_dict(model)` is the exact inverse (bit for bit), so a trained SEED is written back
with `save_official_seed`. The real `seed_quantizer.pt` carries 146 entries the official code
ignores (its non-strict load reports them); they are dropped here too, but every entry our model
needs (the 370 of the release) must be present, with its shape.

Importing this module registers the layout as the official format "seed"; the preset
`seed-tokenizer-2` (also `AILab-CVC/seed-tokenizer-2`) fetches the released files when online.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tokenizers_vis.models.official import OfficialFormat, register_official_format
from tokenizers_vis.models.seed import EVA_VIT_G, SEED
from tokenizers_vis.nn.weights import read_state_file

QUANTIZER_NAME = "seed_quantizer.pt"
VIT_NAME = "eva_vit_g.pth"
ARGS_NAME = "official_args.json"
RELEASED_REPO = "AILab-CVC/seed-tokenizer-2"
UNCLIP_REPO = "stabilityai/stable-diffusion-2-1-unclip"
UNCLIP_EMBED_DIM = 1024
# BLIP-2's EVA ViT-g file (LAVIS), as SEED's loader fetches it.
EVA_VIT_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"

_BERT_BASE = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "intermediate_size": 3072, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
              "max_position_embeddings": 512, "encoder_width": 1408, "cross_attention_freq": 2}
# What the official inference class is built with for the release (its defaults + hard-coded sizes).
RELEASED_ARGS: dict[str, Any] = {
    "constructor_kwargs": {"vit_model": "eva_clip_g", "img_size": 224, "num_query_token": 32,
                           "cross_attention_freq": 2, "embed_dim": 256, "max_txt_len": 32, "codebook_embed_dim": 32,
                           "n_embed": 8192, "recon_s": True, "blocks_for_image": True, "decode_depth": 4,
                           "use_recon_s_for_image": False, "use_qformer_image": False, "image_features_dim": 1024},
    "qformer_bert_config": {**_BERT_BASE, "query_length": 32},
    "reverse_qformer_bert_config": None,
    "eva_vit_config": {"img_size": 224, "patch_size": 14, "embed_dim": 1408, "depth": 39, "num_heads": 16,
                       "mlp_ratio": 4.3637},
}


# -- config ------------------------------------------------------------------------------------------
def seed_config(args: Mapping[str, Any]) -> dict[str, Any]:
    """Our SEED arguments (released layout, stage 2, no text branch) for an `official_args.json`."""
    kwargs = dict(args.get("constructor_kwargs") or {})
    bert = {**_BERT_BASE, **dict(args.get("qformer_bert_config") or {})}
    eva = {**RELEASED_ARGS["eva_vit_config"], **dict(args.get("eva_vit_config") or {})}
    unsupported = {k: kwargs[k] for k, want in (("recon_s", True), ("blocks_for_image", True),
                                                ("use_recon_s_for_image", False)) if k in kwargs and kwargs[k] != want}
    if unsupported:
        raise ValueError(f"unsupported official SEED options {unsupported}: the released layout has recon_s and "
                         f"blocks_for_image on and use_recon_s_for_image off")
    if bert.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"the Q-Former activation must be BERT's exact gelu, got {bert['hidden_act']!r}")
    if bert["encoder_width"] != eva["embed_dim"]:
        raise ValueError(f"qformer_bert_config.encoder_width {bert['encoder_width']} != ViT width {eva['embed_dim']}")
    num_queries = int(kwargs.get("num_query_token", 32))
    reverse = bool(kwargs.get("use_qformer_image", False))
    if not reverse and num_queries != 32:
        raise ValueError(f"the released head (b) flattens 32 x 32 features into a Linear(1024, ...): it needs 32 "
                         f"queries, got num_query_token={num_queries} (use_qformer_image=True has no such limit)")
    config: dict[str, Any] = {
        "image_size": int(kwargs.get("img_size", eva["img_size"])),
        "vit": {"patch_size": eva["patch_size"], "width": eva["embed_dim"], "depth": eva["depth"],
                "heads": eva["num_heads"], "mlp_ratio": eva["mlp_ratio"], "pretrained": None},
        "qformer_width": bert["hidden_size"], "qformer_depth": bert["num_hidden_layers"],
        "qformer_heads": bert["num_attention_heads"], "qformer_mlp_dim": bert["intermediate_size"],
        "qformer_norm_eps": bert["layer_norm_eps"],
        "cross_attention_every": int(kwargs.get("cross_attention_freq", bert["cross_attention_freq"])),
        "num_queries": num_queries,
        # The official mask is causal exactly when 32 query embeddings come in (hard-wired).
        "causal_queries": num_queries == 32,
        "text_branch": False,
        "vocab_size": bert["vocab_size"] + 1,
        "max_text_positions": bert["max_position_embeddings"],
        "max_text_len": int(kwargs.get("max_txt_len", 32)),
        "itc_dim": int(kwargs.get("embed_dim", 256)),
        "codebook_size": int(kwargs.get("n_embed", 8192)),
        "code_dim": int(kwargs.get("codebook_embed_dim", 32)),
        "commitment_weight": 0.25,
        "decode_depth": int(kwargs.get("decode_depth", 4)),
        "image_head": "reverse_qformer" if reverse else "mlp",
        "image_embed_dim": int(kwargs.get("image_features_dim", 1024)),
        "stage": 2,
    }
    if config["image_embed_dim"] == UNCLIP_EMBED_DIM:
        # The de-tokenizer and target SEED-LLaMA pairs with the release (recorded by source, built on
        # first decode / evaluation only): SD 2.1 unCLIP and its CLIP ViT-H/14 image encoder.
        config["unclip"] = {"pretrained": UNCLIP_REPO}
        config["clip_target"] = {"pretrained": UNCLIP_REPO, "subfolder": "image_encoder"}
    if reverse:
        rev = dict(args.get("reverse_qformer_bert_config") or {})
        if not rev:
            raise ValueError("use_qformer_image=True needs reverse_qformer_bert_config in official_args.json")
        for key, ours in (("hidden_size", "qformer_width"), ("num_attention_heads", "qformer_heads"),
                          ("intermediate_size", "qformer_mlp_dim")):
            if rev.get(key, bert[key]) != config[ours]:
                raise ValueError(f"reverse_qformer_bert_config.{key}={rev[key]} differs from the Q-Former's "
                                 f"{config[ours]}; this converter shares those sizes")
        config["reverse_qformer_depth"] = int(rev.get("num_hidden_layers", 12))
        config["reverse_max_positions"] = int(rev.get("max_position_embeddings", bert["max_position_embeddings"]))
    return config


def build_from_args(args: Mapping[str, Any], **overrides: Any) -> SEED:
    config = seed_config(args)
    config.pop("reverse_max_positions", None)
    return SEED(**{**config, **overrides})


# -- weights -----------------------------------------------------------------------------------------
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# BERT layer entry (after `encoder.layer.{i}.`) -> (our block list, our name) for single tensors.
_LAYER_RENAMES = {
    "attention.output.dense": ("blocks", "attn.proj"),
    "attention.output.LayerNorm": ("blocks", "norm1"),
    "crossattention.self.query": ("blocks", "cross_attn.q"),
    "crossattention.self.key": ("blocks", "cross_attn.k"),
    "crossattention.self.value": ("blocks", "cross_attn.v"),
    "crossattention.output.dense": ("blocks", "cross_attn.proj"),
    "crossattention.output.LayerNorm": ("blocks", "norm_cross"),
    "intermediate_query.dense": ("blocks", "mlp.fc1"),
    "output_query.dense": ("blocks", "mlp.fc2"),
    "output_query.LayerNorm": ("blocks", "norm2"),
    "intermediate.dense": ("text_blocks", "mlp.fc1"),
    "output.dense": ("text_blocks", "mlp.fc2"),
    "output.LayerNorm": ("text_blocks", "norm2"),
}
_SELF_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")
_EMBEDDINGS = {"embeddings.LayerNorm": "input_norm", "embeddings.word_embeddings": "@text.word",
               "embeddings.position_embeddings": "@text.position"}
_QFORMERS = (("Qformer.", "qformer.", "query_tokens"), ("Reverse_Qformer.", "reverse_qformer.", "reverse_tokens"))


def _convert_bert(name: str, tensor: torch.Tensor, prefix: str, out: dict, qkv: dict, dropped: list) -> None:
    """One `*.bert.*` (or `cls.*`) entry of an official Q-Former into `out` (q/k/v parts into `qkv`)."""
    if name.startswith("cls."):
        dropped.append(name)  # BLIP-2's LM head: SEED never trains or runs it
        return
    if not name.startswith("bert."):
        raise KeyError(f"unknown Q-Former entry {name!r}")
    name = name[len("bert."):]
    if name == "embeddings.position_ids":
        expected = torch.arange(tensor.shape[-1]).expand_as(tensor)
        if not torch.equal(tensor.long(), expected):
            raise ValueError(f"{prefix}embeddings.position_ids is not arange; this converter assumes it")
        return
    for official, ours in _EMBEDDINGS.items():
        if name.startswith(official + "."):
            suffix = name[len(official):]
            target = ("text_embeddings." + ours[len("@text."):] + suffix) if ours.startswith("@text.") \
                else prefix + ours + suffix
            out[target] = tensor
            return
    match = _LAYER.match(name)
    if not match:
        raise KeyError(f"unknown Q-Former entry bert.{name!r}")
    i, rest = match.group(1), match.group(2)
    module, _, param = rest.rpartition(".")
    if module in _SELF_QKV:
        qkv.setdefault(f"{prefix}blocks.{i}.attn.qkv.{param}", {})[_SELF_QKV.index(module)] = tensor
        return
    if module not in _LAYER_RENAMES:
        raise KeyError(f"unknown Q-Former layer entry {rest!r}")
    blocks, ours = _LAYER_RENAMES[module]
    out[f"{prefix}{blocks}.{i}.{ours}.{param}"] = tensor


def convert_official_state(state: Mapping[str, torch.Tensor], vit_state: Mapping[str, torch.Tensor] | None = None,
                           ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(our state dict, dropped official names) for an official SEED state dict (seed_quantizer.pt,
    or a stage-1 checkpoint with the text side and `vision_proj` / `text_proj` / `temp`) and the
    EVA ViT file (bare names, or `visual_encoder.*`). See the module docstring."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[int, torch.Tensor]] = {}
    dropped: list[str] = []
    for name, tensor in state.items():
        for official, ours, tokens in _QFORMERS:
            if name.startswith(official):
                _convert_bert(name[len(official):], tensor, ours, out, qkv, dropped)
                break
            if name == tokens:
                out[ours + "queries.weight"] = tensor.reshape(tensor.shape[-2], tensor.shape[-1])
                break
        else:
            out[name] = tensor
    for key, parts in qkv.items():
        if sorted(parts) != [0, 1, 2]:
            raise ValueError(f"official self-attention for {key} lacks some of query/key/value")
        out[key] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    for name, tensor in (vit_state or {}).items():
        out[name if name.startswith("visual_encoder.") else "visual_encoder." + name] = tensor
    return out, dropped


def _bert_back(name: str, tensor: torch.Tensor, official: str, out: dict) -> None:
    """Inverse of `_convert_bert` for one of our Q-Former entries (relative to the Q-Former)."""
    if name.startswith("queries."):
        return
    if name.startswith("input_norm."):
        out[f"{official}bert.embeddings.LayerNorm.{name[len('input_norm.'):]}"] = tensor
        return
    blocks, i, rest = name.split(".", 2)
    module, _, param = rest.rpartition(".")
    if blocks == "blocks" and module == "attn.qkv":
        for part, chunk in zip(_SELF_QKV, tensor.chunk(3, dim=0)):
            out[f"{official}bert.encoder.layer.{i}.{part}.{param}"] = chunk.clone()
        return
    back = {value: key for key, value in _LAYER_RENAMES.items()}
    out[f"{official}bert.encoder.layer.{i}.{back[(blocks, module)]}.{param}"] = tensor


def official_state_dict(model: SEED, max_positions: int | None = None,
                        reverse_max_positions: int | None = None,
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(seed_quantizer state, eva_vit_g state) of our SEED in the official layout: the inverse of
    `convert_official_state`. The `position_ids` buffers are arange(max positions)."""
    quantizer: dict[str, torch.Tensor] = {}
    vit: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if name.startswith("visual_encoder."):
            vit[name[len("visual_encoder."):]] = tensor
        elif name.startswith("text_embeddings."):
            part = {"word": "word_embeddings", "position": "position_embeddings"}[name.split(".")[1]]
            quantizer[f"Qformer.bert.embeddings.{part}.weight"] = tensor
        elif name.startswith(("qformer.", "reverse_qformer.")):
            prefix, rest = name.split(".", 1)
            _bert_back(rest, tensor, "Qformer." if prefix == "qformer" else "Reverse_Qformer.", quantizer)
        else:
            quantizer[name] = tensor
    quantizer["query_tokens"] = model.qformer.queries.weight.detach()[None]
    positions = max_positions or model.max_text_positions
    quantizer["Qformer.bert.embeddings.position_ids"] = torch.arange(positions)[None]
    if model.image_head == "reverse_qformer":
        quantizer["reverse_tokens"] = model.reverse_qformer.queries.weight.detach()[None]
        rpos = reverse_max_positions or positions
        quantizer["Reverse_Qformer.bert.embeddings.position_ids"] = torch.arange(rpos)[None]
    return quantizer, vit


def load_converted(model: SEED, converted: Mapping[str, torch.Tensor], source: str) -> list[str]:
    """Load `converted` into `model`: every entry of the model must be there with its shape; entries
    the model lacks are returned (and not loaded)."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(converted))
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} entries of this SEED, e.g. {missing[:6]}")
    unexpected = sorted(set(converted) - set(ours))
    try:
        model.load_state_dict({k: converted[k] for k in ours}, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{source} does not match the SEED its arguments describe: {err}") from err
    return unexpected


def blip2_initial_state(path: str | os.PathLike, model: SEED) -> dict[str, torch.Tensor]:
    """The entries of a BLIP-2 / SEED stage-1 checkpoint in LAVIS layout (e.g. `blip2_pretrained.pth`:
    `{"model": {...}}` with `Qformer.*`, `query_tokens`, `ln_vision.*`, `vision_proj.*`, `text_proj.*`,
    `temp`, `visual_encoder.*`, `itm_head.*`) that `model` has, converted by the one mapping above:
    the weights SEED's stage 1 starts from. Entries the model lacks (`itm_head`, the LM head, a ViT
    block the 39-block tower drops) are left out; every Q-Former entry of the model must be there."""
    state = read_state_file(path, wrappers=("model", "state_dict"), what="BLIP-2 Q-Former checkpoint")
    converted, _ = convert_official_state(state)
    ours = model.state_dict()
    missing = sorted(k for k in ours if k.startswith(("qformer.", "text_embeddings.")) and k not in converted)
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} Q-Former entries of this SEED, e.g. {missing[:5]}")
    wrong = sorted(k for k in ours if k in converted and converted[k].shape != ours[k].shape)
    if wrong:
        shapes = [(k, tuple(converted[k].shape)) for k in wrong[:4]]
        raise ValueError(f"{path} does not fit this SEED's sizes: {shapes}")
    return {k: converted[k] for k in ours if k in converted}


# -- the folder ---------------------------------------------------------------------------------------
def is_official_seed_folder(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    return directory.is_dir() and (directory / QUANTIZER_NAME).is_file() and (directory / ARGS_NAME).is_file()


def read_official_args(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(directory) / ARGS_NAME).read_text())


def load_official_seed(directory: str | os.PathLike, strict_unexpected: bool = False, **overrides: Any) -> SEED:
    """Our SEED (eval mode) from an official-layout folder. Entries of seed_quantizer.pt / eva_vit_g.pth
    that the model has no place for are dropped (the release's 146 ignored entries, the EVA file's
    40th block) with a warning, or raise with `strict_unexpected`. `overrides` go to `SEED` (e.g. unclip)."""
    directory = Path(directory)
    args = read_official_args(directory)
    model = build_from_args(args, **overrides)
    state = read_state_file(directory / QUANTIZER_NAME, wrappers=("model", "state_dict"), what="SEED state dict")
    vit_path = directory / VIT_NAME
    if not vit_path.is_file():
        raise FileNotFoundError(f"{directory} has no {VIT_NAME} (BLIP-2's EVA ViT-g: {EVA_VIT_URL})")
    vit = read_state_file(vit_path, wrappers=("model", "state_dict"), what="EVA ViT-g state dict")
    converted, dropped = convert_official_state(state, vit)
    unexpected = load_converted(model, converted, f"{directory}")
    if unexpected:
        if strict_unexpected:
            raise ValueError(f"{directory} holds {len(unexpected)} entries this SEED has no place for: "
                             f"{unexpected[:8]}")
        warnings.warn(f"dropped {len(unexpected)} entries of {directory} that the official code ignores too, "
                      f"e.g. {unexpected[:4]}", stacklevel=2)
    model.dropped_official_keys = tuple(unexpected) + tuple(dropped)
    return model.eval()


def save_official_seed(model: SEED, directory: str | os.PathLike, args: Mapping[str, Any] | None = None) -> Path:
    """Write `model` as an official-layout folder: seed_quantizer.pt, eva_vit_g.pth, official_args.json
    (`args`: default, the official arguments rebuilt from the model)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    args = dict(args) if args is not None else official_args(model)
    bert = args.get("qformer_bert_config") or {}
    rev = args.get("reverse_qformer_bert_config") or {}
    quantizer, vit = official_state_dict(model, bert.get("max_position_embeddings"), rev.get("max_position_embeddings"))
    (directory / ARGS_NAME).write_text(json.dumps(args, indent=2))
    torch.save({k: v.cpu().contiguous() for k, v in quantizer.items()}, directory / QUANTIZER_NAME)
    torch.save({k: v.cpu().contiguous() for k, v in vit.items()}, directory / VIT_NAME)
    return directory


def official_args(model: SEED) -> dict[str, Any]:
    """The `official_args.json` content that rebuilds `model`'s architecture."""
    c = model.config
    vit = {**EVA_VIT_G, **{k: v for k, v in (c.get("vit") or {}).items() if v is not None}}
    if c["causal_queries"] != (c["num_queries"] == 32):
        raise ValueError("the official Q-Former is causal exactly for 32 queries; this SEED cannot be written back")
    if c["decode_heads"] != 12:
        raise ValueError(f"the official heads hard-code 12 attention heads; this SEED has {c['decode_heads']}")
    bert = {**_BERT_BASE, "vocab_size": c["vocab_size"] - 1, "hidden_size": c["qformer_width"],
            "num_hidden_layers": c["qformer_depth"], "num_attention_heads": c["qformer_heads"],
            "intermediate_size": c["qformer_mlp_dim"], "layer_norm_eps": c["qformer_norm_eps"],
            "max_position_embeddings": c["max_text_positions"], "encoder_width": vit["width"],
            "cross_attention_freq": c["cross_attention_every"], "query_length": c["num_queries"]}
    reverse = c["image_head"] == "reverse_qformer"
    return {
        "constructor_kwargs": {
            "vit_model": "eva_clip_g", "img_size": c["image_size"], "num_query_token": c["num_queries"],
            "cross_attention_freq": c["cross_attention_every"], "embed_dim": c["itc_dim"],
            "max_txt_len": c["max_text_len"], "codebook_embed_dim": c["code_dim"], "n_embed": c["codebook_size"],
            "recon_s": True, "blocks_for_image": True, "decode_depth": c["decode_depth"],
            "use_recon_s_for_image": False, "use_qformer_image": reverse, "image_features_dim": c["image_embed_dim"]},
        "qformer_bert_config": bert,
        "reverse_qformer_bert_config": ({**bert, "num_hidden_layers": c["reverse_qformer_depth"],
                                         "encoder_width": c["qformer_width"], "query_length": 1} if reverse else None),
        "eva_vit_config": {"img_size": c["image_size"], "patch_size": vit["patch_size"], "embed_dim": vit["width"],
                           "depth": vit["depth"], "num_heads": vit["heads"], "mlp_ratio": vit["mlp_ratio"]},
    }


# -- the release -------------------------------------------------------------------------------------
def released_folder(cache_dir: str | os.PathLike) -> Path:
    """Fetch `seed_quantizer.pt` (Hub) and BLIP-2's `eva_vit_g.pth` (LAVIS URL, via torch.hub's cache)
    into an official-layout folder under `cache_dir` (needs network, or files already there)."""
    from huggingface_hub import hf_hub_download

    folder = Path(cache_dir) / "seed-tokenizer-2"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        quantizer = Path(hf_hub_download(RELEASED_REPO, QUANTIZER_NAME))
        vit = folder / VIT_NAME
        if not vit.is_file():
            torch.hub.download_url_to_file(EVA_VIT_URL, str(vit))
    except Exception as err:
        raise OSError(f"could not fetch the released SEED tokenizer ({err}). Where there is network, download "
                      f"`hf download {RELEASED_REPO} {QUANTIZER_NAME}` and {EVA_VIT_URL} into one folder with an "
                      f"{ARGS_NAME} (`seed_official.RELEASED_ARGS`) and pass that folder.") from err
    (folder / ARGS_NAME).write_text(json.dumps(RELEASED_ARGS, indent=2))
    target = folder / QUANTIZER_NAME
    if target.is_symlink() and not target.exists():
        target.unlink()
    if not target.exists():
        target.symlink_to(quantizer)
    return folder


def _load_for_format(path: str | os.PathLike, **options: Any) -> SEED:
    return load_official_seed(path, **options)


def _save_for_format(model: SEED, path: str | os.PathLike, **options: Any) -> Path:
    return save_official_seed(model, path, **options)


OFFICIAL_FORMAT = register_official_format(OfficialFormat(
    name="seed", recognise=is_official_seed_folder, load=_load_for_format, save=_save_for_format,
    presets={"seed-tokenizer-2": released_folder, RELEASED_REPO: released_folder},
))
