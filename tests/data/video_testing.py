"""Small mp4 files with known content, written with PyAV (shared by the video tests).

Frame t of a test video is grey at level `step * t` (its frame number, readable back from the
pixels; a step of 8 survives two encodes) with a white bar that moves 2 px to the right per frame.
Grey and white have no colour, so H.264's colour subsampling loses nothing, and crf 0 keeps the
grey level to +-2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tokenizers_vis.data.video import encode_video

LEVEL_STEP = 4


def pattern_frames(num_frames: int, height: int = 24, width: int = 32, bar: bool = True,
                   step: int = LEVEL_STEP) -> np.ndarray:
    frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frames[t] = step * t
        if bar:
            x = (2 * t) % (width - 2)
            frames[t, :, x:x + 2] = 255
    return frames


def pattern_mp4(num_frames: int = 30, fps: float = 30.0, height: int = 24, width: int = 32, bar: bool = True,
                step: int = LEVEL_STEP) -> bytes:
    return encode_video(pattern_frames(num_frames, height, width, bar, step), fps, crf=0)


def write_mp4(path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pattern_mp4(**kwargs))
    return path


def frame_numbers(clip, step: int = LEVEL_STEP) -> list[int]:
    """The frame numbers of a decoded clip (T, 3, H, W) uint8 of pattern frames: the grey level of
    the rightmost column, which the bar never reaches."""
    levels = clip.float()[:, 0, :, -1].median(dim=1).values
    return [int(round(float(v) / step)) for v in levels]
