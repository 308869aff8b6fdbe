"""Frozen perceptual losses: LPIPS (VGG16) and TiTok's ConvNeXt-S logit loss.

Both take images in [0, 1] and return a scalar batch mean. Their ImageNet backbones are read
from an explicit path or the torch hub cache; a file missing from the cache is fetched there from
torchvision's URL, checksum checked, as torchvision does (`tokenizers_vis.nn.weights`), unless
`download=False` or HF_HUB_OFFLINE is set, where a missing file raises an error that names the
config key to set. `random_backbone=True` builds random weights instead, for tests and CPU smoke runs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lpips
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from tokenizers_vis.nn.pretrained import IMAGENET_MEAN, IMAGENET_STD, FrozenModule
from tokenizers_vis.nn.weights import MissingWeightsError, find_weights, read_state_file

# Hydra keys a user sets to provide the weights (named in the missing-weights error).
LPIPS_WEIGHTS_KEY = "model.objective.lpips_weights"
CONVNEXT_WEIGHTS_KEY = "model.objective.convnext_weights"
RANDOM_WEIGHTS_KEY = "model.objective.random_perceptual_weights"
DOWNLOAD_KEY = "model.objective.download_weights"

# File names torchvision gives these ImageNet checkpoints in the torch hub cache, and its URLs
# (VGG16_Weights.IMAGENET1K_V1, ConvNeXt_Small_Weights.IMAGENET1K_V1), whose names they are.
VGG16_CACHE_FILE = "vgg16-397923af.pth"
CONVNEXT_SMALL_CACHE_FILE = "convnext_small-0c510722.pth"
WEIGHTS_URLS = {
    VGG16_CACHE_FILE: "https://download.pytorch.org/models/vgg16-397923af.pth",
    CONVNEXT_SMALL_CACHE_FILE: "https://download.pytorch.org/models/convnext_small-0c510722.pth",
}


def resolve_weights_file(path: str | None, cache_file: str, config_key: str, download: bool = True) -> Path:
    """The local weights file to load: `path` if given, else the torch hub cache copy (fetched from
    torchvision's URL when missing and `download` allows it).

    The lookup is `tokenizers_vis.nn.weights.find_weights` (shared with the metrics); the error it
    raises (a FileNotFoundError naming the file and the config key) gains the smoke-test hint.
    """
    try:
        return find_weights(path, cache_file, config_key, description="ImageNet weights",
                            url=WEIGHTS_URLS.get(cache_file), download=download, download_option=DOWNLOAD_KEY)
    except MissingWeightsError as err:
        raise MissingWeightsError(f"{err} For smoke tests set {RANDOM_WEIGHTS_KEY}=true to use random weights.") from None


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state = read_state_file(path)
    # Accept checkpoints saved from a DDP-wrapped model as well.
    return {k.removeprefix("module."): v for k, v in state.items()}


class LPIPSLoss(FrozenModule):
    """LPIPS (VGG16 trunk, v0.1 linear heads shipped inside the `lpips` package) on [0, 1] images."""

    def __init__(self, random_backbone: bool = False, vgg_weights: str | None = None, download: bool = True):
        super().__init__()
        # Resolve first so a missing file fails before the (slow) network build.
        weights_file = None
        if not random_backbone:
            weights_file = resolve_weights_file(vgg_weights, VGG16_CACHE_FILE, LPIPS_WEIGHTS_KEY, download)
        with warnings.catch_warnings():
            # lpips still passes torchvision's deprecated `pretrained=` flag; harmless here.
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
            # pnet_rand=True: lpips would otherwise download the VGG16 weights itself.
            self.lpips = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        if weights_file is not None:
            self._load_vgg16(weights_file)
        self._freeze()

    def _load_vgg16(self, path: Path) -> None:
        """Load torchvision VGG16 `features.{i}.*` weights into lpips's `net.slice*.{i}.*` layers."""
        state = _load_state_dict(path)
        mapped = {}
        for slice_name, block in self.lpips.net.named_children():
            for key in block.state_dict():
                source = f"features.{key}"  # lpips keeps torchvision's layer indices as child names
                if source not in state:
                    raise KeyError(f"{path} is not a torchvision VGG16 state dict: missing {source!r}")
                mapped[f"{slice_name}.{key}"] = state[source]
        self.lpips.net.load_state_dict(mapped, strict=True)

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        distance = self.lpips(reconstruction, target, normalize=True)  # normalize: [0, 1] -> [-1, 1]
        return distance.float().mean()


class ConvNeXtPerceptualLoss(FrozenModule):
    """MSE between ConvNeXt-S ImageNet logits of reconstruction and target (TiTok's extra perceptual term)."""

    def __init__(self, random_backbone: bool = False, weights: str | None = None, input_size: int = 224,
                 download: bool = True):
        super().__init__()
        self.input_size = input_size
        weights_file = None
        if not random_backbone:
            weights_file = resolve_weights_file(weights, CONVNEXT_SMALL_CACHE_FILE, CONVNEXT_WEIGHTS_KEY, download)
        self.net = torchvision.models.convnext_small(weights=None)
        if weights_file is not None:
            self.net.load_state_dict(_load_state_dict(weights_file), strict=True)
        # Constants, not weights: kept out of the state dict.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(
                images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True
            )
        return self.net((images - self.mean) / self.std)

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_logits = self._logits(target)
        return F.mse_loss(self._logits(reconstruction).float(), target_logits.float())
