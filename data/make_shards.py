#!/usr/bin/env python
"""Pack a folder of images into webdataset shards that the data configs read.

    python data/make_shards.py SRC OUT [--shard-size 1000] [--prefix train] [--max-images N] [--captions FILE|DIR]

SRC is either a folder of images (searched recursively) or an ImageFolder tree
(SRC/<class>/<image>): when SRC holds only sub-folders, each one is a class, the sample's
"cls" is the index of its name in sorted order, and OUT/classes.json lists the names.
JPEG, PNG and WebP files are stored byte for byte; other formats are re-encoded as PNG.
Every image is fully decoded first; unreadable ones are skipped with a warning and counted.
Captions (image + text data, webdataset "txt"): `--captions` names a JSON file mapping each
image's path relative to SRC (or its sample key) to its caption, or a folder holding
`<relative path without suffix>.txt` per image; images without a caption are skipped with a warning.
Images are written in a seeded random order (`--no-shuffle` keeps the sorted order), so
that each shard mixes classes. The summary goes to stderr and the last line on stdout is
the brace pattern of the shards, e.g. `OUT/train-{000000..000012}.tar`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
from pathlib import Path

from PIL import Image

from tokenizers_vis.data.pipeline import list_image_files
from tokenizers_vis.data.shards import brace_pattern, write_encoded_shards

# Formats kept as they are (the loader decodes them); the value is the shard extension.
KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


def plan(src: Path, flat: bool) -> tuple[list[tuple[Path, str, int]], list[str] | None]:
    """(path, key, label) for every image under src, and the class names of a tree."""
    files = list_image_files(src)
    classes = None
    if not flat and not any(p.parent == src for p in files):
        classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
        classes = classes or None
    index = {name: i for i, name in enumerate(classes or [])}
    jobs, seen = [], set()
    for path in files:
        rel = path.relative_to(src)
        # webdataset splits a sample's key from its extension at the first dot.
        key = rel.with_suffix("").as_posix().replace(".", "_")
        unique, n = key, 1
        while unique in seen:
            unique, n = f"{key}_{n}", n + 1
        seen.add(unique)
        jobs.append((path, unique, index[rel.parts[0]] if classes else -1))
    return jobs, classes


def read_captions(source: Path, src: Path, jobs: list[tuple[Path, str, int]]) -> dict[str, str]:
    """key -> caption from a sidecar JSON file (relative path or key -> caption) or folder of .txt files."""
    if source.is_dir():
        captions = {}
        for path, key, _ in jobs:
            sidecar = source / path.relative_to(src).with_suffix(".txt")
            if sidecar.is_file():
                captions[key] = sidecar.read_text(encoding="utf-8").strip()
        return captions
    table = json.loads(source.read_text(encoding="utf-8"))
    if not isinstance(table, dict):
        raise ValueError(f"{source} must map image paths (relative to the source folder) or keys to captions")
    captions = {}
    for path, key, _ in jobs:
        rel = path.relative_to(src).as_posix()
        caption = table.get(rel, table.get(key))
        if caption is not None:
            captions[key] = str(caption)
    return captions


def encode(job: tuple) -> tuple[dict | None, str | None]:
    """(sample, None) for a readable image, (None, reason) otherwise. A job is (path, key, label)
    or (path, key, label, caption)."""
    path, key, label = job[:3]
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.load()  # a full decode, so truncated files are caught here, not in training
            ext = KEEP_FORMATS.get(fmt)
            if ext is None:
                buffer = io.BytesIO()
                img.convert("RGB").save(buffer, format="PNG")
                ext, data = "png", buffer.getvalue()
    except Exception as exn:
        return None, f"{path}: {exn}"
    sample = {"__key__": key, ext: data}
    if label >= 0:
        sample["cls"] = label
    if len(job) > 3:
        sample["txt"] = job[3]
    return sample, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="folder of images, or ImageFolder tree")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument("--prefix", default="train", help="shard name prefix (train, val, ...)")
    parser.add_argument("--max-images", type=int, default=None, help="keep only this many (after shuffling)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    parser.add_argument("--no-shuffle", action="store_true", help="write in sorted path order")
    parser.add_argument("--flat", action="store_true", help="never treat sub-folders as classes")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards of this prefix")
    parser.add_argument("--captions", type=Path, default=None,
                        help="sidecar captions: JSON file (relative path or key -> caption) or folder of .txt files")
    args = parser.parse_args(argv)

    if not args.src.is_dir():
        parser.error(f"{args.src} is not a folder")
    existing = sorted(args.out.glob(f"{args.prefix}-*.tar"))
    if existing and not args.overwrite:
        parser.error(f"{args.out} already has {args.prefix}-*.tar shards; pass --overwrite to replace them")

    jobs, classes = plan(args.src, args.flat)
    if not args.no_shuffle:
        random.Random(args.seed).shuffle(jobs)
    jobs = jobs[: args.max_images]
    if not jobs:
        parser.error(f"no image files under {args.src}")
    if args.captions is not None:
        if not args.captions.exists():
            parser.error(f"no captions file or folder at {args.captions}")
        captions = read_captions(args.captions, args.src, jobs)
        uncaptioned = [key for _, key, _ in jobs if key not in captions]
        for key in uncaptioned[:20]:
            print(f"warning: no caption for {key}; skipped", file=sys.stderr)
        jobs = [(*job, captions[job[1]]) for job in jobs if job[1] in captions]
        if not jobs:
            parser.error(f"no image under {args.src} has a caption in {args.captions}")

    args.out.mkdir(parents=True, exist_ok=True)
    if classes:
        (args.out / "classes.json").write_text(json.dumps(classes, indent=1))

    paths, written, skipped = write_encoded_shards(encode, jobs, args.workers, args.out, args.prefix,
                                                   args.shard_size, kind="image", unit="img", chunksize=16)

    labels = f", {len(classes)} classes in {args.out / 'classes.json'}" if classes else ""
    print(
        f"wrote {written} images to {len(paths)} shards, skipped {len(skipped)} unreadable{labels}",
        file=sys.stderr,
    )
    if not paths:
        return 1
    print(brace_pattern(args.out, args.prefix, len(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
