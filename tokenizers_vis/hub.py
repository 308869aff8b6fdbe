"""Saving and loading tokenizers: a folder (config.json + model.safetensors), a training
checkpoint (.ckpt, EMA weights by default), or a Hugging Face Hub id; pushing a folder to the Hub."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tokenizers_vis.models.base import Tokenizer, build_tokenizer
from tokenizers_vis.models.flextok_official import load_official as load_official_flextok
from tokenizers_vis.models.flextok_official import read_official_config as read_official_flextok_config
from tokenizers_vis.models.titok_official import is_official_titok_config, load_official
from tokenizers_vis.models.tokenflow_official import RELEASED as RELEASED_TOKENFLOW
from tokenizers_vis.models.tokenflow_official import (
    is_official_tokenflow_folder,
    load_official_tokenflow,
    released_folder,
)

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


class HubTokenError(RuntimeError):
    """No Hugging Face token for an upload."""


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
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if is_official_titok_config(config):
        # A released TiTok repo: official config and weight names, converted on the way in.
        return load_official(directory, config)
    if is_official_tokenflow_folder(directory):
        # An official TokenFlow checkpoint: official_args.json + model.pt, converted on the way in.
        return load_official_tokenflow(directory)
    flextok_config = read_official_flextok_config(directory)
    if flextok_config is not None:
        # A released FlexTok repo: Hydra `_target_` config (config.json or safetensors metadata).
        return load_official_flextok(directory, flextok_config)
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{directory} must hold {CONFIG_NAME} and {WEIGHTS_NAME}")
    return _tokenizer_from_state(config, load_file(str(weights_path)))


def _download(repo_id: str, revision: str | None = None) -> Path:
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


def _released_tokenflow(name: str) -> str | None:
    """The released TokenFlow file a preset name means: `tokenflow_siglip_32k`, its `.pt` file name, or
    `ByteFlow-AI/TokenFlow/<file>`; None for anything else (a local path of that name wins)."""
    if Path(name).exists():
        return None
    filename = name.rsplit("/", 1)[-1]
    filename = filename if filename.endswith(".pt") else filename + ".pt"
    if filename in RELEASED_TOKENFLOW and (name.count("/") == 0 or name.startswith("ByteFlow-AI/TokenFlow/")):
        return filename
    return None


def _cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "tokenizers_vis"


def load_tokenizer(path_or_id: str | os.PathLike, use_ema: bool = True, revision: str | None = None) -> Tokenizer:
    """Load a tokenizer in eval mode from a `.ckpt`, a saved folder, a Hub repo id, or the name of a
    released official checkpoint (`tokenflow_clipb_32k_enhanced`, `tokenflow_siglip_32k`).

    Training checkpoints give the EMA weights unless `use_ema=False`.
    """
    path = Path(path_or_id)
    released = _released_tokenflow(str(path_or_id))
    if released is not None:
        return load_official_tokenflow(released_folder(released, _cache_dir()))
    if path.is_file():
        return load_checkpoint(path, use_ema=use_ema)
    if path.is_dir():
        return load_folder(path)
    text = str(path_or_id)
    if text.endswith(".ckpt") or text.startswith((".", "/")) or text.count("/") != 1:
        raise FileNotFoundError(f"no checkpoint or tokenizer folder at {text!r}")
    return load_folder(_download(text, revision))


def hub_token(token: str | None = None) -> str:
    """`token`, else the one `huggingface_hub` finds (HF_TOKEN or a saved login); an error if none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubTokenError(
            "no Hugging Face token found: log in with `hf auth login` (`huggingface-cli login` on older "
            "huggingface_hub) or set HF_TOKEN to a token with write access (https://huggingface.co/settings/tokens)"
        )
    return token


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create the model repo `repo_id` (kept if it exists) and upload `folder` to it; returns its URL."""
    import huggingface_hub
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder to upload at {str(folder)!r}")
    token = hub_token(token)
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise OSError(f"cannot push to {repo_id!r}: HF_HUB_OFFLINE is set; unset it where there is network")
    api = HfApi(token=token)
    url = api.create_repo(repo_id=repo_id, private=private, repo_type="model", exist_ok=True)
    api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model",
        commit_message=commit_message or f"Upload {folder.name} with tokenizers_vis",
    )
    return str(url)
