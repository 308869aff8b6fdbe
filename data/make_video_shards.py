#!/usr/bin/env python
"""Pack a folder (or a list file) of videos into webdataset shards that the video configs read.

    python data/make_video_shards.py INPUT OUT_DIR [--shard-size 100] [--prefix train]
        [--reencode | --format frames] [--frames 16] [--fps 8] [--size 256]

INPUT is a folder of videos (searched recursively: .mp4 .webm .mkv .avi .mov .m4v) or a text
file listing one video path per line. Each sample keeps the encoded video byte for byte (`mp4`,
or the file's own extension) unless `--reencode` asks for H.264 mp4, or `--format frames` stores
a frame sequence (PNG entries `f00000.png`, ...). Re-encoding and frame sequences may resample to
`--fps`, resize the shorter side to `--size` and keep only the first `--frames` frames. A
`<name>.txt` beside `<name>.mp4` becomes the caption (`txt`); `json` records fps, frame count,
size and the source path. Every video is fully decoded first; unreadable ones are skipped,
counted and named in the summary (stderr). The last stdout line is the shards' brace pattern.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tokenizers_vis.data.shards import brace_pattern, write_encoded_shards
from tokenizers_vis.data.video import VIDEO_FILE_SUFFIXES, clip_step, encode_video, list_video_files


def plan(src: Path) -> list[tuple[Path, str]]:
    """(path, key) for every video of a folder or list file; keys are unique and dot-free."""
    if src.is_dir():
        files, root = list_video_files(src), src
    else:
        lines = [line.strip() for line in src.read_text().splitlines()]
        files = [Path(line).expanduser() for line in lines if line and not line.startswith("#")]
        root = None
    jobs, seen = [], set()
    for path in files:
        name = path.relative_to(root).with_suffix("") if root is not None else Path(path.stem)
        key = name.as_posix().replace(".", "_")  # webdataset splits key and extension at the first dot
        unique, n = key, 1
        while unique in seen:
            unique, n = f"{key}_{n}", n + 1
        seen.add(unique)
        jobs.append((path, unique))
    return jobs


def _resampled(frames: list[np.ndarray], source_fps: float, fps: float | None, limit: int | None) -> list[np.ndarray]:
    step = clip_step(source_fps, fps)
    count = int((len(frames) - 1) / step + 1e-9) + 1
    picked = [frames[int(k * step + 1e-9)] for k in range(count)]
    return picked[:limit] if limit else picked


def _resize(array: np.ndarray, size: int | None) -> np.ndarray:
    if size is None:
        return array
    h, w = array.shape[:2]
    scale = size / min(h, w)
    # Even sides, as H.264 in yuv420p needs.
    new = (max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2))
    return np.asarray(Image.fromarray(array).resize(new, Image.BICUBIC))


def encode(job: tuple[Path, str], options: dict) -> tuple[dict | None, str | None]:
    """(sample, None) for a readable video, (None, reason) otherwise."""
    import av

    path, key = job
    try:
        data = path.read_bytes()
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise ValueError("no frame rate")
            source_fps = float(rate)
            # A full decode: a truncated or corrupt file fails here, not in training.
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        if not frames:
            raise ValueError("no frames")
        fps = source_fps
        if options["reencode"] or options["format"] == "frames":
            frames = [_resize(f, options["size"]) for f in _resampled(frames, source_fps, options["fps"],
                                                                       options["frames"])]
            fps = options["fps"] or source_fps
        h, w = frames[0].shape[:2]
        meta = {"fps": fps, "frames": len(frames), "width": w, "height": h, "source": str(path)}
        sample: dict = {"__key__": key, "json": json.dumps(meta)}
        if options["format"] == "frames":
            for i, array in enumerate(frames):
                buffer = io.BytesIO()
                Image.fromarray(array).save(buffer, format="PNG")
                sample[f"f{i:05d}.png"] = buffer.getvalue()
        elif options["reencode"]:
            sample["mp4"] = encode_video(np.stack(frames), fps, crf=options["crf"])
        else:
            sample[path.suffix.lower().lstrip(".")] = data
        caption = path.with_suffix(".txt")
        if caption.is_file():
            sample["txt"] = caption.read_text(encoding="utf-8").strip()
    except Exception as exn:  # PyAV, PIL and IO errors share no base
        return None, f"{path}: {exn!r}"
    return sample, None


class _Encoder:
    """Picklable `encode` with fixed options, for the process pool."""

    def __init__(self, options: dict):
        self.options = options

    def __call__(self, job):
        return encode(job, self.options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="folder of videos, or a text file listing video paths")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--shard-size", type=int, default=100, help="videos per shard")
    parser.add_argument("--prefix", default="train", help="shard name prefix (train, val, ...)")
    parser.add_argument("--format", choices=("mp4", "frames"), default="mp4",
                        help="mp4: the encoded video; frames: a PNG frame sequence")
    parser.add_argument("--reencode", action="store_true", help="re-encode as H.264 mp4 (with --fps/--size/--frames)")
    parser.add_argument("--frames", type=int, default=None, help="keep only the first N frames (after --fps)")
    parser.add_argument("--fps", type=float, default=None, help="resample to this frame rate")
    parser.add_argument("--size", type=int, default=None, help="resize the shorter side to this")
    parser.add_argument("--crf", type=int, default=18, help="H.264 constant quality when re-encoding")
    parser.add_argument("--max-videos", type=int, default=None, help="keep only this many (after shuffling)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    parser.add_argument("--no-shuffle", action="store_true", help="write in sorted path order")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards of this prefix")
    args = parser.parse_args(argv)

    if not args.input.exists():
        parser.error(f"{args.input} does not exist")
    transforms = [f"--{n}" for n in ("frames", "fps", "size") if getattr(args, n) is not None]
    if transforms and not (args.reencode or args.format == "frames"):
        parser.error(f"{', '.join(transforms)} change the video: add --reencode (or --format frames)")
    existing = sorted(args.out.glob(f"{args.prefix}-*.tar"))
    if existing and not args.overwrite:
        parser.error(f"{args.out} already has {args.prefix}-*.tar shards; pass --overwrite to replace them")
    jobs = plan(args.input)
    if not args.no_shuffle:
        random.Random(args.seed).shuffle(jobs)
    jobs = jobs[: args.max_videos]
    if not jobs:
        parser.error(f"no video files ({' '.join(VIDEO_FILE_SUFFIXES)}) in {args.input}")

    options = {"format": args.format, "reencode": args.reencode, "frames": args.frames, "fps": args.fps,
               "size": args.size, "crf": args.crf}
    # One video at a time per worker (imap's default chunk): videos are slow to encode.
    paths, written, skipped = write_encoded_shards(_Encoder(options), jobs, args.workers, args.out, args.prefix,
                                                   args.shard_size, kind="video", unit="video")

    print(f"wrote {written} videos to {len(paths)} shards, skipped {len(skipped)} unreadable", file=sys.stderr)
    for error in skipped:
        print(f"  skipped {error}", file=sys.stderr)
    if not paths:
        return 1
    print(brace_pattern(args.out, args.prefix, len(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
