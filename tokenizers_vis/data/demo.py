"""Demo shards built offline from the photos scikit-image ships with.

Each sample is a random square crop (random position, side between `min_scale` and 1 of
the photo's shorter side) resized to `size` x `size`, stored as lossless PNG, with the
photo's index as its class and a caption of the photo (`CAPTIONS`) as its "txt"; `vocab.txt`
holds the captions' words (a vocabulary for tiny text encoders). The LFW faces (25x25 grey) are
included as one more class, upsampled and made RGB; train and val use disjoint faces. Train and val crops come from
different random streams. Photos that would need a download are left out.

    python -m tokenizers_vis.data.demo data/demo [--num-train N] [--num-val N] [--size S]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tokenizers_vis.data.shards import brace_pattern, remove_stale_shards, write_shards

# Colour photos bundled with scikit-image (no pooch download needed).
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
)
FACES = "lfw_face"
# One caption per source (webdataset "txt"), for image-text objectives (SEED's stage 1).
CAPTIONS = {
    "astronaut": "a portrait of an astronaut in a white spacesuit in front of a flag",
    "chelsea": "a tabby cat with green eyes looking to the side",
    "coffee": "a cup of coffee with milk foam on a saucer",
    "rocket": "a rocket standing on a launch pad under a blue sky",
    "hubble_deep_field": "many small galaxies in the dark deep sky",
    "immunohistochemistry": "brown and blue stained cells under a microscope",
    "retina": "a red photo of the back of a human eye with blood vessels",
    "stereo_motorcycle_left": "a motorcycle parked in a room, seen from the left",
    "stereo_motorcycle_right": "a motorcycle parked in a room, seen from the right",
    FACES: "a grey photo of a face",
}
# Faces from this index on are kept for val.
_FIRST_VAL_FACE = 180
MANIFEST = "demo.json"


VOCAB_NAME = "vocab.txt"


def caption_vocabulary() -> list[str]:
    """BERT's special tokens, then every lower-cased word and punctuation mark of `CAPTIONS`: a
    WordPiece vocabulary (one entry a line) for tiny text encoders, which have no BERT vocab offline."""
    import re

    words = sorted({w for caption in CAPTIONS.values() for w in re.findall(r"\w+|[^\w\s]", caption.lower())})
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]


def _load_sources() -> dict[str, list[np.ndarray]]:
    """Name -> list of uint8 RGB arrays, for every source that loads without network."""
    import skimage.data

    sources: dict[str, list[np.ndarray]] = {}
    for name in PHOTOS:
        try:
            image = getattr(skimage.data, name)()
        except Exception as exn:  # missing optional dependency, or a download needed offline
            warnings.warn(f"demo data: skipping skimage.data.{name} ({exn})", stacklevel=2)
            continue
        if name == "stereo_motorcycle":  # (left, right, disparity): both views are photos
            sources[f"{name}_left"], sources[f"{name}_right"] = [image[0]], [image[1]]
        else:
            sources[name] = [image]
    try:
        faces = skimage.data.lfw_subset()
    except Exception as exn:
        warnings.warn(f"demo data: skipping skimage.data.lfw_subset ({exn})", stacklevel=2)
    else:
        grey = (np.clip(faces, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        sources[FACES] = [np.repeat(face[..., None], 3, axis=-1) for face in grey]
    if not sources:
        raise RuntimeError("no scikit-image sample photo could be loaded")
    return sources


def _crop(image: Image.Image, size: int, rng: np.random.Generator, min_scale: float) -> Image.Image:
    width, height = image.size
    side = rng.uniform(min_scale, 1.0) * min(width, height)
    left = rng.uniform(0.0, width - side)
    top = rng.uniform(0.0, height - side)
    # resize(box=...) resamples the region directly, antialiased, without a crop copy.
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))


def _samples(sources, classes, split: str, count: int, size: int, seed: int, min_scale: float):
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    pil = {name: [Image.fromarray(a) for a in arrays] for name, arrays in sources.items()}
    if FACES in pil:
        pil[FACES] = pil[FACES][:_FIRST_VAL_FACE] if split == "train" else pil[FACES][_FIRST_VAL_FACE:]
    for i in range(count):
        label = int(rng.integers(len(classes)))
        images = pil[classes[label]]
        image = images[int(rng.integers(len(images)))]
        # Tiny faces are cropped only a little, or they turn into blurred blobs.
        crop = _crop(image, size, rng, 0.75 if classes[label] == FACES else min_scale)
        buffer = io.BytesIO()
        crop.save(buffer, format="PNG")
        yield {"__key__": f"{split}_{i:06d}", "png": buffer.getvalue(), "cls": label,
               "txt": CAPTIONS.get(classes[label], f"a photo of {classes[label]}")}


def build_demo_shards(
    out_dir: str | Path,
    num_train: int = 1024,
    num_val: int = 64,
    size: int = 80,
    shard_size: int = 256,
    seed: int = 0,
    min_scale: float = 0.25,
) -> dict:
    """Write `out_dir/train-000000.tar ...` and `out_dir/val-000000.tar ...`.

    Files are written to a private folder and moved into place, then `demo.json` is
    written last, so concurrent builders (DDP ranks) never see a half-written set.
    Returns the manifest: {"train": [paths], "val": [paths], "classes": [names],
    "train_pattern", "val_pattern", "params"}.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"need at least one train and one val sample, got {num_train} and {num_val}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = _load_sources()
    classes = list(sources)
    params = dict(
        num_train=num_train, num_val=num_val, size=size, shard_size=shard_size, seed=seed, min_scale=min_scale
    )
    written = _write_splits(
        out_dir, {"train": num_train, "val": num_val}, shard_size,
        lambda split, count: _samples(sources, classes, split, count, size, seed, min_scale),
    )
    manifest = {"params": params, "classes": classes, "captions": True, **written}
    (out_dir / "classes.json").write_text(json.dumps(classes, indent=1))
    (out_dir / VOCAB_NAME).write_text("\n".join(caption_vocabulary()) + "\n")
    _write_manifest(out_dir, MANIFEST, manifest)
    return _describe(out_dir, manifest)


# The build steps below are shared with demo_video.py.
def _write_splits(out_dir: Path, counts: dict[str, int], shard_size: int,
                  samples: Callable[[str, int], Iterable[dict]]) -> dict[str, list[str]]:
    """Write each split's shards (`samples(split, count)`) in a private folder and move them into
    `out_dir`, dropping stale shards of an earlier, larger build. Returns {split: [file names]}."""
    staging = out_dir / f".build-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        written = {}
        for split, count in counts.items():
            paths = write_shards(samples(split, count), staging, split, shard_size)
            for path in paths:
                os.replace(path, out_dir / path.name)
            remove_stale_shards(out_dir, split, keep=len(paths))
            written[split] = [path.name for path in paths]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def _write_manifest(out_dir: Path, name: str, manifest: dict) -> None:
    # Written last and atomically: its presence means the set is complete.
    tmp = out_dir / f".{name}.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / name)


def _complete_manifest(out_dir: Path, name: str, params: dict,
                       ready: Callable[[dict], Any] = lambda manifest: True) -> dict | None:
    """The manifest `name` in `out_dir` if it was built with `params`, `ready(manifest)` holds and
    all its shards are there; else None (missing or unreadable counts as incomplete)."""
    try:
        manifest = json.loads((out_dir / name).read_text())
        complete = ready(manifest) and manifest["params"] == params and all(
            (out_dir / file).is_file() for file in manifest["train"] + manifest["val"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        complete = False
    return manifest if complete else None


def _describe(out_dir: Path, manifest: dict) -> dict:
    # The manifest on disk names files relative to its folder, so the folder can move.
    info = dict(manifest)
    for split in ("train", "val"):
        info[split] = [str(out_dir / name) for name in manifest[split]]
        info[f"{split}_pattern"] = brace_pattern(out_dir, split, len(manifest[split]))
    return info


def ensure_demo_shards(
    out_dir: str | Path,
    num_train: int = 1024,
    num_val: int = 64,
    size: int = 80,
    shard_size: int = 256,
    seed: int = 0,
    min_scale: float = 0.25,
) -> dict:
    """`build_demo_shards` with these arguments, unless a build with the same ones is there."""
    out_dir = Path(out_dir)
    params = dict(
        num_train=num_train, num_val=num_val, size=size, shard_size=shard_size, seed=seed, min_scale=min_scale
    )
    # Sets built before captions ("txt") were written are rebuilt once.
    manifest = _complete_manifest(
        out_dir, MANIFEST, params, lambda m: m.get("captions", False) and (out_dir / VOCAB_NAME).is_file()
    )
    if manifest is not None:
        return _describe(out_dir, manifest)
    return build_demo_shards(out_dir, **params)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the demo shards from scikit-image's photos.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-train", type=int, default=1024)
    parser.add_argument("--num-val", type=int, default=64)
    parser.add_argument("--size", type=int, default=80)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the shards are there")
    args = parser.parse_args(argv)
    params = dict(
        num_train=args.num_train, num_val=args.num_val, size=args.size, shard_size=args.shard_size, seed=args.seed
    )
    build = build_demo_shards if args.force else ensure_demo_shards
    manifest = build(args.out_dir, **params)
    print(f"classes: {', '.join(manifest['classes'])}")
    print(manifest["train_pattern"])
    print(manifest["val_pattern"])


if __name__ == "__main__":
    main()
