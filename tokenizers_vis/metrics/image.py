"""Per-image fidelity metrics: quantisation, PSNR, SSIM, and the per-frame wrapper for video.

Reporting convention (see specs/evaluation.md): both images are quantised to uint8 first,
then PSNR and SSIM are computed per image on [0, 1] with data_range 1 and averaged over
images. This equals scikit-image on the uint8 images with data_range 255.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

__all__ = ["to_uint8", "quantize", "psnr_per_image", "ssim_per_image", "per_frame"]

# Gaussian SSIM window of Wang et al. 2004; the radius follows scipy/scikit-image (truncate 3.5).
SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)


def to_uint8(x: Tensor) -> Tensor:
    """[0, 1] float images -> uint8 by clamp and round (uint8 input is returned as is)."""
    if x.dtype == torch.uint8:
        return x
    return (x.detach().float() * 255.0).clamp_(0.0, 255.0).round_().to(torch.uint8)


def quantize(x: Tensor) -> Tensor:
    """Round-trip through uint8: the float32 [0, 1] image a saved PNG would give back."""
    return to_uint8(x).float().div_(255.0)


def psnr_per_image(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """PSNR of each image pair in dB, shape (B,); MSE over (C, H, W), computed in float64.

    Identical images give ``inf``, as scikit-image does.
    """
    _check_pair(x, y)
    diff = x.detach().double() - y.detach().double()
    mse = diff.square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def ssim_per_image(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """SSIM of each image pair, shape (B,): Gaussian window 11 / sigma 1.5, K1 0.01, K2 0.03,
    population covariance, per channel and averaged over channels and pixels.

    Uses torchmetrics' kernel, then averages only the pixels whose window lies inside the
    image, as scikit-image does: torchmetrics alone reflect-pads and averages the borders
    too, which makes its value differ from scikit-image's.
    """
    _check_pair(x, y)
    if min(x.shape[-2:]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least {2 * SSIM_RADIUS + 1} px per side, got {tuple(x.shape[-2:])}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=x.device.type, enabled=False):
        _, ssim_map = structural_similarity_index_measure(
            x.detach().to(dtype),
            y.detach().to(dtype),
            gaussian_kernel=True,
            sigma=SSIM_SIGMA,
            data_range=data_range,
            k1=0.01,
            k2=0.03,
            reduction="none",
            return_full_image=True,
        )
    r = SSIM_RADIUS
    return ssim_map[..., r:-r, r:-r].flatten(1).mean(dim=1)


def per_frame(metric_fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Lift a per-image metric ``f(x, y, **kw) -> (B,)`` to video: (B, T, 3, H, W) -> (B, T).

    Image batches (4-D) pass through unchanged.
    """

    @functools.wraps(metric_fn)
    def wrapped(x: Tensor, y: Tensor, **kwargs) -> Tensor:
        if x.dim() != 5:
            return metric_fn(x, y, **kwargs)
        _check_pair(x, y, ndim=5)
        b, t = x.shape[:2]
        return metric_fn(x.flatten(0, 1), y.flatten(0, 1), **kwargs).reshape(b, t)

    return wrapped


def _check_pair(x: Tensor, y: Tensor, ndim: int = 4) -> None:
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() != ndim:
        layout = "(B, C, H, W)" if ndim == 4 else "(B, T, C, H, W)"
        raise ValueError(f"expected {layout} images, got shape {tuple(x.shape)}; use per_frame for video")
