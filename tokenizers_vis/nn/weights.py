"""Weight files: finding them, fetching the standard ones, reading them, and the one error for
missing ones.

Frozen helper networks (Inception for FID, VGG for LPIPS, teachers, VAEs) come from a path given
in the config, the torch hub cache or the Hugging Face cache. The standard metric and loss
weights that torch-fidelity, lpips and torchvision fetch on first use (`find_weights(url=...)`)
are fetched the same way when the network is allowed: torch.hub's download into the torch hub
cache, under the file name of the URL, whose hash part must prefix the file's sha256 (a corrupted
or tampered download is refused). `HF_HUB_OFFLINE=1` or `download=False` keeps everything
offline. A missing file is a `MissingWeightsError` that says which file, where to put it and which
option points at it.

`read_state_file` is the one reader of state-dict files (.safetensors, or torch's .bin / .pt /
.pth), loaded without unpickling code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors.torch import load_file
from torch.hub import HASH_REGEX, download_url_to_file

__all__ = ["MissingWeightsError", "downloads_allowed", "fetch_weights", "find_weights", "hub_checkpoint_dir",
           "read_state_file"]

log = logging.getLogger(__name__)

# The values huggingface_hub reads as true in HF_HUB_OFFLINE.
_TRUE = {"1", "ON", "YES", "TRUE"}


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights named in the config could not be found or loaded (offline, wrong path).

    A FileNotFoundError, hence also an OSError: callers that catch either keep working."""


def hub_checkpoint_dir() -> Path:
    """The folder torch.hub downloads checkpoints to (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def downloads_allowed(download: bool = True) -> bool:
    """Whether standard weights may be fetched: `download` and not HF_HUB_OFFLINE (read at call time)."""
    return bool(download) and os.environ.get("HF_HUB_OFFLINE", "").strip().upper() not in _TRUE


def fetch_weights(url: str, description: str = "pretrained weights", progress: bool = True) -> Path:
    """Download `url` into the torch hub cache as torch.hub does, and return the file.

    The file keeps the URL's name; the hash part of that name (``name-<hex>.ext``, torch.hub's
    convention) must prefix the sha256 of what arrived, else the download is deleted and refused.
    The transfer goes to a temporary name next to the target and is renamed only once checked, so
    an interrupted or concurrent fetch never leaves a partial file under the real name.

    Raises:
        MissingWeightsError: the transfer failed or the checksum does not match (the message says why).
    """
    name = os.path.basename(urlparse(url).path)
    match = HASH_REGEX.search(name)
    if not match or not match.group(1):
        raise ValueError(f"{url} names no sha256 prefix (name-<hex>.ext), so its download cannot be checked")
    target = hub_checkpoint_dir() / name
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{name}.{uuid.uuid4().hex}.download")
    log.info("downloading %s (%s) to %s", description, url, target)
    try:
        try:
            download_url_to_file(url, str(partial), progress=progress)
        except Exception as err:  # urllib, ssl and socket errors have no common base
            raise MissingWeightsError(f"{description}: downloading {url} into {target.parent} failed ({err}).") from err
        sha256 = hashlib.sha256()
        with open(partial, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha256.update(chunk)
        digest = sha256.hexdigest()
        if not digest.startswith(match.group(1)):
            raise MissingWeightsError(
                f"{description}: the download of {url} is corrupted or not the expected file: its sha256 is "
                f"{digest}, the file name requires the prefix {match.group(1)}. It was deleted; nothing was cached."
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def find_weights(
    path: str | os.PathLike | None,
    filenames: str | Sequence[str],
    option: str,
    description: str = "pretrained weights",
    url: str | None = None,
    download: bool = True,
    download_option: str = "download",
) -> Path:
    """Locate a weight file; fetch it into the torch hub cache when it is a standard one and allowed.

    Args:
        path: an explicit file, or a folder holding one of ``filenames``; when given it must
            exist (a typo should fail loudly, not silently fall back to another file, nor fetch one).
        filenames: accepted file names in the torch hub cache, the first being the canonical one
            that error messages name.
        option: the config option users set to point at the file, e.g. ``"inception_weights"``.
        description: what the weights are, for the error message.
        url: where the library that defines these weights fetches them (the file name is the
            URL's, with its sha256 prefix); None: never fetched.
        download: fetch a missing ``url`` file; off as well when HF_HUB_OFFLINE is set.
        download_option: the config option that turns fetching off, for the error message.

    Returns:
        The path of an existing file.

    Raises:
        MissingWeightsError: naming the file, the hub cache folder and ``option=PATH``.
    """
    names = [filenames] if isinstance(filenames, str) else list(filenames)
    if url is not None:
        names.append(os.path.basename(urlparse(url).path))  # where a fetch puts it
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
    if url is not None and downloads_allowed(download):
        try:
            return fetch_weights(url, description)
        except MissingWeightsError as err:
            raise MissingWeightsError(
                f"{err} Copy {names[0]} into {cache}, or set {option}=PATH to where it is.") from err
    if url is None:
        why = "and nothing is downloaded at run time"
    else:
        off = f"{download_option}=false" if not download else "HF_HUB_OFFLINE is set"
        why = f"and downloading is off ({off}); from a machine with network it comes from {url}"
    raise MissingWeightsError(
        f"{description}: the file {names[0]} was not found in the torch hub cache {cache} {why}. "
        f"Copy {names[0]} into {cache}, or set {option}=PATH to where it is."
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
