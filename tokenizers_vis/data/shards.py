"""Shard files on disk: naming, writing, and resolving a user's shard spec to a file list.

A shard is a webdataset tar: each sample is `<key>.<ext>` entries sharing one key, with
the image under jpg/jpeg/png/webp and an optional `cls` (class index as text).
"""

from __future__ import annotations

import glob
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import braceexpand
import webdataset as wds

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# Fixed tar mtime so that writing the same samples twice gives identical bytes.
_TAR_MTIME = 0.0


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def brace_pattern(out_dir: str | Path, prefix: str, num_shards: int) -> str:
    """The brace pattern covering shards 0..num_shards-1, as the data configs accept it."""
    return f"{Path(out_dir)}/{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar"


def _to_bytes(value: bytes | str | int) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")


def write_shards(
    samples: Iterable[Mapping[str, bytes | str | int]],
    out_dir: str | Path,
    prefix: str,
    shard_size: int,
) -> list[Path]:
    """Write samples into `out_dir/{prefix}-000000.tar`, `-000001.tar`, ...; return the paths.

    Each sample maps "__key__" to a key without dots (webdataset splits the extension at
    the first dot) and extensions to already-encoded bytes, or to str/int for text fields
    such as "cls". Shards of this prefix left over from an earlier, larger write are
    removed, so that a glob over the folder sees exactly this set.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not prefix or re.search(r"[./\\]", prefix):
        raise ValueError(f"prefix must be a plain name without dots or slashes, got {prefix!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    writer = None
    count = 0
    try:
        for sample in samples:
            key = str(sample["__key__"])
            if "." in key:
                raise ValueError(f"sample key {key!r} contains a dot")
            if count % shard_size == 0:
                if writer is not None:
                    writer.close()
                paths.append(out_dir / shard_name(prefix, len(paths)))
                writer = wds.TarWriter(str(paths[-1]), encoder=False, mtime=_TAR_MTIME)
            record = {k: _to_bytes(v) for k, v in sample.items() if k != "__key__"}
            writer.write({"__key__": key, **record})
            count += 1
    finally:
        if writer is not None:
            writer.close()
    remove_stale_shards(out_dir, prefix, keep=len(paths))
    return paths


def write_encoded_shards(
    encode: Callable[[Any], tuple[Any, str | None]],
    jobs: Sequence,
    workers: int,
    out_dir: str | Path,
    prefix: str,
    shard_size: int,
    kind: str,
    unit: str,
    chunksize: int = 1,
) -> tuple[list[Path], int, list[str]]:
    """The shared loop of data/make_shards.py and data/make_video_shards.py: `encode(job)` gives
    (sample, None) or (None, error); run in a pool of `workers` processes when > 1 (`chunksize`
    jobs at a time), with a progress bar. Unreadable inputs are warned about ("skipping
    unreadable {kind}") and left out. Returns (shard paths, samples written, errors skipped)."""
    import multiprocessing

    from tqdm import tqdm

    skipped: list[str] = []
    written = 0

    def samples(results):
        nonlocal written
        for sample, error in tqdm(results, total=len(jobs), unit=unit, file=sys.stderr):
            if error is not None:
                skipped.append(error)
                tqdm.write(f"warning: skipping unreadable {kind} {error}", file=sys.stderr)
                continue
            written += 1
            yield sample

    if workers > 1:
        with multiprocessing.Pool(workers) as pool:
            paths = write_shards(samples(pool.imap(encode, jobs, chunksize=chunksize)), out_dir, prefix, shard_size)
    else:
        paths = write_shards(samples(map(encode, jobs)), out_dir, prefix, shard_size)
    return paths, written, skipped


def remove_stale_shards(out_dir: str | Path, prefix: str, keep: int) -> None:
    """Delete `{prefix}-NNNNNN.tar` files in `out_dir` numbered `keep` or above."""
    for path in Path(out_dir).glob(f"{glob.escape(prefix)}-*.tar"):
        match = re.fullmatch(re.escape(prefix) + r"-(\d{6})\.tar", path.name)
        if match and int(match.group(1)) >= keep:
            path.unlink()


def _is_remote(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def resolve_shards(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Turn a shard spec into the list of tar files it names, in a deterministic order.

    Accepts a brace pattern (`/x/train-{000000..000009}.tar`), a glob (`/x/train-*.tar`,
    braces allowed), a directory (its `*.tar` files), or a list of any of these. Remote
    urls (`s3://`, `pipe:`) are passed through to webdataset unchecked. Raises
    FileNotFoundError naming the spec when a local spec matches nothing, or when a brace
    pattern names files that do not exist (an incomplete download should not silently
    train on a subset).
    """
    if isinstance(spec, (str, Path)):
        specs = [str(spec)]
    else:
        specs = [str(s) for s in spec]
    if not specs:
        raise FileNotFoundError("empty shard list")
    urls: list[str] = []
    for item in specs:
        urls.extend(_resolve_one(item))
    return urls


def _resolve_one(spec: str) -> list[str]:
    if _is_remote(spec):
        return list(braceexpand.braceexpand(spec))
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
    elif glob.has_magic(path):
        found = sorted({f for pattern in braceexpand.braceexpand(path) for f in glob.glob(pattern)})
    else:
        names = list(braceexpand.braceexpand(path))
        missing = [n for n in names if not os.path.isfile(n)]
        if missing and len(missing) < len(names):
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise FileNotFoundError(f"{len(missing)} of {len(names)} shards of {spec!r} are missing: {shown}")
        found = [] if missing else names
    if not found:
        raise FileNotFoundError(f"no shard files match {spec!r}")
    return found
