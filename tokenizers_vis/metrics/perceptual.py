"""LPIPS-VGG as an evaluation metric, with the VGG backbone found or fetched by nn/weights.

The lpips package ships its calibrated linear heads and takes the ImageNet VGG16 trunk from
torchvision. We build the trunk randomly initialised and fill it from ``vgg16-397923af.pth``
(torchvision's file): a given path, or the torch hub cache, where it is fetched from torchvision's
URL (checksum checked) when missing unless downloads are off (``download=False``, HF_HUB_OFFLINE).
"""

from __future__ import annotations

import os
import warnings

import lpips
import torch
from torch import Tensor

from tokenizers_vis.nn.pretrained import FrozenModule
from tokenizers_vis.nn.weights import find_weights, read_state_file

__all__ = ["VGG16_WEIGHTS_FILE", "build_lpips_vgg", "LPIPSMetric"]

VGG16_WEIGHTS_FILE = "vgg16-397923af.pth"
# torchvision's VGG16_Weights.IMAGENET1K_V1.url: what lpips (through torchvision) fetches.
VGG16_WEIGHTS_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def build_lpips_vgg(
    weights_path: str | os.PathLike | None = None,
    random_backbone: bool = False,
    option: str = "lpips_weights",
    download: bool = True,
) -> lpips.LPIPS:
    """An ``lpips.LPIPS(net="vgg")`` with its trunk loaded offline, frozen, in eval mode.

    Args:
        weights_path: torchvision VGG16 ImageNet weights (file or folder); None looks in the
            torch hub cache.
        random_backbone: keep the trunk randomly initialised (tests; values are meaningless).
        option: config option named in the error when the weights are missing.
        download: fetch a missing file into the torch hub cache (off as well under HF_HUB_OFFLINE).

    Raises:
        MissingWeightsError: the VGG16 file is missing (and not fetched) and ``random_backbone`` is False.
    """
    path = None if random_backbone else find_weights(weights_path, VGG16_WEIGHTS_FILE, option, "LPIPS VGG16 backbone",
                                                     url=VGG16_WEIGHTS_URL, download=download)
    with warnings.catch_warnings():
        # lpips passes torchvision's deprecated `pretrained=False`; harmless here.
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    if path is not None:
        vgg = read_state_file(path)
        # lpips slices torchvision's `features` Sequential but keeps each layer's index:
        # "net.slice3.10.weight" is torchvision's "features.10.weight".
        trunk = {name: vgg[f"features.{name.split('.', 1)[1]}"] for name in model.net.state_dict()}
        model.net.load_state_dict(trunk, strict=True)
    model.requires_grad_(False)
    return model.eval()


class LPIPSMetric(FrozenModule):
    """Per-image LPIPS-VGG distance for [0, 1] images: ``metric(x, y) -> (B,)``.

    Runs in float32 without gradients, whatever autocast the caller is under; a metric never
    trains, so it stays in eval mode (dropout in the linear heads off).
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, random_backbone: bool = False,
                 download: bool = True):
        super().__init__()
        self.lpips = build_lpips_vgg(weights_path, random_backbone, download=download)
        self._freeze()

    @torch.no_grad()
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.dim() != 4:
            raise ValueError(f"expected two (B, 3, H, W) batches of equal shape, got {tuple(x.shape)}, {tuple(y.shape)}")
        device = self.lpips.scaling_layer.shift.device
        with torch.autocast(device_type=device.type, enabled=False):
            dist = self.lpips(x.to(device, torch.float32), y.to(device, torch.float32), normalize=True)
        return dist.flatten()
