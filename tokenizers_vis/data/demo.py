"""Demo shards built offline from the photos the installed packages ship (scikit-image, matplotlib).

Training and validation never share a photo, so the demo's validation PSNR measures what carries
to photos the model has not seen:
- train: random square crops (random position, side between `min_scale` and 1 of the shorter
  side) of the colour photos in `TRAIN_PHOTOS`; crops of the grey photos in `GREY_PHOTOS`, each
  tinted with a random two-colour gradient (colours and textures the colour photos lack);
  the first `_FIRST_VAL_FACE` LFW faces; and `synthetic` images (smooth random colour fields with
  random shapes), which cover every colour and force the tokens to carry colour and layout.
- val: the whole photos in `HELD_OUT_PHOTOS` (the centre square of each, plus both end squares of
  a photo at least 1.25 times wider than tall or the reverse), then the remaining faces, at most
  `num_val` images.
Each sample is resized to `size` x `size`, stored as lossless PNG, with its source's index in
`classes.json` as its class and a caption of the source (`CAPTIONS`) as its "txt"; `vocab.txt`
holds the captions' words (a vocabulary for tiny text encoders). Sources that would need a
download are left out with a warning.

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
from PIL import Image, ImageDraw

from tokenizers_vis.data.shards import brace_pattern, remove_stale_shards, write_shards

# Colour photos bundled with scikit-image (no pooch download needed); the video demo pans over them.
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
# The image demo's split: colour photos cropped for training, grey ones tinted, whole ones held out.
TRAIN_PHOTOS = ("astronaut", "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle",
                "colorwheel")
GREY_PHOTOS = ("brick", "grass", "gravel", "moon", "page", "text", "coins", "cell", "clock")
HELD_OUT_PHOTOS = ("rocket", "coffee", "chelsea", "grace_hopper", "camera")
FACES = "lfw_face"
SYNTHETIC = "synthetic"
# Share of each kind among the training samples.
_TRAIN_MIX = {"colour": 0.45, "grey": 0.2, "faces": 0.1, SYNTHETIC: 0.25}
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
    "colorwheel": "a wheel of every colour on a white background",
    "grace_hopper": "a portrait of a woman in a navy uniform in front of a flag",
    "camera": "a grey photo of a man with a camera on a tripod",
    "brick": "a wall of bricks in one colour",
    "grass": "blades of grass in one colour",
    "gravel": "a patch of gravel in one colour",
    "moon": "the surface of the moon in one colour",
    "page": "a page of printed text in one colour",
    "text": "printed words in one colour",
    "coins": "old coins on a table in one colour",
    "cell": "a cell under a microscope in one colour",
    "clock": "a clock on a wall in one colour",
    FACES: "a grey photo of a face",
    SYNTHETIC: "coloured shapes on a smooth coloured background",
}
# Faces from this index on are kept for val.
_NUM_FACES, _FIRST_VAL_FACE = 100, 94
MANIFEST = "demo.json"


VOCAB_NAME = "vocab.txt"


def caption_vocabulary() -> list[str]:
    """BERT's special tokens, then every lower-cased word and punctuation mark of `CAPTIONS`: a
    WordPiece vocabulary (one entry a line) for tiny text encoders, which have no BERT vocab offline."""
    import re

    words = sorted({w for caption in CAPTIONS.values() for w in re.findall(r"\w+|[^\w\s]", caption.lower())})
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]


def _load_photo(name: str) -> np.ndarray | None:
    """One bundled photo as uint8 (H, W, 3) RGB or (H, W) grey (the two stereo views stacked for
    stereo_motorcycle); None with a warning when it cannot be loaded offline."""
    try:
        if name == "grace_hopper":
            from matplotlib import cbook

            with cbook.get_sample_data("grace_hopper.jpg") as f:
                return np.asarray(Image.open(f).convert("RGB"))
        import skimage.data

        image = getattr(skimage.data, name)()
        return np.stack(image[:2]) if name == "stereo_motorcycle" else image
    except Exception as exn:  # missing optional dependency, or a download needed offline
        warnings.warn(f"demo data: skipping the {name} photo ({exn})", stacklevel=3)
        return None


def _load_faces() -> list[np.ndarray]:
    """The LFW faces (25x25 grey) as uint8 RGB; [] with a warning when they cannot be loaded."""
    import skimage.data

    try:
        faces = skimage.data.lfw_subset()
    except Exception as exn:
        warnings.warn(f"demo data: skipping skimage.data.lfw_subset ({exn})", stacklevel=3)
        return []
    # lfw_subset holds 100 faces, then 100 patches of non-face background: only the faces are used.
    grey = (np.clip(faces[:_NUM_FACES], 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return [np.repeat(face[..., None], 3, axis=-1) for face in grey]


def _load_sources(names: Iterable[str] = PHOTOS, faces: bool = True) -> dict[str, list[np.ndarray]]:
    """Name -> list of uint8 arrays (RGB, or grey for grey photos), for every source that loads
    without network; the stereo pair becomes two sources, the faces one source of many images."""
    sources: dict[str, list[np.ndarray]] = {}
    for name in names:
        image = _load_photo(name)
        if image is None:
            continue
        if name == "stereo_motorcycle":  # both views are photos
            sources[f"{name}_left"], sources[f"{name}_right"] = [image[0]], [image[1]]
        else:
            sources[name] = [image[..., :3] if image.ndim == 3 else image]  # RGBA keeps its colour
    if faces:
        face_list = _load_faces()
        if face_list:
            sources[FACES] = face_list
    if not sources:
        raise RuntimeError("no bundled sample photo could be loaded")
    return sources


def _crop(image: Image.Image, size: int, rng: np.random.Generator, min_scale: float) -> Image.Image:
    width, height = image.size
    side = rng.uniform(min_scale, 1.0) * min(width, height)
    left = rng.uniform(0.0, width - side)
    top = rng.uniform(0.0, height - side)
    # resize(box=...) resamples the region directly, antialiased, without a crop copy.
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))


def _tint(grey: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A grey crop mapped onto a gradient between two random colours (the darker one for black)."""
    dark, light = rng.uniform(0, 0.5, 3), rng.uniform(0.5, 1.0, 3)
    level = np.asarray(grey.convert("L"), dtype=np.float32)[..., None] / 255.0
    rgb = dark + level * (light - dark)
    return Image.fromarray((rgb * 255.0).round().astype(np.uint8))


def synthetic_image(size: int, rng: np.random.Generator) -> Image.Image:
    """A smooth random colour field (a 2x2 to 5x5 grid of random colours, bicubic upsampled) with 1
    to 4 random ellipses and rectangles in random colours on top."""
    grid = int(rng.integers(2, 6))
    colours = (rng.uniform(0, 255, (grid, grid, 3))).astype(np.uint8)
    image = Image.fromarray(colours).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = rng.uniform(-0.2, 0.8, 2) * size
        w, h = rng.uniform(0.15, 0.6, 2) * size
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + w, y0 + h), fill=fill)
    return image


def held_out_views(image: Image.Image, size: int) -> list[Image.Image]:
    """The centre square of a whole photo at `size`, plus both end squares when it is at least 1.25
    times wider than tall (left, right) or the reverse (top, bottom)."""
    width, height = image.size
    side = min(width, height)
    offsets = [((width - side) / 2, (height - side) / 2)]
    if width >= 1.25 * height:
        offsets += [(0, 0), (width - side, 0)]
    elif height >= 1.25 * width:
        offsets += [(0, 0), (0, height - side)]
    return [image.resize((size, size), Image.BICUBIC, box=(x, y, x + side, y + side)) for x, y in offsets]


def _train_samples(sources: dict[str, list[Image.Image]], grey: set[str], classes: list[str], count: int,
                   size: int, seed: int, min_scale: float):
    rng = np.random.default_rng([seed, 0])
    groups = {
        "colour": [n for n in sources if n not in grey and n != FACES],
        "grey": [n for n in sources if n in grey],
        "faces": [FACES] if FACES in sources else [],
        SYNTHETIC: [SYNTHETIC],
    }
    kinds = [kind for kind in _TRAIN_MIX if groups[kind]]
    weights = np.array([_TRAIN_MIX[kind] for kind in kinds])
    for i in range(count):
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        name = groups[kind][int(rng.integers(len(groups[kind])))]
        if name == SYNTHETIC:
            crop = synthetic_image(size, rng)
        else:
            images = sources[name]
            image = images[int(rng.integers(len(images)))]
            # Tiny faces are cropped only a little, or they turn into blurred blobs.
            crop = _crop(image, size, rng, 0.75 if name == FACES else min_scale)
            if name in grey:
                crop = _tint(crop, rng)
        yield _sample("train", i, crop, classes.index(name), name)


def _val_samples(held_out: dict[str, list[Image.Image]], classes: list[str], count: int, size: int):
    views = [(name, view) for name, images in held_out.items() for image in images
             for view in held_out_views(image, size)]
    for i, (name, view) in enumerate(views[:count]):
        yield _sample("val", i, view.convert("RGB"), classes.index(name), name)


def _sample(split: str, index: int, image: Image.Image, label: int, name: str) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"__key__": f"{split}_{index:06d}", "png": buffer.getvalue(), "cls": label,
            "txt": CAPTIONS.get(name, f"a photo of {name}")}


def build_demo_shards(
    out_dir: str | Path,
    num_train: int = 4096,
    num_val: int = 64,
    size: int = 80,
    shard_size: int = 512,
    seed: int = 0,
    min_scale: float = 0.25,
) -> dict:
    """Write `out_dir/train-000000.tar ...` and `out_dir/val-000000.tar ...` (see the module's
    docstring; val holds at most `num_val` images: every held-out view and face there is).

    Files are written to a private folder and moved into place, then `demo.json` is
    written last, so concurrent builders (DDP ranks) never see a half-written set.
    Returns the manifest: {"train": [paths], "val": [paths], "classes": [names],
    "held_out": [names], "train_pattern", "val_pattern", "params"}.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"need at least one train and one val sample, got {num_train} and {num_val}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = _load_sources(TRAIN_PHOTOS + GREY_PHOTOS, faces=False)
    held_out = _load_sources(HELD_OUT_PHOTOS, faces=False)
    faces = _load_faces()
    if faces:
        train[FACES], held_out[FACES] = faces[:_FIRST_VAL_FACE], faces[_FIRST_VAL_FACE:]
    if not held_out:
        raise RuntimeError("none of the held-out demo photos could be loaded")
    grey = {name for name, images in train.items() if images[0].ndim == 2}
    classes = [*train, SYNTHETIC, *(name for name in held_out if name not in train)]
    params = _params(num_train, num_val, size, shard_size, seed, min_scale)
    pil = {name: [Image.fromarray(a) for a in arrays] for name, arrays in train.items()}
    pil_held_out = {name: [Image.fromarray(a) for a in arrays] for name, arrays in held_out.items()}
    written = _write_splits(
        out_dir, {"train": num_train, "val": num_val}, shard_size,
        lambda split, count: (_train_samples(pil, grey, classes, count, size, seed, min_scale) if split == "train"
                              else _val_samples(pil_held_out, classes, count, size)),
    )
    manifest = {"params": params, "classes": classes, "held_out": list(held_out), "captions": True,
                "version": _VERSION, **written}
    (out_dir / "classes.json").write_text(json.dumps(classes, indent=1))
    (out_dir / VOCAB_NAME).write_text("\n".join(caption_vocabulary()) + "\n")
    _write_manifest(out_dir, MANIFEST, manifest)
    return _describe(out_dir, manifest)


def _params(num_train, num_val, size, shard_size, seed, min_scale) -> dict:
    """The build arguments as the manifest records them (a set is reused only with equal ones)."""
    return dict(num_train=num_train, num_val=num_val, size=size, shard_size=shard_size, seed=seed,
                min_scale=min_scale)


# Sets built by an older layout (before captions; before held-out validation photos) are rebuilt once.
_VERSION = 2


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


def is_outdated_demo_set(out_dir: str | Path) -> bool:
    """`out_dir` holds a demo set built by an older layout of this module (its manifest names
    another version). Shards without a manifest (put there by hand) are not a demo set: False."""
    try:
        manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return not isinstance(manifest, dict) or manifest.get("version") != _VERSION


def ensure_demo_shards(
    out_dir: str | Path,
    num_train: int = 4096,
    num_val: int = 64,
    size: int = 80,
    shard_size: int = 512,
    seed: int = 0,
    min_scale: float = 0.25,
) -> dict:
    """`build_demo_shards` with these arguments, unless a build with the same ones is there."""
    out_dir = Path(out_dir)
    params = _params(num_train, num_val, size, shard_size, seed, min_scale)
    manifest = _complete_manifest(
        out_dir, MANIFEST, params, lambda m: m.get("version") == _VERSION and (out_dir / VOCAB_NAME).is_file()
    )
    if manifest is not None:
        return _describe(out_dir, manifest)
    return build_demo_shards(out_dir, **params)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the demo shards from bundled photos.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-train", type=int, default=4096)
    parser.add_argument("--num-val", type=int, default=64)
    parser.add_argument("--size", type=int, default=80)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the shards are there")
    args = parser.parse_args(argv)
    params = dict(
        num_train=args.num_train, num_val=args.num_val, size=args.size, shard_size=args.shard_size, seed=args.seed
    )
    build = build_demo_shards if args.force else ensure_demo_shards
    manifest = build(args.out_dir, **params)
    print(f"classes: {', '.join(manifest['classes'])}")
    print(f"held out (validation only): {', '.join(manifest['held_out'])}")
    print(manifest["train_pattern"])
    print(manifest["val_pattern"])


if __name__ == "__main__":
    main()
