"""Tiny shard sets built in tmp_path: a dozen small random images, some labelled."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tokenizers_vis.data.shards import write_shards

NUM_IMAGES = 12
SHARD_SIZE = 5  # 3 shards: 5 + 5 + 2
FORMATS = ["png", "jpg", "png", "jpeg", "webp", "png"]


def random_image(rng: np.random.Generator, mode: str = "RGB") -> Image.Image:
    height, width = rng.integers(20, 48, size=2)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def encode(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    pil_format = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    img.save(buffer, format=pil_format, **({"lossless": True} if fmt == "webp" else {}))
    return buffer.getvalue()


def make_samples(n: int = NUM_IMAGES, seed: int = 0) -> list[dict]:
    """Samples in assorted formats (one grayscale); even indices carry a class label."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        fmt = FORMATS[i % len(FORMATS)]
        img = random_image(rng, "L" if i == 3 else "RGB")
        sample = {"__key__": f"img{i:03d}", fmt: encode(img, fmt)}
        if i % 2 == 0:
            sample["cls"] = i // 2
        samples.append(sample)
    return samples


@pytest.fixture
def samples() -> list[dict]:
    return make_samples()


@pytest.fixture
def shard_dir(tmp_path, samples):
    out = tmp_path / "shards"
    write_shards(samples, out, "train", SHARD_SIZE)
    return out
