"""Image decoding and the train / eval geometric transforms.

Randomness comes from an explicit `random.Random`, never the global RNGs, so that a
stream seeded from (seed, rank, worker) is reproducible whatever else runs in the process.
"""

from __future__ import annotations

import io
import random
from collections.abc import Mapping

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F


INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
}


def interpolation_mode(name: str) -> InterpolationMode:
    try:
        return INTERPOLATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; choose from {sorted(INTERPOLATIONS)}") from None


def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes (any format PIL reads) as a fully loaded RGB PIL image."""
    with Image.open(io.BytesIO(data)) as img:
        # convert() forces the full decode, so truncated data fails here, not later.
        return img.convert("RGB")


def decode_label(sample: Mapping[str, object]) -> int:
    """The integer in the sample's "cls" entry, or -1 when it has none."""
    value = sample.get("cls")
    if value is None:
        return -1
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8")
    return int(str(value).strip())


def decode_text(sample: Mapping[str, object]) -> str | None:
    """The caption in the sample's "txt" entry (UTF-8), or None when it has none."""
    value = sample.get("txt")
    if value is None:
        return None
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def resize_short_side(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    # PIL resampling is always antialiased; the same image size is returned untouched.
    return F.resize(img, size, interpolation=interpolation_mode(interpolation), antialias=True)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]."""
    return F.pil_to_tensor(img).float().div_(255.0)


def eval_transform(img: Image.Image, resolution: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Short-side resize to `resolution`, then the centre `resolution` square."""
    img = resize_short_side(img, resolution, interpolation)
    return to_tensor(F.center_crop(img, [resolution, resolution]))


def train_transform(
    img: Image.Image,
    resolution: int,
    rng: random.Random,
    interpolation: str = "bicubic",
    random_flip: bool = True,
    crop_scale: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Short-side resize to `resolution`, a random `resolution` square, a random h-flip.

    crop_scale (lo, hi): first a random square whose side is a uniform fraction in [lo, hi] of the
    short side (TokenFlow's recipe: 0.8-1.0), so training also sees slightly zoomed-in views.
    """
    if crop_scale is not None:
        lo, hi = crop_scale
        side = max(1, round(min(img.width, img.height) * rng.uniform(lo, hi)))
        img = F.crop(img, rng.randint(0, img.height - side), rng.randint(0, img.width - side), side, side)
    img = resize_short_side(img, resolution, interpolation)
    top = rng.randint(0, img.height - resolution)
    left = rng.randint(0, img.width - resolution)
    img = F.crop(img, top, left, resolution, resolution)
    if random_flip and rng.random() < 0.5:
        img = F.horizontal_flip(img)
    return to_tensor(img)
