import random

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizers_vis.data.transforms import ColorJitter, decode_label, eval_transform, train_transform


def _ramp(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :].repeat(height, 0)
    return Image.fromarray(np.stack([x, x, x], -1).round().astype(np.uint8))


def test_eval_transform_resizes_short_side_and_centre_crops():
    img = _ramp(64, 32)  # short side 32 -> already at resolution: crop only
    out = eval_transform(img, 32)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = torch.from_numpy(np.array(img)[:, 16:48]).permute(2, 0, 1).float() / 255
    assert torch.equal(out, expected)
    assert eval_transform(_ramp(40, 90), 16).shape == (3, 16, 16)


def test_train_transform_shapes_range_and_seeded_randomness():
    img = _ramp(96, 48)
    outs = [train_transform(img, 24, random.Random(s)) for s in range(8)]
    for out in outs:
        assert out.shape == (3, 24, 24) and 0.0 <= out.min() and out.max() <= 1.0
    assert torch.equal(outs[0], train_transform(img, 24, random.Random(0)))
    # Random crops of a horizontal ramp differ in where they start; flips reverse it.
    left_columns = {round(float(o[0, 0, 0]), 3) for o in outs}
    assert len(left_columns) > 2
    rising = [bool(o[0, 0, -1] > o[0, 0, 0]) for o in outs]
    assert any(rising) and not all(rising)
    no_flip = [train_transform(img, 24, random.Random(s), random_flip=False) for s in range(8)]
    assert all(bool(o[0, 0, -1] > o[0, 0, 0]) for o in no_flip)


def test_interpolation_name_is_checked():
    with pytest.raises(ValueError, match="interpolation"):
        eval_transform(_ramp(8, 8), 4, interpolation="cubic-ish")
    near = eval_transform(_ramp(64, 64), 16, interpolation="nearest")
    cubic = eval_transform(_ramp(64, 64), 16, interpolation="bicubic")
    assert not torch.equal(near, cubic)


def test_decode_label():
    assert decode_label({"cls": b"7\n"}) == 7
    assert decode_label({"png": b""}) == -1


def test_crop_scale_zooms_into_a_random_square_and_is_seeded():
    img = _ramp(200, 100)  # the brightness span of a crop tells how wide it was
    plain = [train_transform(img, 32, random.Random(s), random_flip=False) for s in range(20)]
    zoomed = [train_transform(img, 32, random.Random(s), random_flip=False, crop_scale=(0.8, 0.8)) for s in range(20)]
    assert all(z.shape == (3, 32, 32) for z in zoomed)
    # An 80 px square of a 100 px short side spans 0.8x the ramp width of a 100 px square.
    span = lambda x: float(x[0, 0, -1] - x[0, 0, 0])  # noqa: E731
    assert abs(sum(map(span, zoomed)) / sum(map(span, plain)) - 0.8) < 0.03
    again = train_transform(img, 32, random.Random(3), random_flip=False, crop_scale=(0.8, 1.0))
    assert torch.equal(again, train_transform(img, 32, random.Random(3), random_flip=False, crop_scale=(0.8, 1.0)))


def test_crop_scale_is_checked_by_the_datamodule():
    from tokenizers_vis.data import ImageDataModule

    with pytest.raises(ValueError, match=r"data.crop_scale must be \[lo, hi\]"):
        ImageDataModule(train_shards="x", val_shards="y", resolution=32, batch_size=2, crop_scale=[1.0, 0.5])


def test_color_jitter_shifts_hue_within_its_range_and_is_seeded():
    red = Image.fromarray(np.full((16, 16, 3), (200, 30, 30), dtype=np.uint8))
    jitter = ColorJitter(hue=0.5)
    outs = [train_transform(red, 16, random.Random(s), random_flip=False, color_jitter=jitter) for s in range(30)]
    colours = torch.stack([o.mean(dim=(1, 2)) for o in outs])
    # Any hue: some draws turn red green- or blue-dominant, and the brightness of the colour stays.
    assert (colours.argmax(dim=1) != 0).sum() >= 10
    assert torch.allclose(colours.max(dim=1).values, torch.full((30,), 200 / 255), atol=0.02)
    again = train_transform(red, 16, random.Random(7), random_flip=False, color_jitter=jitter)
    assert torch.equal(again, outs[7])
    # A small hue range keeps red red; brightness alone scales every channel.
    small = [train_transform(red, 16, random.Random(s), random_flip=False, color_jitter=ColorJitter(hue=0.02))
             for s in range(10)]
    assert all(o.mean(dim=(1, 2)).argmax() == 0 for o in small)
    bright = train_transform(red, 16, random.Random(1), random_flip=False, color_jitter=ColorJitter(brightness=0.5))
    ratio = bright.mean(dim=(1, 2)) / (torch.tensor([200, 30, 30]) / 255)
    assert 0.5 <= float(ratio[0]) <= 1.5 and torch.allclose(ratio, ratio[0].expand(3), atol=0.02)


def test_color_jitter_values_are_checked():
    from tokenizers_vis.data import ImageDataModule

    with pytest.raises(ValueError, match=r"data.color_jitter.hue must be in \[0, 0.5\]"):
        ColorJitter(hue=0.7)
    with pytest.raises(ValueError, match=r"data.color_jitter.saturation must be in \[0, 1\)"):
        ColorJitter(saturation=1.5)
    with pytest.raises(ValueError, match=r"unknown keys \['sharpness'\]"):
        ImageDataModule(train_shards="x", val_shards="y", resolution=32, batch_size=2,
                        color_jitter={"sharpness": 0.2})
