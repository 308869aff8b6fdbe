r"""Images/sec of the training data pipeline (webdataset shards -> decoded, augmented batches).

    python benchmarks/data_throughput.py                        # demo shards, workers 0, 1, 2
    python benchmarks/data_throughput.py --shards 'data/imagenet/train-{000000..001281}.tar' \
        --resolution 256 --batch 32 --workers 0 4 8 16

Measures `tokenizers_vis.data.make_train_loader` as training uses it: after `--warmup` batches
(worker start-up, shuffle buffer fill), `--batches` batches are timed. Compare with the training
step's images/sec (`train_throughput.py`) to see whether the loader can keep up. Without
`--shards`, the demo shards are built once in a temporary folder (scikit-image's photos).

    python benchmarks/data_throughput.py --video                # demo videos: clips/s, workers 0, 1, 2
    python benchmarks/data_throughput.py --video --shards 'data/videos/train-*.tar' --frames 16 --fps 8 \
        --resolution 256 --batch 8 --workers 0 4 8

`--video` measures `make_video_train_loader` instead (decode with PyAV, clip sampling, crops): clips/s
and frames/s by worker count; without `--shards`, on the demo videos (pans and zooms, 24 fps mp4).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import common

COLUMNS = [
    ("workers", "workers"), ("resolution", "res"), ("batch", "batch"), ("images_per_sec", "img/s"),
    ("batch_ms", "ms/batch"), ("first_batch_s", "first batch s"), ("peak_mem_mb", "peak MB"),
]
DEMO_DIR = Path(tempfile.gettempdir()) / "tokenizers_vis_bench" / "demo_shards"
DEMO_VIDEO_DIR = Path(tempfile.gettempdir()) / "tokenizers_vis_bench" / "demo_video_shards"
VIDEO_COLUMNS = [
    ("workers", "workers"), ("resolution", "res"), ("frames", "frames"), ("batch", "batch"),
    ("clips_per_sec", "clips/s"), ("frames_per_sec", "frames/s"), ("batch_ms", "ms/batch"),
    ("first_batch_s", "first batch s"), ("peak_mem_mb", "peak MB"),
]


def demo_shards(num_train: int) -> str:
    from tokenizers_vis.data import ensure_demo_shards

    return ensure_demo_shards(DEMO_DIR, num_train=num_train, num_val=16)["train_pattern"]


def demo_video_shards() -> str:
    from tokenizers_vis.data import ensure_demo_video_shards

    return ensure_demo_video_shards(DEMO_VIDEO_DIR)["train_pattern"]


def measure(shards: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    from tokenizers_vis.data import make_train_loader, make_video_train_loader

    if args.video:
        loader = make_video_train_loader(shards, args.resolution, args.batch, frames=args.frames, fps=args.fps,
                                         num_workers=workers, shuffle_buffer=args.shuffle_buffer, seed=0)
    else:
        loader = make_train_loader(shards, args.resolution, args.batch, num_workers=workers,
                                   shuffle_buffer=args.shuffle_buffer, seed=0)
    key = "video" if args.video else "image"
    with common.MemoryMeter(torch.device("cpu")) as memory:
        start = time.perf_counter()
        batches = iter(loader)
        images = next(batches)[key]
        first = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            next(batches)
        start = time.perf_counter()
        count = 0
        for _ in range(args.batches):
            count += next(batches)[key].shape[0]
        seconds = time.perf_counter() - start
        del batches  # stops the workers
    expected = (3, args.resolution, args.resolution)
    if tuple(images.shape[1:]) != ((args.frames, *expected) if args.video else expected):
        raise RuntimeError(f"unexpected batch shape {tuple(images.shape)}")
    if args.video:
        return {
            "workers": workers, "resolution": args.resolution, "frames": args.frames, "batch": args.batch,
            "clips_per_sec": round(count / seconds, 2), "frames_per_sec": round(count * args.frames / seconds, 1),
            "batch_ms": round(1000 * seconds / args.batches, 2), "first_batch_s": round(first, 3),
            "peak_mem_mb": round(memory.peak_mb, 1),
        }
    return {
        "workers": workers,
        "resolution": args.resolution,
        "batch": args.batch,
        "images_per_sec": round(count / seconds, 1),
        "batch_ms": round(1000 * seconds / args.batches, 2),
        "first_batch_s": round(first, 3),
        # Workers are separate processes: this is the main process only.
        "peak_mem_mb": round(memory.peak_mb, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=None, help="shard pattern / folder / glob (default: demo shards)")
    parser.add_argument("--demo-images", type=int, default=512, help="demo shard size when building them")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=30, help="timed batches per worker count (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (default 3)")
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--video", action="store_true", help="video clips (make_video_train_loader) instead of images")
    parser.add_argument("--frames", type=int, default=16, help="--video: frames per clip (default 16)")
    parser.add_argument("--fps", type=float, default=8.0, help="--video: clip frame rate (default 8)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.warmup < 1:
        parser.error("--batches and --warmup must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.quiet()
    machine = common.machine_info()
    shards = args.shards or (demo_video_shards() if args.video else demo_shards(args.demo_images))
    rows = [measure(shards, workers, args) for workers in args.workers]
    payload = {"benchmark": "data_throughput", "machine": machine, "shards": str(shards), "results": rows}
    if args.video:
        payload.update(video=True, frames=args.frames, fps=args.fps)
    common.write_json(args.json, payload)
    what = f"video clips of {args.frames} frames at {args.fps:g} fps" if args.video else "images"
    print(f"Training data pipeline throughput, {what} ({shards}); {common.describe_machine(machine)}")
    common.warn_if_busy(machine, [{"device": "cpu"}])
    print(common.format_table(rows, VIDEO_COLUMNS if args.video else COLUMNS, markdown=args.markdown))
    return payload


if __name__ == "__main__":
    main()
