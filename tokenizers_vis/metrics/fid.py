"""Fréchet Inception Distance with streaming float64 statistics.

The measuring standard (specs/evaluation.md): TF-FID Inception-v3 pool3 features computed
exactly as torch-fidelity computes them (same network, weights and resize to 299), mean and
covariance accumulated in float64, and the pytorch-fid formula with scipy's matrix square
root. Statistics are sums, so shards from several ranks combine with one all-reduce.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn

from tokenizers_vis.metrics.distributed import (
    all_reduce_max_int,
    all_reduce_sum,
    communication_device,
    is_distributed,
)
from tokenizers_vis.metrics.image import to_uint8
from tokenizers_vis.nn.pretrained import FrozenModule
from tokenizers_vis.nn.weights import find_weights

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "FeatureStats",
    "frechet_distance",
    "InceptionFeatures",
    "StreamingFID",
]

log = logging.getLogger(__name__)

# pytorch-fid's name for the TF-FID weights. torch-fidelity and torchmetrics cache the same
# file (same sha256 prefix) as "weights-inception-...", so both names are accepted.
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
_INCEPTION_WEIGHTS_FILES = (INCEPTION_WEIGHTS_FILE, "weights-inception-2015-12-05-6726825d.pth")
# Where torch-fidelity fetches them (its URL_INCEPTION_V3): a fetch lands in the torch hub cache
# under torch-fidelity's own name, so either library finds the other's copy.
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


class FeatureStats:
    """Streaming first and second moments of a feature set, in float64.

    Keeps the count, the feature sum (D,) and the sum of outer products (D, D); these add up
    across batches, chunks and ranks, so the order of accumulation does not matter.
    """

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.n = 0
        self.sum: Tensor | None = None
        self.outer: Tensor | None = None
        if dim is not None:
            self._allocate(dim, torch.device("cpu"))

    def _allocate(self, dim: int, device: torch.device) -> None:
        self.dim = dim
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: Tensor) -> "FeatureStats":
        """Add a batch of features (B, D) (trailing singleton dims are flattened)."""
        f = features.detach().reshape(features.shape[0], -1).to(torch.float64)
        if self.sum is None:
            self._allocate(f.shape[1], f.device)
        elif self.n == 0 and self.sum.device != f.device:
            # Statistics live where the features are, so updates never copy to the host.
            self._allocate(self.dim, f.device)
        if f.shape[1] != self.dim:
            raise ValueError(f"features have {f.shape[1]} dims, statistics have {self.dim}")
        self.n += f.shape[0]
        self.sum += f.sum(dim=0).to(self.sum.device)
        self.outer += (f.T @ f).to(self.outer.device)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add another set's statistics into this one (in place)."""
        if other.n == 0:
            return self
        if self.sum is None:
            self._allocate(other.dim, other.sum.device)
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of {other.dim} and {self.dim} dims")
        self.n += other.n
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.outer.device)
        return self

    def mean(self) -> Tensor:
        if self.n == 0:
            raise ValueError("no features accumulated")
        return self.sum / self.n

    def cov(self) -> Tensor:
        """Unbiased covariance (divides by n - 1), as numpy.cov and torch-fidelity."""
        if self.n < 2:
            raise ValueError(f"the covariance needs at least 2 samples, got {self.n}")
        mu = self.mean()
        return (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)

    def all_reduce(self) -> "FeatureStats":
        """Statistics summed over all ranks, as a new object (self is unchanged).

        Not in place, so it can be called again after more updates without double counting.
        Every rank must call it (it is a collective); a rank that saw no features takes part
        with zeros. Without a process group this is a copy.
        """
        if not is_distributed():
            return self.copy()
        dim = all_reduce_max_int(self.dim or 0)
        reduced = FeatureStats()
        if dim == 0:
            return reduced  # no rank has any features
        if self.dim not in (None, dim):
            raise ValueError(f"ranks disagree on the feature size: {self.dim} here, {dim} elsewhere")
        local = self if self.sum is not None else FeatureStats(dim)
        device = local.sum.device if self.sum is not None else communication_device()
        reduced.n = int(all_reduce_sum(torch.tensor([self.n], dtype=torch.int64)).item())
        reduced.dim = dim
        reduced.sum = all_reduce_sum(local.sum.to(device))
        reduced.outer = all_reduce_sum(local.outer.to(device))
        return reduced

    def copy(self) -> "FeatureStats":
        return FeatureStats.from_state_dict(self.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "dim": self.dim,
            "sum": None if self.sum is None else self.sum.clone(),
            "outer": None if self.outer is None else self.outer.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "FeatureStats":
        stats = cls()
        stats.n = int(state["n"])
        stats.dim = state["dim"]
        stats.sum = None if state["sum"] is None else state["sum"].clone().to(torch.float64)
        stats.outer = None if state["outer"] is None else state["outer"].clone().to(torch.float64)
        return stats

    def __repr__(self) -> str:
        return f"FeatureStats(n={self.n}, dim={self.dim})"


def frechet_distance(mu1: Any, cov1: Any, mu2: Any, cov2: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2), in float64 (pytorch-fid formula).

    ||mu1 - mu2||^2 + Tr(cov1 + cov2 - 2 sqrtm(cov1 cov2)), with scipy's matrix square root;
    when the product is singular the square root is retried with ``eps`` added to both
    diagonals, and a non-negligible imaginary part is an error rather than silently dropped.
    Accepts numpy arrays or torch tensors.
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    cov1, cov2 = np.atleast_2d(_as_float64(cov1)), np.atleast_2d(_as_float64(cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes do not match: mu {mu1.shape}/{mu2.shape}, cov {cov1.shape}/{cov2.shape}")

    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        log.warning("FID: the covariance product is singular; adding %g to the diagonals", eps)
        offset = np.eye(cov1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: the matrix square root has an imaginary component of {imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


class InceptionFeatures(FrozenModule):
    """2048-d pool3 features of the TF-FID Inception-v3, exactly as torch-fidelity computes them.

    Wraps torch-fidelity's ``FeatureExtractorInceptionV3`` (its weights and its TF1-style
    bilinear resize to 299), loading the weights from ``weights_path`` or the torch hub cache,
    where they are fetched from torch-fidelity's URL (checksum checked) when missing, unless
    ``download`` is False or HF_HUB_OFFLINE is set. Input: (B, 3, H, W) uint8, or float in [0, 1]
    (quantised to uint8 first).

    Raises:
        MissingWeightsError: the weights file is not found (nor fetched); the message says where
            to put it and names the option ``inception_weights=PATH``.
    """

    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike | None = None, download: bool = True):
        super().__init__()
        # Imported here: torch-fidelity is only needed when real Inception features are used.
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = find_weights(weights_path, _INCEPTION_WEIGHTS_FILES, "inception_weights", "FID Inception-v3 weights",
                            url=INCEPTION_WEIGHTS_URL, download=download)
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
        )
        self._freeze()  # eval mode always: the batch-norm statistics are part of the standard

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.net(to_uint8(images))[0]


class StreamingFID:
    """FID between a real and a fake image stream, accumulated batch by batch.

    Both streams go through the same feature extractor: TF-FID Inception by default, or any
    injected module mapping (B, 3, H, W) uint8 images to (B, D) features (tests use a small
    random network). Images are uint8 or float in [0, 1]; floats are quantised to uint8.
    ``compute()`` sums the statistics over ranks first, so it is a collective under DDP.
    """

    def __init__(self, feature_extractor: nn.Module | None = None, weights_path: str | os.PathLike | None = None,
                 download: bool = True):
        self.extractor = feature_extractor if feature_extractor is not None else InceptionFeatures(weights_path,
                                                                                                   download)
        self.extractor.eval().requires_grad_(False)
        dim = getattr(self.extractor, "num_features", None)
        self._dim = dim if isinstance(dim, int) else None
        self.reset()

    def to(self, device: torch.device | str) -> "StreamingFID":
        self.extractor.to(device)
        return self

    def reset(self) -> None:
        self.real = FeatureStats(self._dim)
        self.fake = FeatureStats(self._dim)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Features of a batch, on the extractor's device."""
        x = to_uint8(images)
        device = _module_device(self.extractor)
        return self.extractor(x if device is None else x.to(device))

    def update(self, real: Tensor | None, fake: Tensor | None) -> None:
        """Add a batch to either or both sides (None skips a side)."""
        if real is not None:
            self.real.update(self.features(real))
        if fake is not None:
            self.fake.update(self.features(fake))

    def compute(self) -> float:
        real, fake = self.real.all_reduce(), self.fake.all_reduce()
        if real.n < 2 or fake.n < 2:
            raise ValueError(f"FID needs at least 2 images per side, got {real.n} real and {fake.n} fake")
        return frechet_distance(real.mean(), real.cov(), fake.mean(), fake.cov())


def _as_float64(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _module_device(module: nn.Module) -> torch.device | None:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return None
