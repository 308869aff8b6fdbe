"""The official TokenFlow (ByteFlow-AI/TokenFlow) checkpoints: config and weight conversion.

A folder in the official layout holds `official_args.json` (the official `ModelArgs` fields, plus
an optional `overrides` object for models whose hard-coded sizes differ, shaped like the reference
fixtures' `tiny_overrides`) and `model.pt`, the official checkpoint (state dict bare or under
`model`, `ema` or `state_dict`). `load_official_tokenflow(folder)` builds our `TokenFlow` from the
arguments and loads the weights strictly after this mapping (official -> ours):

    encoder_vqkd.*                       semantic_encoder.model.*  (the teacher-initialised tower;
                                           open_clip / transformers use the official names; a
                                           transformers-4 `vision_model.` level is dropped)
    decoder_vqkd.{cls_token,pos_embed,   semantic_decoder.{...}     (same names)
        patch_embed.proj.*, fc_norm.*}
    decoder_vqkd.blocks.{i}.*            semantic_decoder.transformer.blocks.{i}.*
    decoder_vqkd.blocks.{i}.attn.q_bias  semantic_decoder.transformer.blocks.{i}.attn.qkv.bias
        + attn.v_bias                      = cat(q_bias, 0, v_bias): the official attention has
                                           no k bias, and one would not change the output
    quantize.embedding_vqkd.weight       quantize.quantizer.semantic_codebook.weight
    quantize.embedding_vqgan.weight      quantize.quantizer.pixel_codebook.weight
    quantize.codebook_used               dropped: a usage log the official code writes in training
    scaling_layer.{shift,scale}          dropped: SigLIP's fixed input scaling (checked to be 0.5,
                                           0.5: then it is a clamp to [-1, 1], which we apply)
    encoder.*, decoder.*, quant_conv.*,  unchanged (our VQGAN CNN uses the official names)
        post_quant_conv.*, encode_task_layer.*, decode_task_layer.*

`official_state_dict(model)` is the inverse, so our trained models can be written back in the
official layout. Released files (when online) are named in `RELEASED`. Importing this module
registers the layout as the official format "tokenflow" (models/official.py), with the released
files as presets: `load_tokenizer("tokenflow_siglip_32k")` (also `tokenflow_siglip_32k.pt` and
`ByteFlow-AI/TokenFlow/tokenflow_siglip_32k.pt`) fetches and converts one.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tokenizers_vis.models.official import OfficialFormat, link_released_file, register_official_format
from tokenizers_vis.models.tokenflow import TokenFlow
from tokenizers_vis.nn.vision_towers import official_key_to_ours, ours_key_to_official
from tokenizers_vis.nn.weights import read_state_file

ARGS_NAME = "official_args.json"
WEIGHTS_NAME = "model.pt"
RELEASED_REPO = "ByteFlow-AI/TokenFlow"
# The released checkpoints of ByteFlow-AI/TokenFlow and the ModelArgs they were built with.
RELEASED: dict[str, dict[str, Any]] = {
    "tokenflow_clipb_32k_enhanced.pt": {
        "teacher": "clipb_224", "enhanced_decoder": True, "infer_interpolate": True, "codebook_size": 32768,
        "codebook_embed_dim": 8, "semantic_code_dim": 32, "commit_loss_beta": 0.25, "z_channels": 256,
        "encoder_ch_mult": [1, 1, 2, 2, 4], "decoder_ch_mult": [1, 1, 2, 2, 4],
    },
    "tokenflow_siglip_32k.pt": {
        "teacher": "siglip_384", "enhanced_decoder": False, "infer_interpolate": False, "codebook_size": 32768,
        "codebook_embed_dim": 8, "semantic_code_dim": 32, "commit_loss_beta": 0.25, "z_channels": 256,
        "encoder_ch_mult": [1, 1, 2, 2, 4], "decoder_ch_mult": [1, 1, 2, 2, 4],
    },
}

# Sizes the official constructor hard-codes, per teacher.
CLIP_B16 = {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "heads": 12, "output_dim": 512}
SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                 "num_attention_heads": 16, "image_size": 384, "patch_size": 14}
TEACHERS = {
    "clipb_224": {"decoder_out_dim": 512, "vit_width": 768, "decoder_img_size": 224,
                  "scales": [1, 2, 4, 6, 8, 10, 12, 14], "scales_interpolated": [1, 2, 4, 6, 8, 10, 12, 14, 16]},
    "siglip_384": {"decoder_out_dim": 1152, "vit_width": 1152, "decoder_img_size": 432,
                   "scales": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 17, 22, 27], "output_size": 384},
}
VIT_DEFAULT_HEADS = 12
VIT_DEFAULT_PATCH = 16
PIXEL_CHANNELS = 128
ENHANCED_CHANNELS, ENHANCED_RES_BLOCKS = 256, 4
SIGLIP_SCALING = 0.5  # ScalingLayerForSigLip's shift and scale

def tokenflow_config(args: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Our TokenFlow arguments for the official ModelArgs (+ size overrides, as in the fixtures)."""
    overrides = dict(overrides or {})
    teacher = args.get("teacher")
    if teacher not in TEACHERS:
        raise ValueError(f"unsupported official TokenFlow teacher {teacher!r}; expected one of {sorted(TEACHERS)}")
    facts = TEACHERS[teacher]
    tower = dict(overrides.get("semantic_encoder") or {})
    tower.pop("kind", None)
    vit = dict(overrides.get("vit_defaults") or {})
    pixel = dict(overrides.get("pixel_cnn") or {})
    if teacher == "clipb_224":
        clip = {**CLIP_B16, **tower}
        if "input_resolution" in clip:
            clip["image_size"] = clip.pop("input_resolution")
        semantic_encoder = {"kind": "openai_clip", "pretrained": None, "config": clip}
        teacher = {"kind": "openai_clip", "pretrained": "ViT-B-16/openai"}
        default_scales = facts["scales_interpolated" if args.get("infer_interpolate") else "scales"]
        scales = list(overrides.get("scale_rq_layers") or default_scales)
        image_size = scales[-1] * clip["patch_size"]
        vit_width = vit.get("embed_dim_replacing_768", facts["vit_width"])
    else:
        siglip = {**SIGLIP_SO400M, **dict(tower.get("config") or {})}
        semantic_encoder = {"kind": "siglip", "pretrained": None, "config": siglip}
        teacher = {"kind": "siglip", "pretrained": "google/siglip-so400m-patch14-384"}
        scales = list(overrides.get("scale_rq_layers") or facts["scales"])
        image_size = siglip["image_size"]
        vit_width = vit.get("embed_dim", facts["vit_width"])
    enhanced = bool(args.get("enhanced_decoder"))
    encoder_channels = pixel.get("encoder_ch", PIXEL_CHANNELS)
    if enhanced:
        decoder_channels = pixel.get("enhanced_decoder_ch", ENHANCED_CHANNELS)
        decoder_res_blocks = ENHANCED_RES_BLOCKS
    else:
        decoder_channels = pixel.get("decoder_ch", PIXEL_CHANNELS)
        decoder_res_blocks = 2
    return {
        "image_size": image_size,
        "semantic_encoder": semantic_encoder,
        "semantic_code_dim": args.get("semantic_code_dim", 32),
        "pixel_code_dim": args.get("codebook_embed_dim", 8),
        "semantic_decoder_width": vit_width,
        "semantic_decoder_depth": 3,
        "semantic_decoder_heads": vit.get("num_heads", VIT_DEFAULT_HEADS),
        "semantic_decoder_grid": facts["decoder_img_size"] // vit.get("patch_size", VIT_DEFAULT_PATCH),
        "semantic_out_dim": facts["decoder_out_dim"],
        "pixel_channels": encoder_channels,
        "pixel_channel_mult": list(args.get("encoder_ch_mult", [1, 1, 2, 2, 4])),
        "pixel_num_res_blocks": 2,
        "z_channels": args.get("z_channels", 256),
        "decoder_channels": decoder_channels,
        "decoder_channel_mult": list(args.get("decoder_ch_mult", args.get("encoder_ch_mult", [1, 1, 2, 2, 4]))),
        "decoder_num_res_blocks": decoder_res_blocks,
        "codebook_size": args.get("codebook_size", 32768),
        "commitment_weight": args.get("commit_loss_beta", 0.25),
        "scales": scales,
        "output_size": facts.get("output_size"),
        # The tower's weights come from the checkpoint; distillation (fine-tuning) needs the real
        # teacher, except for shrunken test models, whose teacher is their own random tower.
        "teacher": None if tower else teacher,
    }


# Renamed entries and prefixes, official -> ours (the tower prefix goes through the tower's own
# mapping; the semantic decoder's q/v biases are merged into one packed qkv bias).
RENAMED = {"quantize.embedding_vqkd.weight": "quantize.quantizer.semantic_codebook.weight",
           "quantize.embedding_vqgan.weight": "quantize.quantizer.pixel_codebook.weight"}
PREFIXES = (("decoder_vqkd.blocks.", "semantic_decoder.transformer.blocks."), ("decoder_vqkd.", "semantic_decoder."))
_QV_BIAS = re.compile(r"^(decoder_vqkd\.blocks\.\d+\.attn\.)([qv])_bias$")


def _rename(name: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for source, target in pairs:
        if name.startswith(source):
            return target + name[len(source):]
    return name


def convert_official_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official TokenFlow state dict -> ours (see the module docstring)."""
    ours: dict[str, torch.Tensor] = {}
    biases: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name == "quantize.codebook_used":
            continue
        if name.startswith("scaling_layer."):
            if not torch.allclose(tensor.float(), torch.full_like(tensor.float(), SIGLIP_SCALING)):
                raise ValueError(f"{name} is not the official constant {SIGLIP_SCALING}; this converter assumes it")
            continue
        qv = _QV_BIAS.match(name)
        if qv:
            biases.setdefault(_rename(qv.group(1), PREFIXES) + "qkv.bias", {})[qv.group(2)] = tensor
        elif name.startswith("encoder_vqkd."):
            ours["semantic_encoder." + official_key_to_ours(name[len("encoder_vqkd."):])] = tensor
        else:
            ours[RENAMED.get(name, _rename(name, PREFIXES))] = tensor
    for key, parts in biases.items():
        if set(parts) != {"q", "v"}:
            raise ValueError(f"official semantic decoder block has {sorted(parts)} biases for {key}; expected q and v")
        ours[key] = torch.cat([parts["q"], torch.zeros_like(parts["q"]), parts["v"]])
    return ours


def official_state_dict(model: TokenFlow) -> dict[str, torch.Tensor]:
    """Our TokenFlow's weights in the official layout (the inverse of `convert_official_state`)."""
    back = {ours: official for official, ours in RENAMED.items()}
    inverse = tuple((target, source) for source, target in PREFIXES)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if name.startswith("semantic_encoder."):
            out["encoder_vqkd." + ours_key_to_official(name[len("semantic_encoder."):])] = tensor
        elif name.startswith("semantic_decoder.") and name.endswith("attn.qkv.bias"):
            q, _, v = tensor.chunk(3)  # the k part is zero and has no official counterpart
            base = _rename(name, inverse)[: -len("qkv.bias")]
            out[base + "q_bias"], out[base + "v_bias"] = q.clone(), v.clone()
        else:
            out[back.get(name, _rename(name, inverse))] = tensor
    # The usage log the official quantizer keeps (a fixed 131072 entries), empty.
    out["quantize.codebook_used"] = torch.zeros(131072)
    if model.semantic_encoder_spec.get("kind") == "siglip":
        for key in ("shift", "scale"):
            out[f"scaling_layer.{key}"] = torch.full((1, 3, 1, 1), SIGLIP_SCALING)
    return out


def is_official_tokenflow_folder(directory: str | os.PathLike) -> bool:
    path = Path(directory) / ARGS_NAME
    if not path.is_file():
        return False
    # LaCTok's release folder holds an official_args.json too; TokenFlow's names its teacher.
    try:
        return "teacher" in json.loads(path.read_text())
    except ValueError:
        return True  # unreadable: the TokenFlow loader reports it



def load_official_tokenflow(directory: str | os.PathLike, weights: str | None = None) -> TokenFlow:
    """Our TokenFlow (eval mode) from a folder with `official_args.json` and the official checkpoint."""
    directory = Path(directory)
    args = json.loads((directory / ARGS_NAME).read_text())
    overrides = args.pop("overrides", None)
    path = directory / (weights or WEIGHTS_NAME)
    if not path.is_file():
        candidates = sorted(p.name for p in directory.glob("*.pt"))
        if len(candidates) != 1:
            raise FileNotFoundError(f"{directory} has {ARGS_NAME} but no {WEIGHTS_NAME} (found .pt files: {candidates})")
        path = directory / candidates[0]
    # Official checkpoints may also hold the training `args` (an argparse.Namespace): allow that one
    # class, nothing else, when unpickling.
    state = read_state_file(path, wrappers=("ema", "model", "state_dict"), allowed_classes=[argparse.Namespace],
                            what="TokenFlow state dict")
    model = TokenFlow(**tokenflow_config(args, overrides))
    try:
        model.load_state_dict(convert_official_state(state), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not match the TokenFlow that {ARGS_NAME} describes: {err}") from err
    return model.eval()


def save_official_tokenflow(model: TokenFlow, directory: str | os.PathLike, args: Mapping[str, Any],
                            overrides: Mapping[str, Any] | None = None) -> Path:
    """Write `model` as an official-layout folder (official_args.json + model.pt under "model")."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = dict(args)
    if overrides:
        payload["overrides"] = dict(overrides)
    (directory / ARGS_NAME).write_text(json.dumps(payload, indent=2))
    state = {name: tensor.cpu().contiguous() for name, tensor in official_state_dict(model).items()}
    torch.save({"model": state}, directory / WEIGHTS_NAME)
    return directory


def released_folder(filename: str, cache_dir: str | os.PathLike) -> Path:
    """Fetch a released checkpoint of `RELEASED_REPO` (needs network or a Hub cache) into an
    official-layout folder under `cache_dir`, writing the ModelArgs it was built with."""
    if filename not in RELEASED:
        raise KeyError(f"unknown released TokenFlow file {filename!r}; known: {sorted(RELEASED)}")
    folder = Path(cache_dir) / Path(filename).stem
    folder.mkdir(parents=True, exist_ok=True)
    link_released_file(RELEASED_REPO, filename, folder,
                       f"and pass DIR/{filename}'s folder with an {ARGS_NAME} instead.", link_name=WEIGHTS_NAME)
    (folder / ARGS_NAME).write_text(json.dumps(RELEASED[filename], indent=2))
    return folder


def _preset_names() -> dict[str, Any]:
    """Each released file as `tokenflow_siglip_32k` or `ByteFlow-AI/TokenFlow/tokenflow_siglip_32k`,
    with or without `.pt`."""
    presets = {}
    for filename in RELEASED:
        resolve = functools.partial(released_folder, filename)  # resolve(cache_dir)
        for name in (Path(filename).stem, filename):
            presets[f"{RELEASED_REPO}/{name}"] = resolve
            presets[name] = resolve
    return presets


OFFICIAL_FORMAT = register_official_format(OfficialFormat(
    name="tokenflow", recognise=is_official_tokenflow_folder, load=load_official_tokenflow,
    save=save_official_tokenflow, presets=_preset_names(),
))
