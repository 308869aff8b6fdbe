"""Weight-exact compatibility with the released TiTok checkpoints (bytedance/1d-tokenizer).

A released Hub repo (e.g. `yucornetto/tokenizer_titok_l32_imagenet`) holds `config.json`, the
official nested config (`model.vq_model.*`, `dataset.preprocessing.crop_size`, ...), and the
weights as `model.safetensors` or `pytorch_model.bin`. `load_official` turns such a folder into our
`TiTok` (config conversion, then the one key mapping below, then a strict load); `save_official`
writes one of our TiTok models in that layout so the official code can run it. Importing this
module registers the layout as the official format "titok" (models/official.py), through which
`load_tokenizer` reads such folders.

Two optional top-level keys of config.json extend the official format so that small models can be
described (the official code ignores top-level keys it does not read):
- `model_sizes`: extra named sizes, `{name: {width, num_layers, num_heads}}`, usable in
  `vit_enc_model_size` / `vit_dec_model_size` beside small / base / large;
- `pixel_decoder`: replaces the MaskGIT-VQGAN pixel-decoder settings hard-coded in the official
  TiTok (`MASKGIT_PIXEL_DECODER`).

Official flags and what they become here:
- `is_legacy` (default true) selects both the legacy encoder reshape and the proxy-code decoder
  head (1024 logits over MaskGIT-VQGAN codes); false: proper transpose and the pixel head.
- `finetune_decoder` (default true) adds `pixel_quantize` + `pixel_decoder`. The official code
  can combine the two flags freely, but only legacy + finetune (the released S/B/L) and neither
  (the released VQ-8k and VAE models) decode to pixels, so only those two are accepted.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tokenizers_vis.models.base import build_tokenizer
from tokenizers_vis.models.official import OfficialFormat, register_official_format
from tokenizers_vis.models.titok import MODEL_SIZES, TiTok, resolve_size
from tokenizers_vis.nn.weights import read_state_file

# What the official TiTok hard-codes for its pixel decoder and proxy codebook (1024 x 256).
MASKGIT_PIXEL_DECODER = {
    "channel_mult": [1, 1, 2, 2, 4],
    "num_resolutions": 5,
    "dropout": 0.0,
    "hidden_channels": 128,
    "num_channels": 3,
    "num_res_blocks": 2,
    "resolution": 256,
    "z_channels": 256,
}
OFFICIAL_PROXY_CODES = 1024
OFFICIAL_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")

_BLOCK = r"^(encoder|decoder)\.transformer\.blocks\.(\d+)\."  # ours: {part}.transformer.blocks.{i}.
KEY_MAPPING: tuple[tuple[str, str], ...] = (
    (_BLOCK + r"norm1\.", r"\1.transformer.\2.ln_1."),
    (_BLOCK + r"norm2\.", r"\1.transformer.\2.ln_2."),
    (_BLOCK + r"attn\.qkv\.(weight|bias)$", r"\1.transformer.\2.attn.in_proj_\3"),
    (_BLOCK + r"attn\.proj\.", r"\1.transformer.\2.attn.out_proj."),
    (_BLOCK + r"mlp\.fc1\.", r"\1.transformer.\2.mlp.c_fc."),
    (_BLOCK + r"mlp\.fc2\.", r"\1.transformer.\2.mlp.c_proj."),
    (r"^encoder\.patch_embed\.proj\.", "encoder.patch_embed."),
    (r"^decoder\.head\.", "decoder."),
)
"""Our parameter name -> official name: the first matching (regex, replacement) pair applies;
names no pattern matches are identical in both layouts. With P = encoder|decoder:

    ours                                      official
    P.transformer.blocks.{i}.norm1 / norm2    P.transformer.{i}.ln_1 / ln_2
    P.transformer.blocks.{i}.attn.qkv.weight  P.transformer.{i}.attn.in_proj_weight  (q, k, v packed
    P.transformer.blocks.{i}.attn.qkv.bias    P.transformer.{i}.attn.in_proj_bias     in that order)
    P.transformer.blocks.{i}.attn.proj        P.transformer.{i}.attn.out_proj
    P.transformer.blocks.{i}.mlp.fc1 / fc2    P.transformer.{i}.mlp.c_fc / c_proj
    encoder.patch_embed.proj                  encoder.patch_embed
    decoder.head.ffn.{0,2}  (proxy-code head) decoder.ffn.{0,2}
    decoder.head.ffn.0, decoder.head.conv_out decoder.ffn.0, decoder.conv_out  (pixel head)
    everything else: latent_tokens, the class / positional / latent / mask embeddings, ln_pre,
    ln_post, encoder.conv_out, decoder.decoder_embed, quantize, pixel_quantize, pixel_decoder

One tensor changes shape: `encoder.conv_out.weight` is a Linear [C, W] here and a 1x1 conv
[C, W, 1, 1] there (`CONV1X1_AS_LINEAR`); the reshape keeps every value in place.
"""
CONV1X1_AS_LINEAR = frozenset({"encoder.conv_out.weight"})


def official_key(name: str) -> str:
    """The official name of one of our TiTok parameter names (`KEY_MAPPING`)."""
    for pattern, replacement in KEY_MAPPING:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return name


def official_state_dict(tokenizer: TiTok) -> dict[str, torch.Tensor]:
    """Our parameters under their official names and shapes (buffers, e.g. usage counts, stay out)."""
    state = {}
    for name, param in tokenizer.named_parameters():
        tensor = param.detach()
        state[official_key(name)] = tensor[:, :, None, None] if name in CONV1X1_AS_LINEAR else tensor
    return state


def state_dict_from_official(tokenizer: TiTok, official: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official state dict renamed and reshaped for `tokenizer`; raises on missing or unexpected keys."""
    names = {official_key(name): name for name, _ in tokenizer.named_parameters()}
    missing, unexpected = sorted(set(names) - set(official)), sorted(set(official) - set(names))
    if missing or unexpected:
        raise ValueError(f"official TiTok weights do not match the model built from its config: "
                         f"missing {missing[:8]}{' …' if len(missing) > 8 else ''} ({len(missing)}), "
                         f"unexpected {unexpected[:8]}{' …' if len(unexpected) > 8 else ''} ({len(unexpected)})")
    state = {}
    for key, name in names.items():
        tensor = official[key]
        state[name] = tensor.flatten(1) if name in CONV1X1_AS_LINEAR and tensor.dim() == 4 else tensor
    return state


# -- configs -----------------------------------------------------------------------------------
def is_official_titok_config(config: Mapping[str, Any]) -> bool:
    """True for the official nested config (no `model_type`, a `model.vq_model` section)."""
    model = config.get("model")
    return "model_type" not in config and isinstance(model, Mapping) and isinstance(model.get("vq_model"), Mapping)


def _require(section: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in section:
        raise ValueError(f"official TiTok config lacks {where}.{key}")
    return section[key]


def config_from_official(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our `TiTok` config (with `model_type`) from an official config.json / YAML dict.

    Only what shapes the network or the quantizer lookup is read; training settings and paths are
    ignored, and the strict weight load catches anything the config failed to describe.
    """
    vq = config["model"]["vq_model"]
    where = "model.vq_model"
    sizes = {name: {"width": w, "num_layers": d, "num_heads": h} for name, (w, d, h) in MODEL_SIZES.items()}
    sizes.update(config.get("model_sizes") or {})
    legacy, finetune = bool(vq.get("is_legacy", True)), bool(vq.get("finetune_decoder", True))
    if legacy != finetune:
        raise ValueError(f"official TiTok with is_legacy={legacy} and finetune_decoder={finetune} does not decode "
                         "to pixels (a stage-1 proxy-code model, or an unreleased combination); supported: both "
                         "true (released S/B/L) or both false (released VQ-8k / VAE models)")
    patch_size = _require(vq, "vit_enc_patch_size", where)
    if _require(vq, "vit_dec_patch_size", where) != patch_size:
        raise ValueError(f"encoder and decoder patch sizes differ ({patch_size} vs {vq['vit_dec_patch_size']}); "
                         "TiTok here uses one patch size")
    ours: dict[str, Any] = {
        "model_type": TiTok.model_type,
        "image_size": _require(config["dataset"]["preprocessing"], "crop_size", "dataset.preprocessing"),
        "patch_size": patch_size,
        "num_latent_tokens": _require(vq, "num_latent_tokens", where),
        "token_dim": _require(vq, "token_size", where),
        "legacy_reshape": legacy,
        "head": "proxy_codes" if legacy else "pixel",
    }
    for part, key in (("encoder", "vit_enc_model_size"), ("decoder", "vit_dec_model_size")):
        name = _require(vq, key, where)
        if name not in sizes:
            raise ValueError(f"unknown TiTok model size {name!r} in {where}.{key}; known: {sorted(sizes)} "
                             "(add others under the top-level `model_sizes`)")
        size = sizes[name]
        ours.update({f"{part}_size": None, f"{part}_width": size["width"], f"{part}_depth": size["num_layers"],
                     f"{part}_heads": size["num_heads"]})
    mode = vq.get("quantize_mode", "vq")
    if mode == "vq":
        ours.update(quantizer="vq", codebook_size=_require(vq, "codebook_size", where),
                    use_l2_norm=bool(_require(vq, "use_l2_norm", where)),
                    commitment_weight=vq.get("commitment_cost", 0.25))
    elif mode == "vae":
        ours.update(quantizer="vae")
    else:
        raise ValueError(f"unsupported official quantize_mode {mode!r}; expected 'vq' or 'vae'")
    if finetune:
        pixel = {**MASKGIT_PIXEL_DECODER, **(config.get("pixel_decoder") or {})}
        if pixel["num_resolutions"] != len(pixel["channel_mult"]) or pixel["num_channels"] != 3:
            raise ValueError(f"inconsistent pixel_decoder settings {pixel}: num_resolutions must equal "
                             "len(channel_mult) and num_channels must be 3")
        # `resolution` does not shape a convolutional decoder and `dropout` is inactive at inference.
        ours.update(proxy_codebook_size=OFFICIAL_PROXY_CODES, pixel_decoder_channels=pixel["hidden_channels"],
                    pixel_decoder_channel_mult=list(pixel["channel_mult"]),
                    pixel_decoder_res_blocks=pixel["num_res_blocks"], pixel_decoder_z_channels=pixel["z_channels"])
    return ours


def official_config(tokenizer: TiTok, weights_name: str = OFFICIAL_WEIGHT_NAMES[0]) -> dict[str, Any]:
    """The official config.json of one of our TiTok models; raises where the official code cannot
    express the model. Training-only settings (loss weights, dead-code restarts) are not carried."""
    c = tokenizer.config
    proxy = c["head"] == "proxy_codes"
    if c["legacy_reshape"] != proxy:
        raise ValueError("the official TiTok ties the legacy reshape to the proxy-code head (is_legacy): "
                         f"cannot export head={c['head']!r} with legacy_reshape={c['legacy_reshape']}")
    if float(c["mlp_ratio"]) != 4.0:
        raise ValueError(f"the official TiTok has MLP ratio 4, this model {c['mlp_ratio']}")
    if proxy and (c["proxy_codebook_size"], c["pixel_decoder_z_channels"]) != (OFFICIAL_PROXY_CODES, 256):
        raise ValueError("the official TiTok hard-codes a 1024 x 256 pixel_quantize codebook, this model has "
                         f"{c['proxy_codebook_size']} x {c['pixel_decoder_z_channels']}")
    standard = {size: name for name, size in MODEL_SIZES.items()}
    extra_sizes: dict[str, dict[str, int]] = {}
    size_names = {}
    for part in ("encoder", "decoder"):
        size = resolve_size(c[f"{part}_size"], c[f"{part}_width"], c[f"{part}_depth"], c[f"{part}_heads"])
        name = standard.get(size, "w{}_l{}_h{}".format(*size))
        if size not in standard:
            extra_sizes[name] = {"width": size[0], "num_layers": size[1], "num_heads": size[2]}
        size_names[part] = name
    vq_model: dict[str, Any] = {
        "token_size": c["token_dim"],
        "vit_enc_model_size": size_names["encoder"],
        "vit_dec_model_size": size_names["decoder"],
        "vit_enc_patch_size": c["patch_size"],
        "vit_dec_patch_size": c["patch_size"],
        "num_latent_tokens": c["num_latent_tokens"],
        "finetune_decoder": proxy,
        "is_legacy": proxy,
    }
    if c["quantizer"] == "vq":
        vq_model.update(codebook_size=c["codebook_size"], use_l2_norm=c["use_l2_norm"],
                        commitment_cost=c["commitment_weight"], quantize_mode="vq")
    else:
        vq_model.update(quantize_mode="vae")
    config: dict[str, Any] = {
        "experiment": {"tokenizer_checkpoint": weights_name},
        "model": {"vq_model": vq_model},
        "dataset": {"preprocessing": {"crop_size": c["image_size"]}},
    }
    if extra_sizes:
        config["model_sizes"] = extra_sizes
    if proxy:
        pixel = {**MASKGIT_PIXEL_DECODER, "channel_mult": list(c["pixel_decoder_channel_mult"]),
                 "num_resolutions": len(c["pixel_decoder_channel_mult"]),
                 "hidden_channels": c["pixel_decoder_channels"], "num_res_blocks": c["pixel_decoder_res_blocks"]}
        if pixel != MASKGIT_PIXEL_DECODER:
            config["pixel_decoder"] = pixel
    return config


# -- folders -----------------------------------------------------------------------------------
def read_official_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """`model.safetensors` or, failing that, `pytorch_model.bin` of a released TiTok folder."""
    directory = Path(directory)
    for name in OFFICIAL_WEIGHT_NAMES:
        if (directory / name).is_file():
            # The released files hold the state dict bare.
            return read_state_file(directory / name, wrappers=(), what="TiTok state dict")
    raise FileNotFoundError(f"{directory} holds an official TiTok config.json but no weights "
                            f"({' or '.join(OFFICIAL_WEIGHT_NAMES)})")


def load_official(directory: str | os.PathLike, config: Mapping[str, Any] | None = None) -> TiTok:
    """Our TiTok, in eval mode, from a folder in the released layout (`config` read from it if None)."""
    directory = Path(directory)
    if config is None:
        config = json.loads((directory / "config.json").read_text())
    weights = read_official_weights(directory)
    tokenizer = build_tokenizer(config_from_official(config))
    tokenizer.load_state_dict(state_dict_from_official(tokenizer, weights), strict=True)
    return tokenizer.eval()


def save_official(tokenizer: TiTok, directory: str | os.PathLike) -> Path:
    """Write `tokenizer` as config.json + model.safetensors in the released TiTok layout."""
    if not isinstance(tokenizer, TiTok):
        raise TypeError(f"save_official writes TiTok models, got {type(tokenizer).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = official_config(tokenizer)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.contiguous().cpu() for k, v in official_state_dict(tokenizer).items()}
    save_file(state, str(directory / OFFICIAL_WEIGHT_NAMES[0]), metadata={"format": "pt"})
    return directory


def is_official_titok_folder(directory: str | os.PathLike) -> bool:
    """True for a folder whose config.json is the official nested TiTok config."""
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(config, Mapping) and is_official_titok_config(config)


OFFICIAL_FORMAT = register_official_format(OfficialFormat(
    name="titok", recognise=is_official_titok_folder, load=load_official, save=save_official,
))
