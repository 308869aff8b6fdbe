"""The released LaCTok (Layton) checkpoint: config and weight conversion.

A folder in the official layout holds `LaCTok-T.pth`, the official `VQControlNet` state dict under
`model` (or `state_dict`, as the official loader reads it), and `official_args.json`: the sizes the
official constructor takes or hard-codes, as the reference fixture records them:

    vq_model_args     LlamaGen ModelArgs (codebook_size, codebook_embed_dim, codebook_l2_norm,
                      commit_loss_beta, encoder_ch_mult, z_channels, ...)
    vq_encoder        the VQ Encoder's ch and num_res_blocks
    controlnet_cond   conditioning_embedding_out_channels, cond_channels (= codebook_embed_dim)
    lora              r, lora_alpha (peft's default 8 when absent), target_modules
    unet_config       the SDXL UNet2DConditionModel config
    vae_config        the SDXL AutoencoderKL config (scaling_factor 0.13025)
    scheduler_config  the SDXL scheduler config; the release loads it into a DDIMScheduler and uses
                      only its alphas_cumprod
    image_size_sd     output side (latent grid = image_size_sd / 8)
    tokenizer_input_size  the side the VQ encoder sees (256 in the release: 16 x 16 ids)

`load_official_layton(folder)` builds our `Layton` from these and loads the weights strictly after
this one mapping (official -> ours; everything else keeps its name):

    decoder.unet.base_model.model.*   decoder.denoiser.unet.*         (the peft-LoRA UNet: our UNet
                                        carries the same peft layers, so `X.base_layer.*`,
                                        `X.lora_A.default.weight`, `X.lora_B.default.weight` keep
                                        their names; only peft's PeftModel/LoraModel levels go)
    decoder.controlnet.*              decoder.denoiser.controlnet.*   (diffusers ControlNetModel;
                                        `controlnet_cond_embedding.*` is LaCTok's stride-1 module,
                                        ours is `TokenMapEmbedding` under the same names)
    vae.*                             decoder.vae.model.*             (diffusers AutoencoderKL)
    encoder.*, quant_conv.*,          unchanged (our VQGANEncoder uses the LlamaGen names; the
      quantize.embedding.weight,        usage log and the unused post_quant_conv are kept as
      quantize.codebook_used,           buffers, so the file is written back unchanged)
      post_quant_conv.*

`official_state_dict(model)` is the inverse and `save_official_layton` writes a folder the official
constructor loads strictly; load -> save gives back the same tensors, bit for bit. Importing this
module registers the layout as the official format "layton" (models/official.py), with the
released file as a preset: `load_tokenizer("lactok")` (also `LaCTok-T`, `OPPOer/LaCTok`,
`OPPOer/LaCTok/LaCTok-T.pth`) fetches it (online, or from the Hub cache) and converts it.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tokenizers_vis.models.layton import LORA_TARGETS, SDXL_SCHEDULER, Layton
from tokenizers_vis.models.official import OfficialFormat, link_released_file, register_official_format
from tokenizers_vis.nn.weights import read_state_file

ARGS_NAME = "official_args.json"
WEIGHTS_NAME = "LaCTok-T.pth"
RELEASED_REPO = "OPPOer/LaCTok"
ARGS_FIELDS = ("vq_model_args", "vq_encoder", "controlnet_cond", "lora", "unet_config", "vae_config",
               "scheduler_config", "image_size_sd", "tokenizer_input_size")
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's default; the release does not set it and the file does not store it
VQ_NORM_GROUPS = 32  # LlamaGen's GroupNorm
RELEASE_COND_SCALE = 0.8  # demo.py

# official prefix -> ours (see the module docstring); the first match wins.
PREFIXES = (
    ("decoder.unet.base_model.model.", "decoder.denoiser.unet."),
    ("decoder.controlnet.", "decoder.denoiser.controlnet."),
    ("vae.", "decoder.vae.model."),
)

# The sizes of the released LaCTok-T: the official hard-coded values and SDXL base 1.0's configs.
SDXL_UNET_CONFIG = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-05,
    "cross_attention_dim": 2048, "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "upcast_attention": None, "resnet_time_scale_shift": "default",
    "conv_in_kernel": 3, "conv_out_kernel": 3, "time_embedding_type": "positional",
}
SDXL_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025,
    "force_upcast": True,
}
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
RELEASED_ARGS: dict[str, Any] = {
    "vq_model_args": {"codebook_size": 16384, "codebook_embed_dim": 8, "codebook_l2_norm": True,
                      "codebook_show_usage": True, "commit_loss_beta": 0.25, "entropy_loss_ratio": 0.0,
                      "encoder_ch_mult": [1, 1, 2, 2, 4], "decoder_ch_mult": [1, 1, 2, 2, 4], "z_channels": 256,
                      "dropout_p": 0.0},
    "vq_encoder": {"ch": 128, "num_res_blocks": 2, "in_channels": 3, "norm_type": "group", "resamp_with_conv": True},
    "controlnet_cond": {"conditioning_embedding_out_channels": [8, 32, 96, 256], "cond_channels": 8,
                        "in_channels": 4},
    "lora": {"r": 64, "lora_alpha": PEFT_DEFAULT_ALPHA, "target_modules": list(LORA_TARGETS)},
    "unet_config": SDXL_UNET_CONFIG,
    "vae_config": SDXL_VAE_CONFIG,
    "scheduler_config": SDXL_SCHEDULER_CONFIG,
    "image_size_sd": 1024,
    "tokenizer_input_size": 256,
}


def _accepted(cls, config: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a diffusers config that `cls.__init__` takes (drops `_class_name` and the
    keys of other classes, e.g. Euler-only options in the scheduler config the release reuses)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in params and not k.startswith("_")}


def layton_config(args: Mapping[str, Any]) -> dict[str, Any]:
    """Our Layton arguments for the official constructor's values (`official_args.json`)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    missing = [field for field in ARGS_FIELDS if field not in args]
    if missing:
        raise ValueError(f"{ARGS_NAME} lacks the fields {missing} (expected {list(ARGS_FIELDS)})")
    vq, encoder, cond, lora = args["vq_model_args"], args["vq_encoder"], args["controlnet_cond"], args["lora"]
    if not vq.get("codebook_l2_norm", True):
        raise ValueError("LaCTok's quantizer is l2-normalised; vq_model_args.codebook_l2_norm=false is not supported")
    if int(cond.get("cond_channels", vq["codebook_embed_dim"])) != int(vq["codebook_embed_dim"]):
        raise ValueError(f"controlnet_cond.cond_channels={cond['cond_channels']} must equal the code width "
                         f"vq_model_args.codebook_embed_dim={vq['codebook_embed_dim']}")
    vae_config = _accepted(AutoencoderKL, args["vae_config"])
    scheduler = {"name": "ddim", **_accepted(DDIMScheduler, args["scheduler_config"])}
    if scheduler.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"LaCTok's UNet predicts epsilon, the scheduler config says {scheduler['prediction_type']!r}")
    return {
        "image_size": int(args["image_size_sd"]),
        "tokenizer_input_size": int(args["tokenizer_input_size"]),
        "encoder_type": "cnn",
        "encoder_channels": int(encoder.get("ch", 128)),
        "encoder_channel_mult": list(vq.get("encoder_ch_mult", [1, 1, 2, 2, 4])),
        "encoder_num_res_blocks": int(encoder.get("num_res_blocks", 2)),
        "z_channels": int(vq.get("z_channels", 256)),
        "encoder_norm_groups": VQ_NORM_GROUPS,
        "codebook_size": int(vq["codebook_size"]),
        "codebook_dim": int(vq["codebook_embed_dim"]),
        "commitment_weight": float(vq.get("commit_loss_beta", 0.25)),
        "unet": {"pretrained": None, "subfolder": None, "config": _accepted(UNet2DConditionModel, args["unet_config"])},
        "cond_embedding_widths": list(cond["conditioning_embedding_out_channels"]),
        "lora_rank": int(lora["r"]),
        "lora_alpha": float(lora.get("lora_alpha", PEFT_DEFAULT_ALPHA)),
        "lora_targets": list(lora.get("target_modules", LORA_TARGETS)),
        "vae": {"pretrained": None, "subfolder": None, "config": vae_config,
                "scaling_factor": vae_config.get("scaling_factor")},
        "scheduler": scheduler,
        "cond_scale": RELEASE_COND_SCALE,
        "sampling_steps": 3,
    }


def official_args(model: Layton) -> dict[str, Any]:
    """The `official_args.json` that describes `model` (the inverse of `layton_config`)."""
    config = model.config
    if config["encoder_type"] != "cnn" or model.lora_rank < 1 or model.vae is None:
        raise ValueError("the LaCTok layout holds a CNN-encoder Layton with a LoRA UNet and a VAE "
                         f"(encoder_type={config['encoder_type']!r}, lora_rank={model.lora_rank}, "
                         f"pixel_space={model.pixel_space})")
    scheduler = {k: v for k, v in dict(config["scheduler"] or SDXL_SCHEDULER).items() if k != "name"}
    return {
        "vq_model_args": {"codebook_size": config["codebook_size"], "codebook_embed_dim": config["codebook_dim"],
                          "codebook_l2_norm": True, "codebook_show_usage": True,
                          "commit_loss_beta": config["commitment_weight"], "entropy_loss_ratio": 0.0,
                          "encoder_ch_mult": list(config["encoder_channel_mult"]),
                          "z_channels": config["z_channels"], "dropout_p": 0.0},
        "vq_encoder": {"ch": config["encoder_channels"], "num_res_blocks": config["encoder_num_res_blocks"],
                       "in_channels": 3, "norm_type": "group", "resamp_with_conv": True},
        "controlnet_cond": {"conditioning_embedding_out_channels": list(config["cond_embedding_widths"]),
                            "cond_channels": config["codebook_dim"], "in_channels": model.vae.latent_channels},
        "lora": {"r": config["lora_rank"], "lora_alpha": config["lora_alpha"],
                 "target_modules": list(config["lora_targets"])},
        "unet_config": config["unet"]["config"],
        "vae_config": {**config["vae"]["config"], "scaling_factor": model.vae.scaling_factor},
        "scheduler_config": scheduler,
        "image_size_sd": config["image_size"],
        "tokenizer_input_size": config["tokenizer_input_size"],
    }


def _rename(name: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for source, target in pairs:
        if name.startswith(source):
            return target + name[len(source):]
    return name


def convert_official_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official VQControlNet state dict -> ours (see the module docstring)."""
    return {_rename(name, PREFIXES): tensor for name, tensor in state.items()}


def official_state_dict(model: Layton) -> dict[str, torch.Tensor]:
    """Our Layton's weights in the official layout (the inverse of `convert_official_state`)."""
    inverse = tuple((ours, official) for official, ours in PREFIXES)
    return {_rename(name, inverse): tensor.detach() for name, tensor in model.state_dict().items()}


def is_official_layton_folder(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    return (directory / ARGS_NAME).is_file() and (directory / WEIGHTS_NAME).is_file()


def load_official_layton(directory: str | os.PathLike) -> Layton:
    """Our Layton (eval mode) from a folder with `official_args.json` and `LaCTok-T.pth`."""
    directory = Path(directory)
    args = json.loads((directory / ARGS_NAME).read_text())
    path = directory / WEIGHTS_NAME
    state = read_state_file(path, wrappers=("model", "state_dict"), what="LaCTok state dict")
    model = Layton(**layton_config(args))
    try:
        model.load_state_dict(convert_official_state(state), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not match the LaCTok that {ARGS_NAME} describes: {err}") from err
    return model.eval()


def save_official_layton(model: Layton, directory: str | os.PathLike, args: Mapping[str, Any] | None = None) -> Path:
    """Write `model` as an official-layout folder: `official_args.json` (`args`, default: derived from
    the model) and `LaCTok-T.pth` with the state dict under "model"."""
    if not isinstance(model, Layton):
        raise TypeError(f"save_official_layton writes Layton models, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = dict(args) if args is not None else official_args(model)
    (directory / ARGS_NAME).write_text(json.dumps(payload, indent=2))
    state = {name: tensor.cpu().contiguous() for name, tensor in official_state_dict(model).items()}
    torch.save({"model": state}, directory / WEIGHTS_NAME)
    return directory


def released_folder(cache_dir: str | os.PathLike) -> Path:
    """Fetch `OPPOer/LaCTok`'s LaCTok-T.pth (needs network or a Hub cache) into an official-layout
    folder under `cache_dir`, with the released sizes as its official_args.json."""
    folder = Path(cache_dir) / "LaCTok-T"
    folder.mkdir(parents=True, exist_ok=True)
    link_released_file(RELEASED_REPO, WEIGHTS_NAME, folder, f", write DIR/{ARGS_NAME} "
                       "(tokenizers_vis.models.layton_official.RELEASED_ARGS) and pass DIR instead.")
    (folder / ARGS_NAME).write_text(json.dumps(RELEASED_ARGS, indent=2))
    return folder


def _preset_names() -> dict[str, Any]:
    """The released file by short name, file name or Hub path; each resolves to `released_folder`."""
    names = ("lactok", "LaCTok-T", WEIGHTS_NAME, RELEASED_REPO, f"{RELEASED_REPO}/{WEIGHTS_NAME}",
             f"{RELEASED_REPO}/LaCTok-T")
    return {name: released_folder for name in names}


OFFICIAL_FORMAT = register_official_format(OfficialFormat(
    name="layton", recognise=is_official_layton_folder, load=load_official_layton, save=save_official_layton,
    presets=_preset_names(),
))
