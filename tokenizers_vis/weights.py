"""Finding pretrained weight files offline.

Frozen helper networks (Inception for FID, VGG for LPIPS) are never downloaded by this
package: their weights come from a path given in the config or from the torch hub cache,
and a missing file is an error that says which file, where to put it and which option
points at it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["MissingWeightsError", "find_weights", "hub_checkpoint_dir"]


class MissingWeightsError(FileNotFoundError):
    """A pretrained weight file needed offline is neither at the given path nor in the hub cache."""


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
