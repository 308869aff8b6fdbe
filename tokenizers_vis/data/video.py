"""Video: decoding with PyAV, clip sampling, the clip transforms, and video streams and loaders.

A video sample in a shard holds the encoded video under one of `VIDEO_EXTENSIONS` (`mp4`, ...)
or a frame sequence (`f00000.png`, `f00001.png`, ... with `{"fps": ...}` in its `json`), plus an
optional caption (`txt`) and metadata (`json`). `data/make_video_shards.py` writes them.

Clip sampling: `frames` frames at `fps` frames per second, resampled from the video's own rate
(source frame `start + floor(k * source_fps / fps)` for k = 0..frames-1, so a 30 fps source
sampled at 8 fps takes frames 0, 3, 7, 11, 15, 18, ...). Training draws `start` at random;
evaluation takes the first clip (start 0), so eval clips are the same on every run. A video
too short for one clip is unreadable for this setting: it is skipped and counted.

Batches: {"video": float32 (B, T, 3, R, R) in [0, 1], "key": list[str], "text": list[str]
("" where a sample has no caption)}; train batches also carry "stream" (see pipeline.py). The
streams are the image streams with a video decode and collate, so they keep the same
guarantees: exact resume from a position, each sample on one (rank, worker), eval clips once.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms.v2 import functional as F

from tokenizers_vis.data.pipeline import (
    EvalStream,
    PreemptionShield,
    SkipCounter,
    SkipTally,
    TrainLoader,
    TrainStream,
    _describe,
    _is_tar_source,
    list_image_files,
)
from tokenizers_vis.data.shards import resolve_shards
from tokenizers_vis.data.transforms import interpolation_mode

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")
VIDEO_FILE_SUFFIXES = tuple(f".{ext}" for ext in VIDEO_EXTENSIONS)
# One entry per frame of a frame-sequence sample: `<key>.f00012.png`.
FRAME_ENTRY = re.compile(r"f(\d+)\.(png|jpg|jpeg|webp)")


class VideoInfo(NamedTuple):
    fps: float
    num_frames: int


# -- clip sampling -----------------------------------------------------------------------------
def clip_step(source_fps: float, fps: float | None) -> float:
    """Source frames per clip frame; `fps` None keeps the source rate (step 1)."""
    if fps is None:
        return 1.0
    if fps <= 0 or source_fps <= 0:
        raise ValueError(f"frame rates must be positive, got target {fps} and source {source_fps}")
    return source_fps / fps


def clip_span(frames: int, source_fps: float, fps: float | None) -> int:
    """Source frames one clip covers, from its first frame to its last inclusive."""
    return math.floor((frames - 1) * clip_step(source_fps, fps) + 1e-9) + 1


def clip_indices(num_frames: int, source_fps: float, frames: int, fps: float | None,
                 rng: random.Random | None = None) -> list[int]:
    """Source frame indices of one clip: `frames` frames at `fps` from a video of `num_frames`
    frames at `source_fps`. The start is drawn from `rng` (training), or 0 without one (eval).
    Raises ValueError when the video is shorter than one clip."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    step = clip_step(source_fps, fps)
    span = clip_span(frames, source_fps, fps)
    if num_frames < span:
        rate = f" at {fps:g} fps" if fps is not None else ""
        raise ValueError(f"video too short: {num_frames} frames at {source_fps:g} fps, a clip of {frames} "
                         f"frames{rate} needs {span}")
    start = rng.randint(0, num_frames - span) if rng is not None else 0
    # The small epsilon keeps exact multiples (e.g. 3.0 * k) from flooring one frame low.
    return [start + math.floor(k * step + 1e-9) for k in range(frames)]


# -- decoding ----------------------------------------------------------------------------------
def probe_video(data: bytes) -> VideoInfo:
    """Frame rate and frame count of encoded video bytes (counts by decoding if the container
    does not say)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        count = stream.frames or sum(1 for _ in container.decode(stream))
    return VideoInfo(fps, count)


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise ValueError("the video stream states no frame rate")
    return float(rate)


# A clip starting further in than this seeks to the keyframe before its start instead of decoding
# every frame from the top (long videos: a random 2 s clip of a 10 min video).
SEEK_AFTER_FRAMES = 32


def _numbered_frames(container, stream, start: int, source_fps: float):
    """(frame index, frame) in order, from at most the keyframe before frame `start` on. After a
    seek the index comes from each frame's timestamp (constant frame rate assumed, as for the
    frame count)."""
    if start < SEEK_AFTER_FRAMES or stream.time_base is None:
        yield from enumerate(container.decode(stream))
        return
    origin = stream.start_time or 0
    container.seek(origin + int(start / source_fps / stream.time_base), stream=stream, backward=True,
                   any_frame=False)
    for frame in container.decode(stream):
        if frame.pts is None:
            raise ValueError("a frame without a timestamp after seeking")
        yield round(float((frame.pts - origin) * stream.time_base) * source_fps), frame


def decode_clip(data: bytes, frames: int, fps: float | None, rng: random.Random | None = None) -> torch.Tensor:
    """One clip of encoded video bytes (any container/codec FFmpeg reads) as uint8 (T, 3, H, W).

    Decodes up to the clip's last frame only, from the keyframe before its first when that is far
    in. When the container gives no frame count, the whole video is decoded first."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        source_fps = _stream_fps(stream)
        if not stream.frames:
            decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            indices = clip_indices(len(decoded), source_fps, frames, fps, rng)
            return _stack([decoded[i] for i in indices])
        stated = stream.frames
        indices = clip_indices(stated, source_fps, frames, fps, rng)
        wanted, kept = set(indices), {}
        for i, frame in _numbered_frames(container, stream, indices[0], source_fps):
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
            if i >= indices[-1]:
                break
    if len(kept) < len(wanted):
        raise ValueError(f"the video ends before frame {indices[-1]} (its container states {stated} frames)")
    return _stack([kept[i] for i in indices])


def frame_entries(sample: dict) -> list[str]:
    """The frame-sequence entries of a sample, in frame order (empty for other samples)."""
    found = [(int(m.group(1)), k) for k in sample if (m := FRAME_ENTRY.fullmatch(k))]
    return [k for _, k in sorted(found)]


def sample_meta(sample: dict) -> dict[str, Any]:
    value = sample.get("json")
    if value is None:
        return {}
    return json.loads(value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else value)


def sample_text(sample: dict) -> str:
    value = sample.get("txt", b"")
    return (value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)).strip()


def decode_sample_clip(sample: dict, frames: int, fps: float | None, rng: random.Random | None = None) -> torch.Tensor:
    """The clip of a shard sample (encoded video or frame sequence) as uint8 (T, 3, H, W)."""
    for ext in VIDEO_EXTENSIONS:
        if ext in sample:
            return decode_clip(sample[ext], frames, fps, rng)
    entries = frame_entries(sample)
    if not entries:
        raise ValueError(f"no video entry (one of {VIDEO_EXTENSIONS}) and no frames (f00000.png, ...) among "
                         f"{sorted(k for k in sample if not k.startswith('__'))}")
    source_fps = sample_meta(sample).get("fps")
    if fps is not None and source_fps is None:
        raise ValueError("a frame sequence without {\"fps\": ...} in its json cannot be resampled to a frame rate")
    indices = clip_indices(len(entries), float(source_fps or 1.0), frames, fps, rng)
    images = {}
    for i in sorted(set(indices)):
        with Image.open(io.BytesIO(sample[entries[i]])) as img:
            images[i] = np.asarray(img.convert("RGB"))
    return _stack([images[i] for i in indices])


def _stack(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"frames of one video differ in size: {sorted(shapes)}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# -- transforms --------------------------------------------------------------------------------
def _resize_short_side(clip: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    # uint8 in, uint8 out: torchvision rounds and clamps, as a PIL resize of each frame would.
    return F.resize(clip, size, interpolation=interpolation_mode(interpolation), antialias=True)


def _to_float(clip: torch.Tensor) -> torch.Tensor:
    return clip.float().div_(255.0)


def eval_clip_transform(clip: torch.Tensor, resolution: int, interpolation: str = "bicubic") -> torch.Tensor:
    """uint8 (T, 3, H, W) -> float (T, 3, R, R) in [0, 1]: short-side resize, centre crop."""
    clip = _resize_short_side(clip, resolution, interpolation)
    return _to_float(F.center_crop(clip, [resolution, resolution]))


def train_clip_transform(clip: torch.Tensor, resolution: int, rng: random.Random, interpolation: str = "bicubic",
                         random_flip: bool = True, crop_scale: tuple[float, float] | None = None) -> torch.Tensor:
    """The image train transform with one draw for the whole clip (every frame gets the same
    crop and flip, so motion is kept): optional random square of `crop_scale` of the short
    side, short-side resize, random square crop, random horizontal flip."""
    height, width = clip.shape[-2:]
    if crop_scale is not None:
        lo, hi = crop_scale
        side = max(1, round(min(width, height) * rng.uniform(lo, hi)))
        clip = F.crop(clip, rng.randint(0, height - side), rng.randint(0, width - side), side, side)
    clip = _resize_short_side(clip, resolution, interpolation)
    top = rng.randint(0, clip.shape[-2] - resolution)
    left = rng.randint(0, clip.shape[-1] - resolution)
    clip = F.crop(clip, top, left, resolution, resolution)
    if random_flip and rng.random() < 0.5:
        clip = F.horizontal_flip(clip)
    return _to_float(clip)


def collate_video(samples: Sequence[dict]) -> dict:
    return {
        "video": torch.stack([s["video"] for s in samples]),
        "key": [s["key"] for s in samples],
        "text": [s["text"] for s in samples],
    }


# -- writing -----------------------------------------------------------------------------------
def encode_video(frames: np.ndarray | torch.Tensor, fps: float, crf: int = 18, codec: str = "libx264") -> bytes:
    """uint8 frames (T, H, W, 3) as mp4 bytes (H.264, yuv420p, constant quality `crf`; one
    encoder thread, so the same frames give the same bytes). yuv420p needs even sides: odd
    ones are padded by repeating the last row / column."""
    import av

    frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        stream.options = {"crf": str(crf)} if codec == "libx264" else {}
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def write_video(path: str | Path, frames: np.ndarray | torch.Tensor, fps: float, crf: int = 18) -> Path:
    """`encode_video` to a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_video(frames, fps, crf))
    return path


def clip_to_frames(clip: torch.Tensor) -> np.ndarray:
    """float (T, 3, H, W) in [0, 1] -> uint8 (T, H, W, 3), as `encode_video` takes."""
    return (clip.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# -- sources -----------------------------------------------------------------------------------
def list_video_files(root: str | Path) -> list[Path]:
    """Video files under `root`, recursively, sorted by relative path; hidden ones left out."""
    return list_image_files(root, VIDEO_FILE_SUFFIXES)  # the same walk, other suffixes


def is_video_source(source: str | Path | Sequence[str]) -> bool:
    """Whether a data source holds video: a folder of video files (and no shards), or shards
    whose first sample has a video or frame entry. Remote shards are not opened (False)."""
    import tarfile

    if isinstance(source, (str, Path)) and Path(source).expanduser().is_dir() and not _is_tar_source(source):
        return bool(list_video_files(Path(source).expanduser()))
    try:
        urls = resolve_shards(source)
    except FileNotFoundError:
        return False
    if "://" in urls[0] or urls[0].startswith("pipe:"):
        return False
    try:
        with tarfile.open(urls[0]) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                ext = Path(member.name).name.partition(".")[2].lower()
                if ext in VIDEO_EXTENSIONS or FRAME_ENTRY.fullmatch(ext):
                    return True
                if ext in ("jpg", "jpeg", "png", "webp"):
                    return False
    except (OSError, tarfile.TarError):
        return False
    return False


# -- streams and loaders -----------------------------------------------------------------------
class VideoTrainStream(TrainStream):
    """`TrainStream` over video samples: a random clip of each (`frames` at `fps`), one random
    crop / flip per clip. Order, worker / rank split and resume are the image stream's."""

    collate = staticmethod(collate_video)

    def __init__(self, urls: Sequence[str], resolution: int, batch_size: int, tally: SkipTally, frames: int,
                 fps: float | None, **kwargs: Any):
        super().__init__(urls, resolution, batch_size, tally, **kwargs)
        self.frames = frames
        self.fps = fps

    def _transform(self, sample: dict, rng: random.Random) -> dict:
        try:
            clip = decode_sample_clip(sample, self.frames, self.fps, rng)
        except Exception as exn:
            raise ValueError(f"{_describe(sample)}: {exn}") from exn
        self.tally.ok()
        video = train_clip_transform(clip, self.resolution, rng, self.interpolation, self.random_flip, self.crop_scale)
        return {"video": video, "key": sample["__key__"], "text": sample_text(sample)}


class VideoEvalStream(EvalStream):
    """`EvalStream` over videos: the first clip of each, centre-cropped; shards or a folder of
    video files (a `<name>.txt` beside `<name>.mp4` is its caption)."""

    def __init__(self, source: str | Path | Sequence[str], resolution: int, tally: SkipTally, frames: int,
                 fps: float | None, max_videos: int | None = None, rank: int = 0, world_size: int = 1,
                 interpolation: str = "bicubic"):
        super().__init__(source, resolution, tally, max_videos, rank, world_size, interpolation)
        self.frames = frames
        self.fps = fps

    _FILES = f"video files ({', '.join(VIDEO_FILE_SUFFIXES)})"

    def _list_files(self, root: Path) -> list[Path]:
        return list_video_files(root)

    def _read_file(self, path: Path) -> dict:
        sample = {"__key__": path.relative_to(self.root).with_suffix("").as_posix(), "__url__": str(path),
                  path.suffix.lower().lstrip("."): path.read_bytes()}
        caption = path.with_suffix(".txt")
        if caption.is_file():
            sample["txt"] = caption.read_bytes()
        return sample

    def _transform(self, sample: dict) -> dict:
        try:
            clip = decode_sample_clip(sample, self.frames, self.fps)
        except Exception as exn:
            raise ValueError(f"{_describe(sample)}: {exn}") from exn
        self.tally.ok()
        video = eval_clip_transform(clip, self.resolution, self.interpolation)
        return {"video": video, "key": sample["__key__"], "text": sample_text(sample)}


def make_video_train_loader(
    shards: str | Sequence[str],
    resolution: int,
    batch_size: int,
    frames: int = 16,
    fps: float | None = 8.0,
    num_workers: int = 2,
    shuffle_buffer: int = 100,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    random_flip: bool = True,
    interpolation: str = "bicubic",
    skip_counter: SkipCounter | None = None,
    start_epoch: int = 0,
    crop_scale: tuple[float, float] | None = None,
) -> TrainLoader:
    """Infinite loader of training clips from video shards (see `make_train_loader`)."""
    skip_counter = skip_counter if skip_counter is not None else SkipCounter()
    stream = VideoTrainStream(
        resolve_shards(shards), resolution, batch_size, skip_counter.tally(), frames, fps,
        shuffle_buffer=shuffle_buffer, seed=seed, rank=rank, world_size=world_size, random_flip=random_flip,
        interpolation=interpolation, crop_scale=crop_scale,
    )
    stream.epoch = start_epoch
    return TrainLoader(stream, num_workers, skip_counter)


def make_video_eval_loader(
    source: str | Path | Sequence[str],
    resolution: int,
    batch_size: int,
    frames: int = 16,
    fps: float | None = 8.0,
    num_workers: int = 0,
    max_videos: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    interpolation: str = "bicubic",
    skip_counter: SkipCounter | None = None,
) -> wds.WebLoader:
    """Finite, deterministic loader of centre-cropped clips (the first of each video) of a folder
    of video files or video shards; each video on exactly one rank (see `make_eval_loader`)."""
    skip_counter = skip_counter if skip_counter is not None else SkipCounter()
    stream = VideoEvalStream(source, resolution, skip_counter.tally(), frames, fps, max_videos=max_videos,
                             rank=rank, world_size=world_size, interpolation=interpolation)
    loader = wds.WebLoader(stream, batch_size=None, num_workers=num_workers,
                           worker_init_fn=PreemptionShield() if num_workers > 0 else None)
    loader = loader.batched(batch_size, collation_fn=collate_video, partial=True)
    loader.skip_counter = skip_counter
    return loader
