"""Weight files, offline: finding them, reading them, and the one error for missing ones.

Frozen helper networks (Inception for FID, VGG for LPIPS, teachers, VAEs) are never downloaded
by this package at run time: their weights come from a path given in the config, the torch hub
cache or the Hugging Face cache, and a missing file is a `MissingWeightsError` that says which
file, where to put it and which option points at it.

`read_state_file` is the one reader of state-dict files (.safetensors, or torch's .bin / .pt /
.pth), loaded without unpickling code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

__all__ = ["MissingWeightsError", "find_weights", "hub_checkpoint_dir", "read_state_file"]


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights named in the config could not be found or loaded (offline, wrong path).

    A FileNotFoundError, hence also an OSError: callers that catch either keep working."""


def hub_checkpoint_dir() -> Path:
    """The folder torch.hub downloads checkpoints to (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights(
    path: str | os.PathLike | None,
    filenames: str | Sequence[str],
    option: str,
    description: str = "pretrained weights",
) -> Path:
    """Locate a weight file without downloading anything.

    Args:
        path: an explicit file, or a folder holding one of ``filenames``; when given it must
            exist (a typo should fail loudly, not silently fall back to another file).
        filenames: accepted file names in the torch hub cache, the first being the canonical one
            that error messages name.
        option: the config option users set to point at the file, e.g. ``"inception_weights"``.
        description: what the weights are, for the error message.

    Returns:
        The path of an existing file.

    Raises:
        MissingWeightsError: naming the file, the hub cache folder and ``option=PATH``.
    """
    names = [filenames] if isinstance(filenames, str) else list(filenames)
    cache = hub_checkpoint_dir()
    if path is not None:
        given = Path(path).expanduser()
        if given.is_file():
            return given
        if given.is_dir():
            for name in names:
                if (given / name).is_file():
                    return given / name
        raise MissingWeightsError(
            f"{description}: {option}={given} does not exist or holds none of {names}. "
            f"Point {option}=PATH at the file {names[0]}, or put it in the torch hub cache {cache}."
        )
    for name in names:
        if (cache / name).is_file():
            return cache / name
    raise MissingWeightsError(
        f"{description}: the file {names[0]} was not found in the torch hub cache {cache} and "
        f"nothing is downloaded at run time. Copy {names[0]} into {cache}, or set {option}=PATH "
        "to where it is."
    )


def _is_state(value: object) -> bool:
    return isinstance(value, Mapping) and all(isinstance(v, torch.Tensor) for v in value.values())


def read_state_file(
    path: str | os.PathLike,
    wrappers: Sequence[str] = ("state_dict", "model"),
    allowed_classes: Sequence[type] = (),
    what: str = "state dict",
) -> dict[str, torch.Tensor]:
    """The state dict in a weight file: `.safetensors`, else a torch file (`.bin`, `.pt`, `.pth`, ...).

    Torch files load with `weights_only=True` (no code runs); `allowed_classes` are the extra
    classes such a file may pickle (e.g. the `argparse.Namespace` of training arguments). A torch
    file may hold the state dict bare or under the first of `wrappers` it has (a training script's
    `{"state_dict": ...}` or `{"model": ...}`). `what` names the expected content in errors.

    Raises FileNotFoundError for a missing file and ValueError, naming the file, for one that
    cannot be read or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weight file at {str(path)!r}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        with torch.serialization.safe_globals(list(allowed_classes)):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip errors have no common base
        raise ValueError(f"{path} is not a readable .safetensors or torch weight file ({err})") from err
    if isinstance(content, Mapping):
        for key in wrappers:
            if isinstance(content.get(key), Mapping):
                return dict(content[key])
        if _is_state(content):
            return dict(content)
    looked = f" and under {'/'.join(wrappers)}" if wrappers else ""
    raise ValueError(f"{path} holds no {what} (looked for a bare one{looked}; got {type(content).__name__})")
