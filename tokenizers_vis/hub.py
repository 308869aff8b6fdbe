"""Pushing a tokenizer folder to the Hugging Face Hub.

Saving and loading live in `tokenizers_vis.models.loading`; their names are re-exported here, so
`from tokenizers_vis.hub import load_tokenizer` keeps working.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers_vis.models.loading import (
    CONFIG_NAME,
    EMA_PREFIX,
    EMA_SHARED_KEY,
    RAW_PREFIX,
    WEIGHTS_NAME,
    CheckpointError,
    checkpoint_state,
    load_checkpoint,
    load_folder,
    load_tokenizer,
    read_checkpoint,
    save_pretrained,
    tokenizer_from_checkpoint,
)

__all__ = [
    "CONFIG_NAME", "EMA_PREFIX", "EMA_SHARED_KEY", "RAW_PREFIX", "WEIGHTS_NAME", "CheckpointError", "HubTokenError",
    "checkpoint_state", "hub_token", "load_checkpoint", "load_folder", "load_tokenizer", "push_to_hub",
    "read_checkpoint", "save_pretrained", "tokenizer_from_checkpoint",
]


class HubTokenError(RuntimeError):
    """No Hugging Face token for an upload."""


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
