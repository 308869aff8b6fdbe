"""Fréchet Video Distance with the standard I3D and the streaming float64 statistics of FID.

The network is the Kinetics-400 I3D exported to TorchScript by StyleGAN-V (`i3d_torchscript.pt`,
also used by cd-fvd and most video-generation code), called as those tools call it: each frame
scaled to [-1, 1], short side resized to 224 (bilinear) and centre-cropped, the clip laid out
(B, 3, T, 224, 224), and `net(x, rescale=False, resize=False, return_features=True)` giving the
400-d logits before the softmax. The weights come from a path (`i3d_weights=`) or the torch hub
cache and are never downloaded; a missing file is a `MissingWeightsError` like FID's. The
statistics are FID's `FeatureStats` (float64 sums, one all-reduce) and `frechet_distance`.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers_vis.metrics.fid import StreamingFID
from tokenizers_vis.metrics.image import to_uint8
from tokenizers_vis.nn.weights import MissingWeightsError, find_weights

__all__ = ["I3D_WEIGHTS_FILE", "I3D_MIN_FRAMES", "I3DFeatures", "StreamingFVD"]

I3D_WEIGHTS_FILE = "i3d_torchscript.pt"
# The I3D's temporal pooling needs at least this many frames.
I3D_MIN_FRAMES = 9
I3D_RESOLUTION = 224


class I3DFeatures(nn.Module):
    """Video (B, T, 3, H, W), uint8 or float in [0, 1] (quantised to uint8 first) -> (B, 400)
    I3D features, through a TorchScript file found by `find_weights` (never downloaded).

    Any TorchScript module with the I3D call `forward(x, rescale: bool, resize: bool,
    return_features: bool)` loads the same way (tests save a tiny random one).

    Raises:
        MissingWeightsError: no file (names `i3d_torchscript.pt`, the hub cache and `i3d_weights=PATH`),
            or a file TorchScript cannot load.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, resolution: int = I3D_RESOLUTION):
        super().__init__()
        path = find_weights(weights_path, I3D_WEIGHTS_FILE, "i3d_weights",
                            "FVD I3D weights (the Kinetics-400 TorchScript of StyleGAN-V)")
        try:
            with warnings.catch_warnings():
                # The released I3D only exists as TorchScript, which torch now marks deprecated.
                warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)
                self.net = torch.jit.load(str(path), map_location="cpu")
        except Exception as err:  # TorchScript raises RuntimeError / ValueError for non-archives
            raise MissingWeightsError(f"FVD I3D weights: {path} is not a TorchScript archive ({err}); point "
                                      f"i3d_weights=PATH at {I3D_WEIGHTS_FILE}") from err
        self.resolution = resolution
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "I3DFeatures":
        return super().train(False)  # batch-norm statistics are part of the standard

    @torch.no_grad()
    def forward(self, video: Tensor) -> Tensor:
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"expected video (B, T, 3, H, W), got {tuple(video.shape)}")
        if video.shape[1] < I3D_MIN_FRAMES:
            raise ValueError(f"the I3D needs clips of at least {I3D_MIN_FRAMES} frames, got {video.shape[1]}")
        b, t = video.shape[:2]
        with torch.autocast(device_type=video.device.type, enabled=False):
            frames = to_uint8(video).flatten(0, 1).float() / 255.0
            h, w = frames.shape[-2:]
            scale = self.resolution / min(h, w)
            size = (max(self.resolution, round(h * scale)), max(self.resolution, round(w * scale)))
            frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
            top, left = (size[0] - self.resolution) // 2, (size[1] - self.resolution) // 2
            frames = frames[..., top:top + self.resolution, left:left + self.resolution]
            x = (frames * 2.0 - 1.0).reshape(b, t, 3, self.resolution, self.resolution).transpose(1, 2)
            return self.net(x.contiguous(), rescale=False, resize=False, return_features=True).float()


class StreamingFVD(StreamingFID):
    """rFVD between a real and a reconstructed clip stream: `StreamingFID` over I3D features
    (or an injected module mapping uint8 (B, T, 3, H, W) to (B, D)). `compute()` is a collective
    under DDP, like FID's."""

    def __init__(self, feature_extractor: nn.Module | None = None, weights_path: str | os.PathLike | None = None):
        super().__init__(feature_extractor if feature_extractor is not None else I3DFeatures(weights_path))
