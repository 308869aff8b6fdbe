"""Saving and loading tokenizers: a folder (config.json + model.safetensors), a training checkpoint
(.ckpt, EMA weights by default), a folder or file in a released official layout, a released
checkpoint's name, or a Hugging Face Hub id (read from the local cache when offline).

Models are rebuilt through the two registries that importing `tokenizers_vis.models` fills: the
tokenizer registry (models/base.py) for our own formats, the official-format registry
(models/official.py) for released ones. Nothing here names a model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tokenizers_vis.models.base import Tokenizer, build_tokenizer
from tokenizers_vis.models.official import find_official_format, find_preset

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Keys under which a training checkpoint stores the tokenizer weights, best first.
EMA_PREFIX = "ema."
RAW_PREFIX = "tokenizer."
# Checkpoint entry listing the EMA weights saved once, under RAW_PREFIX only: frozen parts (a
# pretrained VAE) and buffers, which the EMA copy holds unchanged.
EMA_SHARED_KEY = "ema_shared"


def save_pretrained(tokenizer: Tokenizer, directory: str | os.PathLike, extra_config: dict | None = None) -> Path:
    """Write `config.json` (enough to rebuild the model without Hydra) and `model.safetensors`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {**tokenizer.config, **(extra_config or {})}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in tokenizer.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "model_type": tokenizer.model_type})
    return directory


class CheckpointError(ValueError):
    """A file that is not a training checkpoint of this framework."""


def _tokenizer_from_state(config: dict[str, Any], state: dict[str, torch.Tensor]) -> Tokenizer:
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    tokenizer = build_tokenizer(config)
    tokenizer.load_state_dict(state, strict=True)
    return tokenizer.eval()


def checkpoint_state(checkpoint: dict[str, Any], use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The tokenizer weights inside a Lightning checkpoint of `TokenizerModule`."""
    state = checkpoint.get("state_dict", {})
    prefixes = (EMA_PREFIX, RAW_PREFIX) if use_ema else (RAW_PREFIX,)
    for prefix in prefixes:
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if weights:
            if prefix == EMA_PREFIX:
                weights.update({name: state[RAW_PREFIX + name] for name in checkpoint.get(EMA_SHARED_KEY, ())})
            return weights
    raise ValueError("checkpoint holds no tokenizer weights (no 'ema.*' or 'tokenizer.*' keys)")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a `TokenizerModule` checkpoint onto the CPU, with clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {str(path)!r}")
    try:
        # Lightning checkpoints pickle the optimizer partials in their hyper-parameters, which
        # `weights_only=True` refuses.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{path} is not a tokenizers_vis training checkpoint (torch.load failed: {err})") from err
    if not isinstance(checkpoint, dict) or "tokenizer_config" not in checkpoint:
        raise CheckpointError(f"{path} is not a tokenizers_vis training checkpoint (no 'tokenizer_config' entry)")
    return checkpoint


def tokenizer_from_checkpoint(checkpoint: dict[str, Any], use_ema: bool = True) -> Tokenizer:
    """Rebuild the tokenizer of a loaded checkpoint (EMA weights when kept, unless `use_ema=False`)."""
    return _tokenizer_from_state(checkpoint["tokenizer_config"], checkpoint_state(checkpoint, use_ema))


def load_checkpoint(path: str | os.PathLike, use_ema: bool = True) -> Tokenizer:
    return tokenizer_from_checkpoint(read_checkpoint(path), use_ema=use_ema)


def load_folder(directory: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a folder: a released layout that a registered official format recognises
    (converted on the way in), else one of ours (config.json + model.safetensors)."""
    directory = Path(directory)
    official = find_official_format(directory)
    if official is not None:
        return official.load(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{directory} must hold {CONFIG_NAME} and {WEIGHTS_NAME}")
    return _tokenizer_from_state(json.loads(config_path.read_text()), load_file(str(weights_path)))


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of Hub repo `repo_id` (a download, or the local cache offline); an OSError
    saying how to provide it when neither works."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except LocalEntryNotFoundError as err:
        raise OSError(
            f"could not download {repo_id!r} from the Hugging Face Hub (offline, HF_HUB_OFFLINE set, "
            f"or no cached copy). Download it where there is network "
            f"(`hf download {repo_id} --local-dir DIR`) and pass the local DIR instead."
        ) from err


def cache_dir() -> Path:
    """Where released checkpoints are assembled into the layout their format reads."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "tokenizers_vis"


def load_tokenizer(path_or_id: str | os.PathLike, use_ema: bool = True, revision: str | None = None) -> Tokenizer:
    """Load a tokenizer in eval mode from a `.ckpt`, a saved folder, a folder or file in a released
    layout, a Hub repo id, or the name of a released checkpoint that a registered official format
    knows (e.g. `tokenflow_siglip_32k`); a local path of that name wins over the preset.

    Training checkpoints give the EMA weights unless `use_ema=False`.
    """
    path = Path(path_or_id)
    text = str(path_or_id)
    preset = None if path.exists() else find_preset(text)
    if preset is not None:
        fmt, resolve = preset
        return fmt.load(resolve(cache_dir()))
    if path.is_file():
        official = find_official_format(path)
        if official is not None:
            return official.load(path)
        return load_checkpoint(path, use_ema=use_ema)
    if path.is_dir():
        return load_folder(path)
    if text.endswith(".ckpt") or text.startswith((".", "/")) or text.count("/") != 1:
        raise FileNotFoundError(f"no checkpoint or tokenizer folder at {text!r}")
    return load_folder(download(text, revision))
