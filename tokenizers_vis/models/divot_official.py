"""The official Divot (TencentARC/Divot) checkpoints: config and weight conversion.

A folder in the official layout holds
  official_args.json              {"config": ..., "detok_config": ...} shaped like the reference
                                  fixture's fields of those names (sizes of the encoder, the frame
                                  ViT's open_clip config, the condition resampler, the UNet and VAE)
  Divot_tokenizer.bin             the encoder state dict, official names, no prefix (`vit_model.*`
                                  optional: without it the frame ViT comes from `frame_vit_pretrained`,
                                  by default the laion2b ViT-H/14)
  Divot_detokenizer_stage1.bin    optional: `image_proj_model.*` (condition resampler),
                                  `diffusion_model.*` or `model.diffusion_model.*` (UNet),
                                  `first_stage_model.*` (LDM-layout VAE)
`load_official_divot(folder)` builds our `Divot` and loads strictly after this one mapping
(official -> ours):

  vit_model.model.visual.*                       frame_vit.model.*  (open_clip names)
  vit_model.model.{token_embedding, positional_   dropped: text-tower leftovers the encoder never uses
      embedding, ln_final, text_projection,
      logit_scale}
  temporal_encoder.transformer.resblocks.{i}.     temporal_encoder.transformer.blocks.{i}.
      ln_1 / ln_2 / attn.in_proj_{weight,bias} /      norm1 / norm2 / attn.qkv.{weight,bias} /
      attn.out_proj / mlp.c_fc / mlp.c_proj           attn.proj / mlp.fc1 / mlp.fc2
  temporal_encoder.{input_proj, positional_       unchanged
      embedding, ln_final, output_proj}, norm.*
  image_proj_model.{pos_embed_spatial,            st_transformer.{same}  (block names are ours)
      pos_embed_temporal, blocks.*, norm.*}
  image_proj_model.down_sampler.* (encoder)       resampler.*            \  Perceiver mapping:
  image_proj_model.* (de-tokenizer file)          context_resampler.*    /
      latents [1, N, D]                               latents.weight [N, D]
      layers.{i}.0.norm1 / norm2                      layers.{i}.norm_context / norm_cross
      layers.{i}.0.to_q / to_kv / to_out              layers.{i}.cross_attn.q / kv / proj
      layers.{i}.1.0 / 1.1 / 1.3                      layers.{i}.norm2 / mlp.fc1 / mlp.fc2
      proj_in, proj_out, norm_out                     unchanged
  (model.)diffusion_model.*                       decoder.denoiser.*     (the release's names)
  first_stage_model.*                             decoder.vae.model.*    (diffusers' LDM->diffusers
                                                                           AutoencoderKL conversion)
Importing this module registers the layout as the official format "divot".
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tokenizers_vis.models.divot import RELEASED_FRAME_VIT, Divot
from tokenizers_vis.models.official import OfficialFormat, link_released_file, register_official_format
from tokenizers_vis.nn.weights import read_state_file

ARGS_NAME = "official_args.json"
TOKENIZER_NAME = "Divot_tokenizer.bin"
DETOKENIZER_NAME = "Divot_detokenizer_stage1.bin"
RELEASED_REPO = "TencentARC/Divot"
TEXT_LEFTOVERS = tuple(f"vit_model.model.{k}" for k in
                       ("token_embedding.", "positional_embedding", "ln_final.", "text_projection", "logit_scale"))
VAE_SCALE = 0.18215
# official_args.json of the released files (configs/visual_encoder/Divot_video.yaml,
# configs/video_detokenizer/Divot_detokenizer_stage1.yaml and the code's defaults).
RELEASED_ARGS: dict[str, Any] = {
    "config": {
        "encoder": {"num_frames": 5, "input_dim": 1280, "hidden_size": 1024, "width": 768, "temporal_depth": 6,
                    "pool_size": 5, "use_norm": True, "transformer_depth": 4, "resampler_depth": 6,
                    "st_num_tokens": 125, "down_num_tokens": 64, "resampler_dim": 256},
        "frame_vit_openclip_cfg": {"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280,
                                                                   "head_width": 80, "patch_size": 14,
                                                                   "mlp_ratio": 4.0}},
        "code_defaults": {"temporal_heads": 12, "st_num_heads": 8, "down_resampler_dim_head": 64,
                          "down_resampler_heads": 16},
        "detok_resampler": {"dim": 1024, "depth": 6, "dim_head": 64, "heads": 16, "num_queries": 125,
                            "embedding_dim": 256, "output_dim": 1024},
        "clip_hw": [256, 256],
    },
    "detok_config": {
        "unet": {"in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
                 "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "dropout": 0.1, "num_head_channels": 64,
                 "transformer_depth": 1, "context_dim": 1024, "use_linear": True, "temporal_conv": True,
                 "temporal_attention": True, "addition_attention": True, "image_cross_attention": True,
                 "image_cross_attention_scale_learnable": True, "fs_condition": True, "default_fs": 3},
        "vae": {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                             "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                             "attn_resolutions": [], "dropout": 0.0}},
        "dynamicrafter": {"fs": 3, "image_size": 256, "num_frames": 5},
    },
}

_TEMPORAL = (("ln_1.", "norm1."), ("ln_2.", "norm2."), ("attn.in_proj_weight", "attn.qkv.weight"),
             ("attn.in_proj_bias", "attn.qkv.bias"), ("attn.out_proj.", "attn.proj."), ("mlp.c_fc.", "mlp.fc1."),
             ("mlp.c_proj.", "mlp.fc2."))
_PERCEIVER = (("0.norm1.", "norm_context."), ("0.norm2.", "norm_cross."), ("0.to_q.", "cross_attn.q."),
              ("0.to_kv.", "cross_attn.kv."), ("0.to_out.", "cross_attn.proj."), ("1.0.", "norm2."),
              ("1.1.", "mlp.fc1."), ("1.3.", "mlp.fc2."))


def _swap(name: str, pairs, reverse: bool = False) -> str:
    for old, new in pairs:
        old, new = (new, old) if reverse else (old, new)
        if name.startswith(old):
            return new + name[len(old):]
    raise KeyError(f"no mapping for {name!r}")


def perceiver_key(name: str, reverse: bool = False) -> str:
    """Official Resampler key (prefix removed) <-> our PerceiverResampler key."""
    if name == ("latents.weight" if reverse else "latents"):
        return "latents" if reverse else "latents.weight"
    m = re.match(r"layers\.(\d+)\.(.*)", name)
    if m:
        return f"layers.{m[1]}." + _swap(m[2], _PERCEIVER, reverse)
    return name


def convert_perceiver(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {perceiver_key(k): (v[0] if k == "latents" else v) for k, v in state.items()}


def convert_encoder_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Divot_tokenizer.bin -> our names (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    down = {}
    for key, value in state.items():
        if key.startswith(TEXT_LEFTOVERS):
            continue
        if key.startswith("vit_model.model.visual."):
            out["frame_vit.model." + key[len("vit_model.model.visual."):]] = value
        elif key.startswith("temporal_encoder.transformer.resblocks."):
            m = re.match(r"temporal_encoder\.transformer\.resblocks\.(\d+)\.(.*)", key)
            out[f"temporal_encoder.transformer.blocks.{m[1]}." + _swap(m[2], _TEMPORAL)] = value
        elif key.startswith(("temporal_encoder.", "norm.")):
            out[key] = value
        elif key.startswith("image_proj_model.down_sampler."):
            down[key[len("image_proj_model.down_sampler."):]] = value
        elif key.startswith("image_proj_model."):
            out["st_transformer." + key[len("image_proj_model."):]] = value
        else:
            raise KeyError(f"unexpected key {key!r} in {TOKENIZER_NAME}")
    out.update({"resampler." + k: v for k, v in convert_perceiver(down).items()})
    return out


def convert_detokenizer_state(state: Mapping[str, torch.Tensor], vae_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Divot_detokenizer_stage1.bin -> our names (the `video_tokenizer.*` copy of the encoder, when
    present, is left to Divot_tokenizer.bin)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    out: dict[str, torch.Tensor] = {}
    resampler, vae = {}, {}
    for key, value in state.items():
        if key.startswith("image_proj_model."):
            resampler[key[len("image_proj_model."):]] = value
        elif key.startswith(("diffusion_model.", "model.diffusion_model.")):
            out["decoder.denoiser." + key.split("diffusion_model.", 1)[1]] = value
        elif key.startswith("first_stage_model."):
            vae[key] = value
        elif not key.startswith("video_tokenizer."):
            raise KeyError(f"unexpected key {key!r} in {DETOKENIZER_NAME}")
    out.update({"context_resampler." + k: v for k, v in convert_perceiver(resampler).items()})
    if vae:
        out.update({"decoder.vae.model." + k: v for k, v in convert_ldm_vae_checkpoint(vae, dict(vae_config)).items()})
    return out


def vae_config(ddconfig: Mapping[str, Any]) -> dict[str, Any]:
    """The LDM VAE ddconfig -> diffusers AutoencoderKL arguments."""
    chans = [ddconfig["ch"] * m for m in ddconfig["ch_mult"]]
    return {"in_channels": ddconfig.get("in_channels", 3), "out_channels": ddconfig.get("out_ch", 3),
            "down_block_types": ["DownEncoderBlock2D"] * len(chans), "up_block_types": ["UpDecoderBlock2D"] * len(chans),
            "block_out_channels": chans, "layers_per_block": ddconfig["num_res_blocks"],
            "latent_channels": ddconfig["z_channels"], "norm_num_groups": 32,
            "sample_size": ddconfig.get("resolution", 256), "scaling_factor": VAE_SCALE}


def divot_config(args: Mapping[str, Any], frame_vit_pretrained: str | None = None) -> dict[str, Any]:
    """official_args.json -> `Divot` arguments."""
    enc = args["config"]["encoder"]
    code = args["config"].get("code_defaults", {})
    det = args["config"]["detok_resampler"]
    vit = args["config"]["frame_vit_openclip_cfg"]
    vision = vit["vision_cfg"]
    vit_config = {"image_size": vision["image_size"], "patch_size": vision["patch_size"], "width": vision["width"],
                  "layers": vision["layers"], "head_width": vision.get("head_width", 64),
                  "mlp_ratio": vision.get("mlp_ratio", 4.0), "output_dim": vit["embed_dim"]}
    pool = enc["pool_size"]
    num_frames_seen = enc["num_frames"]
    config: dict[str, Any] = dict(
        frame_vit={"pretrained": frame_vit_pretrained, "config": vit_config},
        image_size=args["config"].get("clip_hw", [256, 256])[0], vit_image_size=vision["image_size"],
        temporal_width=enc["width"], temporal_depth=enc["temporal_depth"], temporal_heads=code.get("temporal_heads", 12),
        hidden_size=enc["hidden_size"], pool_size=pool, st_depth=enc["transformer_depth"],
        st_heads=code.get("st_num_heads", 8), num_tokens=enc["down_num_tokens"], token_dim=enc["resampler_dim"],
        resampler_depth=enc["resampler_depth"], resampler_heads=code.get("down_resampler_heads", 16),
        resampler_head_dim=code.get("down_resampler_dim_head", 64), context_tokens=det["num_queries"],
        context_dim=det["output_dim"], context_depth=det["depth"], context_heads=det["heads"],
        context_head_dim=det["dim_head"])
    if num_frames_seen != 5:
        raise ValueError(f"the release's tokenizer sees 5 frames (0, 4, 8, 12, 15 of 16), not {num_frames_seen}")
    detok = args.get("detok_config")
    if detok:
        u = detok["unet"]
        config["unet"] = dict(
            in_channels=u["in_channels"], out_channels=u["out_channels"], model_channels=u["model_channels"],
            channel_mult=u["channel_mult"], num_res_blocks=u["num_res_blocks"],
            attention_resolutions=u["attention_resolutions"], num_head_channels=u["num_head_channels"],
            transformer_depth=u.get("transformer_depth", 1), dropout=u.get("dropout", 0.1),
            use_linear=u.get("use_linear", True), temporal_conv=u.get("temporal_conv", True),
            temporal_attention=u.get("temporal_attention", True), addition_attention=u.get("addition_attention", True),
            image_cross_attention=u.get("image_cross_attention", True),
            image_cross_attention_scale_learnable=u.get("image_cross_attention_scale_learnable", True),
            fs_condition=u.get("fs_condition", True), default_fs=u.get("default_fs", 3))
        config["vae"] = {"pretrained": None, "config": vae_config(detok["vae"]["ddconfig"]), "scaling_factor": VAE_SCALE}
        config["fs"] = detok.get("dynamicrafter", {}).get("fs", 3)
        config["video_size"] = detok.get("dynamicrafter", {}).get("image_size", 256)
    return config


_VAE_RENAMES = (("conv_norm_out.", "norm_out."), ("mid_block.resnets.0.", "mid.block_1."),
                ("mid_block.resnets.1.", "mid.block_2."), ("mid_block.attentions.0.group_norm.", "mid.attn_1.norm."),
                ("mid_block.attentions.0.to_q.", "mid.attn_1.q."), ("mid_block.attentions.0.to_k.", "mid.attn_1.k."),
                ("mid_block.attentions.0.to_v.", "mid.attn_1.v."),
                ("mid_block.attentions.0.to_out.0.", "mid.attn_1.proj_out."))


def vae_key_to_ldm(name: str, num_levels: int) -> str:
    """diffusers AutoencoderKL key -> the LDM layout (the inverse of diffusers' conversion)."""
    part, _, rest = name.partition(".")
    if part not in ("encoder", "decoder"):
        return name  # quant_conv, post_quant_conv
    for old, new in _VAE_RENAMES:
        if rest.startswith(old):
            return f"{part}.{new}{rest[len(old):]}"
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", rest)
    if not m:
        return name
    kind, level, sub, index, tail = m.groups()
    level = int(level) if kind == "down" else num_levels - 1 - int(level)  # LDM numbers up-blocks bottom-up
    tail = tail.replace("conv_shortcut.", "nin_shortcut.")
    if sub == "resnets":
        return f"{part}.{kind}.{level}.block.{index}.{tail}"
    return f"{part}.{kind}.{level}.{'downsample' if kind == 'down' else 'upsample'}.{tail}"


def official_vae_state(vae_state: Mapping[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Our VAE state (diffusers names) -> `first_stage_model.*` keys; attention Linears become 1x1 convs."""
    out = {}
    for key, value in vae_state.items():
        ldm = vae_key_to_ldm(key, num_levels)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out["first_stage_model." + ldm] = value
    return out


def official_state_dicts(model: Divot) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our Divot -> (Divot_tokenizer.bin state, Divot_detokenizer_stage1.bin state or {}): the inverse
    mapping (the text-tower leftovers are not written; the release's loader is not strict)."""
    tok: dict[str, torch.Tensor] = {}
    detok: dict[str, torch.Tensor] = {}
    vae: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("frame_vit.model."):
            tok["vit_model.model.visual." + key[len("frame_vit.model."):]] = value
        elif key.startswith("temporal_encoder.transformer.blocks."):
            m = re.match(r"temporal_encoder\.transformer\.blocks\.(\d+)\.(.*)", key)
            tok[f"temporal_encoder.transformer.resblocks.{m[1]}." + _swap(m[2], _TEMPORAL, reverse=True)] = value
        elif key.startswith(("temporal_encoder.", "norm.")):
            tok[key] = value
        elif key.startswith("st_transformer."):
            tok["image_proj_model." + key[len("st_transformer."):]] = value
        elif key.startswith("resampler."):
            name = key[len("resampler."):]
            tok["image_proj_model.down_sampler." + perceiver_key(name, reverse=True)] = \
                value[None] if name == "latents.weight" else value
        elif key.startswith("context_resampler."):
            name = key[len("context_resampler."):]
            detok["image_proj_model." + perceiver_key(name, reverse=True)] = value[None] if name == "latents.weight" \
                else value
        elif key.startswith("decoder.denoiser."):
            detok["diffusion_model." + key[len("decoder.denoiser."):]] = value
        elif key.startswith("decoder.vae.model."):
            vae[key[len("decoder.vae.model."):]] = value
        else:
            raise KeyError(f"no official name for {key!r}")
    if model.decoder is None:
        return tok, {}
    detok.update(official_vae_state(vae, len(model.decoder.vae.model.config.block_out_channels)))
    return tok, detok


def _unet_defaults() -> dict[str, Any]:
    import inspect

    from tokenizers_vis.nn.unet3d import VideoUNet

    params = inspect.signature(VideoUNet.__init__).parameters
    return {k: (list(p.default) if isinstance(p.default, tuple) else p.default) for k, p in params.items()
            if k not in ("self", "gradient_checkpointing")}


def official_args(model: Divot) -> dict[str, Any]:
    """official_args.json for one of ours (the inverse of `divot_config`)."""
    c = model.config
    vit = model.frame_vit.architecture()
    config = {
        "encoder": {"num_frames": len(model.frame_positions), "input_dim": vit["width"], "hidden_size": c["hidden_size"],
                    "width": c["temporal_width"], "temporal_depth": c["temporal_depth"], "pool_size": c["pool_size"],
                    "use_norm": True, "transformer_depth": c["st_depth"], "resampler_depth": c["resampler_depth"],
                    "st_num_tokens": len(model.frame_positions) * c["pool_size"] ** 2,
                    "down_num_tokens": c["num_tokens"], "resampler_dim": c["token_dim"]},
        "frame_vit_openclip_cfg": {"embed_dim": vit["output_dim"], "vision_cfg": {
            "image_size": vit["image_size"], "layers": vit["layers"], "width": vit["width"],
            "head_width": vit["head_width"], "patch_size": vit["patch_size"], "mlp_ratio": vit["mlp_ratio"]}},
        "code_defaults": {"temporal_heads": c["temporal_heads"], "st_num_heads": c["st_heads"],
                          "down_resampler_dim_head": c["resampler_head_dim"],
                          "down_resampler_heads": c["resampler_heads"]},
        "detok_resampler": {"dim": c["context_dim"], "depth": c["context_depth"], "dim_head": c["context_head_dim"],
                            "heads": c["context_heads"], "num_queries": c["context_tokens"],
                            "embedding_dim": c["token_dim"], "output_dim": c["context_dim"]},
        "clip_hw": [c["image_size"], c["image_size"]],
    }
    args: dict[str, Any] = {"config": config}
    if model.decoder is not None:
        vae = model.decoder.vae.model.config
        chans = list(vae.block_out_channels)
        args["detok_config"] = {
            "unet": {**_unet_defaults(), **{k: v for k, v in c["unet"].items() if k != "gradient_checkpointing"},
                     "context_dim": c["context_dim"]},
            "vae": {"embed_dim": vae.latent_channels, "ddconfig": {
                "double_z": True, "z_channels": vae.latent_channels, "resolution": vae.sample_size,
                "in_channels": vae.in_channels, "out_ch": vae.out_channels, "ch": chans[0],
                "ch_mult": [ch // chans[0] for ch in chans], "num_res_blocks": vae.layers_per_block,
                "attn_resolutions": [], "dropout": 0.0}},
            "dynamicrafter": {"fs": c["fs"], "image_size": c["video_size"], "num_frames": len(model.frame_positions)},
        }
    return args


def save_official_divot(model: Divot, directory: str | os.PathLike) -> Path:
    """Write one of ours in the released layout (`load_official_divot` reads it back)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tok, detok = official_state_dicts(model)
    torch.save(tok, path / TOKENIZER_NAME)
    if detok:
        torch.save(detok, path / DETOKENIZER_NAME)
    (path / ARGS_NAME).write_text(json.dumps(official_args(model), indent=1))
    return path


def is_official_divot_folder(directory: str | os.PathLike) -> bool:
    path = Path(directory)
    return path.is_dir() and (path / TOKENIZER_NAME).is_file() and (path / ARGS_NAME).is_file()


def load_official_divot(directory: str | os.PathLike, frame_vit_pretrained: str | None = None) -> Divot:
    """Our `Divot` from a folder in the official layout, loaded strictly (module docstring)."""
    path = Path(directory)
    args = json.loads((path / ARGS_NAME).read_text())
    state = convert_encoder_state(read_state_file(path / TOKENIZER_NAME))
    has_vit = any(k.startswith("frame_vit.") for k in state)
    config = divot_config(args, None if has_vit else (frame_vit_pretrained or RELEASED_FRAME_VIT))
    detok_path = path / DETOKENIZER_NAME
    if not detok_path.is_file():
        config.pop("unet", None)
        config.pop("vae", None)
    model = Divot(**config)
    if detok_path.is_file():
        state.update(convert_detokenizer_state(read_state_file(detok_path), config["vae"]["config"]))
    own = model.state_dict()
    if not has_vit:  # the frame ViT came from its pretrained source
        state.update({k: v for k, v in own.items() if k.startswith("frame_vit.")})
    if not detok_path.is_file():  # encoder only: the condition resampler stays as built (no decoding)
        state.update({k: v for k, v in own.items() if k.startswith("context_resampler.")})
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"official Divot weights do not match the model: missing {missing[:8]}, "
                       f"unexpected {unexpected[:8]}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def released_folder(cache_dir: str | os.PathLike) -> Path:
    """Fetch the released `TencentARC/Divot` tokenizer and stage-1 de-tokenizer (network or a Hub
    cache) into an official-layout folder under `cache_dir`, with `RELEASED_ARGS`. The frame ViT
    then comes from open_clip's laion2b ViT-H/14 when the file lacks it."""
    folder = Path(cache_dir) / "divot"
    folder.mkdir(parents=True, exist_ok=True)
    for name in (TOKENIZER_NAME, DETOKENIZER_NAME):
        link_released_file(RELEASED_REPO, name, folder,
                           f"and load DIR after writing DIR/{ARGS_NAME} (divot_official.RELEASED_ARGS).")
    (folder / ARGS_NAME).write_text(json.dumps(RELEASED_ARGS, indent=1))
    return folder


OFFICIAL_FORMAT = register_official_format(OfficialFormat(
    name="divot", recognise=is_official_divot_folder, load=load_official_divot,
    save=lambda model, path, **_: save_official_divot(model, path),
    presets={"divot": released_folder, RELEASED_REPO: released_folder}))
