"""Image decoding and the train / eval geometric transforms.

Randomness comes from an explicit `random.Random`, never the global RNGs, so that a
stream seeded from (seed, rank, worker) is reproducible whatever else runs in the process.
"""

from __future__ import annotations

import io
import random
from collections.abc import Mapping
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ColorJitter:
    """Random photometric change of a training image: brightness, contrast and saturation factors
    drawn uniformly from [1 - x, 1 + x], a hue shift from [-hue, hue] turns of the colour wheel
    (0.5: any hue). Makes a small data set's palette no longer something the tokens can assume."""

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"data.color_jitter.{name} must be in [0, 1), got {value}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"data.color_jitter.hue must be in [0, 0.5], got {self.hue}")

    def __call__(self, image: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """(3, H, W) in [0, 1] -> the same, jittered with draws from `rng`."""
        if self.brightness:
            image = F.adjust_brightness(image, rng.uniform(1 - self.brightness, 1 + self.brightness))
        if self.contrast:
            image = F.adjust_contrast(image, rng.uniform(1 - self.contrast, 1 + self.contrast))
        if self.saturation:
            image = F.adjust_saturation(image, rng.uniform(1 - self.saturation, 1 + self.saturation))
        if self.hue:
            image = F.adjust_hue(image, rng.uniform(-self.hue, self.hue))
        return image.clamp_(0.0, 1.0)


def train_transform(
    img: Image.Image,
    resolution: int,
    rng: random.Random,
    interpolation: str = "bicubic",
    random_flip: bool = True,
    crop_scale: tuple[float, float] | None = None,
    color_jitter: ColorJitter | None = None,
) -> torch.Tensor:
    """Short-side resize to `resolution`, a random `resolution` square, a random h-flip, then
    `color_jitter` when given.

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
    image = to_tensor(img)
    return color_jitter(image, rng) if color_jitter is not None else image
