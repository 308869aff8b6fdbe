"""Weight-exact compatibility with the released FlexTok checkpoints (apple/ml-flextok, Hub repos
`EPFL-VILAB/flextok_d12_d12_in1k`, `_d18_d18_in1k`, `_d18_d28_in1k`, `_d18_d28_dfn`).

A released repo holds the weights as safetensors, its config in Hydra `_target_` form
(`flextok.flextok_wrapper.FlexTok(vae, encoder, decoder, regularizer, ...)`) in `config.json`
and/or in the safetensors metadata (one entry per top-level key, a Python-literal string).
`load_official(folder)` converts the config (`convert_config`) and the weights (`convert_state_dict`,
the one mapping below), then loads strictly into our `FlexTok`.

Everything comes from the config and the weights, nothing from outside:
- the VAE is rebuilt as the official `StableDiffusionVAE` builds it (the diffusers AutoencoderKL of
  `OFFICIAL_VAE_CONFIG`), with the sizes its weights have (block widths, blocks, layers, latent
  channels; `vae_architecture`); its weights are in the checkpoint, so nothing is downloaded;
- the sin-cos tables cover the config's `max_sizes` (in patches), so the model takes any image whose
  patch grid fits in them and crops the tables to each input's grid, as the official code does;
  `max_image_size` is max_sizes x patch size x VAE downsampling;
- the default decode size (`image_size`) is the official `detokenize` default, a 32-wide latent
  (256 px with the f8 VAE), capped to what the tables cover.

Importing this module registers the layout as the official format "flextok" (models/official.py),
through which `load_tokenizer` reads such folders. There is no writer: our FlexTok is not saved
in the released layout.
"""

from __future__ import annotations

import ast
import json
import math
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
# The official `detokenize` default `vae_image_sizes`: the latent side decoded when none is given.
OFFICIAL_DEFAULT_LATENT_SIZE = 32

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


def vae_architecture(state: Mapping[str, torch.Tensor] | None = None, latent_channels: int | None = None,
                     override: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The AutoencoderKL arguments of an official VAE: `OFFICIAL_VAE_CONFIG` with the sizes read from
    its weights (`vae.vae.*` of an official state_dict; None: the released sizes), then `override`.

    The group count of the GroupNorms is the one size the weights do not hold. The official code
    builds the VAE with 32 groups; where 32 does not divide every block width that cannot be the
    VAE's, and the largest count up to 32 that divides them is taken. `override` names it (or any
    other argument) where that is not the one.
    """
    vae = dict(OFFICIAL_VAE_CONFIG)
    prefix = "vae.vae."
    if state is not None and any(name.startswith(prefix) for name in state):
        blocks = sorted({int(name[len(prefix + "encoder.down_blocks."):].split(".")[0]) for name in state
                         if name.startswith(prefix + "encoder.down_blocks.")})
        widths = [int(state[f"{prefix}encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in blocks]
        layers = {name.split(".resnets.")[1].split(".")[0] for name in state
                  if name.startswith(prefix + "encoder.down_blocks.0.resnets.")}
        groups = 32 if all(w % 32 == 0 for w in widths) else max(
            g for g in range(1, 33) if math.gcd(*widths) % g == 0)
        vae.update({
            "in_channels": int(state[prefix + "encoder.conv_in.weight"].shape[1]),
            "out_channels": int(state[prefix + "decoder.conv_out.weight"].shape[0]),
            "down_block_types": ["DownEncoderBlock2D"] * len(blocks),
            "up_block_types": ["UpDecoderBlock2D"] * len(blocks),
            "block_out_channels": widths,
            "layers_per_block": len(layers),
            "latent_channels": int(state[prefix + "decoder.conv_in.weight"].shape[1]),
            "norm_num_groups": groups,
            "use_quant_conv": prefix + "quant_conv.weight" in state,
            "use_post_quant_conv": prefix + "post_quant_conv.weight" in state,
            "mid_block_add_attention": any(name.startswith(prefix + "encoder.mid_block.attentions.")
                                           for name in state),
        })
    if latent_channels is not None:
        if state is not None and vae["latent_channels"] != latent_channels:
            raise ValueError(f"the config's vae.latent_channels {latent_channels} differs from the VAE weights' "
                             f"{vae['latent_channels']}")
        vae["latent_channels"] = int(latent_channels)
    vae.update(override or {})
    return vae


def convert_config(config: Mapping[str, Any], image_size: int | None = None, *,
                   state: Mapping[str, torch.Tensor] | None = None,
                   vae_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Our FlexTok keyword arguments for an official `_target_` config.

    state: the official state_dict, which sizes the VAE (`vae_architecture`; None: the released VAE).
    image_size: the default decode size; None: the official default (see the module docstring).
    vae_config: AutoencoderKL arguments that win over those read from the weights.
    """
    enc, dec = config["encoder"]["module_dict"], config["decoder"]["module_dict"]
    enc_t, dec_t = enc["enc_transformer"], dec["dec_transformer"]
    time = dec["dec_time_embedder"]
    if float(time.get("max_timestep", 1.0)) != 1.0 or int(time.get("frequency_embedding_size", 256)) != 256:
        raise ValueError("only the released time embedding (max_timestep 1.0, 256 frequencies) is supported")
    # The official wrapper takes the config's scaling, else that of the VAE at hf_hub_path, which
    # the checkpoint does not hold: then it must be named (vae_config={"scaling_factor": ...}).
    scaling = config["vae"].get("scaling_factor") or (vae_config or {}).get("scaling_factor")
    if scaling is None:
        raise ValueError(f"the official config gives no vae.scaling_factor (its VAE: hf_hub_path="
                         f"{config['vae'].get('hf_hub_path')!r}); pass vae_config={{'scaling_factor': ...}}")
    vae = vae_architecture(state, config["vae"].get("latent_channels"), vae_config)
    patch = int(enc["enc_patch_emb"]["patch_sizes"][0])
    max_sizes = [int(side) for side in enc["enc_posemb_module"]["max_sizes"]]
    if [int(side) for side in dec["dec_patches_posemb_module"]["max_sizes"]] != max_sizes:
        raise ValueError("the encoder's and decoder's sin-cos max_sizes differ; one FlexTok size range takes both")
    downsample = 2 ** (len(vae["block_out_channels"]) - 1)
    max_latent = [side * patch for side in max_sizes]
    if image_size is None:
        latent = min(OFFICIAL_DEFAULT_LATENT_SIZE // patch * patch, *max_latent)
        image_size = latent * downsample
    return {
        "image_size": int(image_size),
        "max_image_size": [side * downsample for side in max_latent],
        "vae": {"pretrained": None, "config": vae, "scaling_factor": float(scaling)},
        "patch_size": patch,
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
                  image_size: int | None = None, vae_config: Mapping[str, Any] | None = None) -> FlexTok:
    """Our FlexTok, in eval mode, from a released FlexTok folder (or one in its layout), built from its
    config and weights alone. image_size: the default decode size (None: the official default);
    vae_config: AutoencoderKL arguments that win over those read from the weights (`vae_architecture`)."""
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
    kwargs = convert_config(config, image_size, state=state, vae_config=vae_config)
    model = FlexTok(**kwargs)
    converted = convert_state_dict(state, model.latent_channels)
    for part in ("encoder", "decoder"):
        official = converted.pop(f"_sincos.{part}", None)
        if official is not None:
            ours = getattr(model, part).positions.table  # (rows, cols, D) over max_sizes
            table = official[0].permute(1, 2, 0)
            if table.shape != ours.shape or not torch.allclose(table, ours, atol=1e-5):
                raise ValueError(f"the official {part} sin-cos position table {tuple(official.shape)} differs from "
                                 f"ours, built for the config's max_sizes {list(ours.shape[:2])}")
    model.load_state_dict(converted, strict=True)
    return model.eval()


def is_official_flextok_folder(directory: str | os.PathLike) -> bool:
    """True for a folder holding a FlexTok `_target_` config (config.json or safetensors metadata)."""
    return Path(directory).is_dir() and read_official_config(directory) is not None


OFFICIAL_FORMAT = register_official_format(OfficialFormat(
    name="flextok", recognise=is_official_flextok_folder, load=load_official,
))
