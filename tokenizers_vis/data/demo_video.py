"""Demo video shards built offline from the demo photos: camera pans and zooms over each photo.

Each sample is a real mp4 (H.264, written with PyAV) of `num_frames` frames at `fps`: a square
window moves in a straight line across a photo (pan) or shrinks / grows about a point (zoom),
each frame rendered at `size` x `size`. The motion is known (it is in the sample's `json`:
window boxes of the first and last frame), so temporal errors of a tokenizer are easy to see.
The caption (`txt`) names the motion and the photo. Train and val come from different random
streams; val clips use windows of the same photos but other paths.

    python -m tokenizers_vis.data.demo_video data/demo_video [--num-train N] [--num-val N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

# The build, manifest and describe steps are the image demo's (same layout, other samples).
from tokenizers_vis.data.demo import FACES, _complete_manifest, _describe, _load_sources, _write_manifest, _write_splits
from tokenizers_vis.data.video import encode_video

MANIFEST = "demo_video.json"
MOTIONS = ("pan", "zoom_in", "zoom_out")


def _path(width: int, height: int, motion: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(first box, last box) as (left, top, side) of a square window inside the photo."""
    short = min(width, height)
    if motion == "pan":
        side = rng.uniform(0.35, 0.6) * short
        a = np.array([rng.uniform(0, width - side), rng.uniform(0, height - side), side])
        b = np.array([rng.uniform(0, width - side), rng.uniform(0, height - side), side])
        return a, b
    big, small = rng.uniform(0.6, 0.95) * short, rng.uniform(0.25, 0.45) * short
    # A zoom keeps one point of the photo fixed on screen: the window's relative position of
    # that point stays the same as the window scales.
    cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
    px, py = cx * width, cy * height  # so every box stays inside the photo

    def box(side: float) -> np.ndarray:
        return np.array([px - cx * side, py - cy * side, side])

    return (box(big), box(small)) if motion == "zoom_in" else (box(small), box(big))


def render(photo: Image.Image, first: np.ndarray, last: np.ndarray, num_frames: int, size: int) -> np.ndarray:
    """uint8 (T, size, size, 3): the window moved linearly from `first` to `last`."""
    frames = []
    for t in np.linspace(0.0, 1.0, num_frames):
        left, top, side = (1 - t) * first + t * last
        frames.append(np.asarray(photo.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))))
    return np.stack(frames)


def _samples(photos: dict[str, Image.Image], split: str, count: int, size: int, num_frames: int, fps: float,
             seed: int):
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    names = sorted(photos)
    for i in range(count):
        name = names[int(rng.integers(len(names)))]
        motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        photo = photos[name]
        first, last = _path(photo.width, photo.height, motion, rng)
        frames = render(photo, first, last, num_frames, size)
        meta = {"fps": fps, "frames": num_frames, "photo": name, "motion": motion,
                "first_box": [round(float(v), 3) for v in first], "last_box": [round(float(v), 3) for v in last]}
        caption = f"a camera {motion.replace('_', ' ')} over the {name.replace('_', ' ')} photo"
        yield {"__key__": f"{split}_{i:06d}", "mp4": encode_video(frames, fps), "json": json.dumps(meta),
               "txt": caption}


def _params(num_train, num_val, size, num_frames, fps, shard_size, seed) -> dict:
    return dict(num_train=num_train, num_val=num_val, size=size, num_frames=num_frames, fps=fps,
                shard_size=shard_size, seed=seed)


def build_demo_video_shards(
    out_dir: str | Path,
    num_train: int = 128,
    num_val: int = 16,
    size: int = 80,
    num_frames: int = 48,
    fps: float = 24.0,
    shard_size: int = 64,
    seed: int = 0,
) -> dict:
    """Write `out_dir/train-*.tar` and `out_dir/val-*.tar` (2 s clips by default: 16 frames at
    8 fps fit). Built in a private folder and moved into place, the manifest last, so concurrent
    builders never see a half-written set. Returns the manifest with full paths and patterns."""
    if num_train < 1 or num_val < 1:
        raise ValueError(f"need at least one train and one val video, got {num_train} and {num_val}")
    if size % 2:
        raise ValueError(f"size must be even (H.264 in yuv420p), got {size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    photos = {name: Image.fromarray(arrays[0]) for name, arrays in _load_sources().items() if name != FACES}
    params = _params(num_train, num_val, size, num_frames, fps, shard_size, seed)
    written = _write_splits(
        out_dir, {"train": num_train, "val": num_val}, shard_size,
        lambda split, count: _samples(photos, split, count, size, num_frames, fps, seed),
    )
    manifest = {"params": params, "photos": sorted(photos), **written}
    _write_manifest(out_dir, MANIFEST, manifest)
    return _describe(out_dir, manifest)


def ensure_demo_video_shards(
    out_dir: str | Path,
    num_train: int = 128,
    num_val: int = 16,
    size: int = 80,
    num_frames: int = 48,
    fps: float = 24.0,
    shard_size: int = 64,
    seed: int = 0,
) -> dict:
    """`build_demo_video_shards` with these arguments, unless a build with the same ones is there."""
    out_dir = Path(out_dir)
    params = _params(num_train, num_val, size, num_frames, fps, shard_size, seed)
    manifest = _complete_manifest(out_dir, MANIFEST, params)
    if manifest is not None:
        return _describe(out_dir, manifest)
    return build_demo_video_shards(out_dir, **params)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the demo video shards (pans and zooms over scikit-image's "
                                                 "photos, as mp4).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-train", type=int, default=128)
    parser.add_argument("--num-val", type=int, default=16)
    parser.add_argument("--size", type=int, default=80)
    parser.add_argument("--num-frames", type=int, default=48)
    parser.add_argument("--fps", type=float, default=24.0)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the shards are there")
    args = parser.parse_args(argv)
    params = _params(args.num_train, args.num_val, args.size, args.num_frames, args.fps, args.shard_size, args.seed)
    manifest = (build_demo_video_shards if args.force else ensure_demo_video_shards)(args.out_dir, **params)
    print(f"photos: {', '.join(manifest['photos'])}")
    print(manifest["train_pattern"])
    print(manifest["val_pattern"])


if __name__ == "__main__":
    main()
