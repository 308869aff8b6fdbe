"""Quantizers behind one interface.

`forward(z) -> (z_q, ids, aux)` with z of shape (..., dim) (channels last), `aux` a dict holding
the weighted total under "loss" plus named parts and statistics; `embed(ids) -> z_q`;
`codebook_size`. All run in float32 even under autocast: distances and argmin in bf16 pick
wrong codes.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.nn.distributed import is_distributed


@contextmanager
def float32():
    """Disable autocast on every device type for the enclosed code."""
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        yield


def squared_distances(z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(N, D) x (K, D) -> (N, K) as ||z||^2 + ||e||^2 - 2 z.e: the expansion of the official
    VQ-VAE / TiTok / TokenFlow code, so ties and near-ties resolve as in the released models."""
    return z.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * z @ codes.t()


class Quantizer(nn.Module, ABC):
    codebook_size: int | None = None

    @abstractmethod
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        ...

    @abstractmethod
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        ...


class VectorQuantizer(Quantizer):
    """Nearest-neighbour VQ with a gradient-trained codebook (VQ-VAE / TiTok).

    Written here rather than taken from vector-quantize-pytorch because weight compatibility with
    the released TiTok needs exactly its parametrisation and loss: one `embedding` weight trained by
    the codebook loss mse(z_q, sg(z)) (not EMA k-means), commitment 0.25 * mse(sg(z_q), z), l2
    lookup as "normalise both, then squared distance". Dead-code restart is our addition.

    use_l2_norm: normalise inputs and codes (cosine lookup; TiTok S/B/L).
    dead_code_threshold: a code whose exponential moving average of hits per batch falls below
        this is reset to a random encoder output of the current batch (0 disables). Under DDP the
        hit counts are summed over ranks and the codebook broadcast from rank 0, so all ranks agree.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        use_l2_norm: bool = False,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        dead_code_threshold: float = 0.0,
        usage_decay: float = 0.99,
    ):
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.use_l2_norm = use_l2_norm
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight
        self.dead_code_threshold = dead_code_threshold
        self.usage_decay = usage_decay
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if dead_code_threshold > 0:
            # Starts at the threshold so no code counts as dead before it had a chance.
            self.register_buffer("usage", torch.full((codebook_size,), float(dead_code_threshold) * 2))

    def codebook(self) -> torch.Tensor:
        weight = self.embedding.weight.float()
        return F.normalize(weight, dim=-1) if self.use_l2_norm else weight

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """ids of the nearest codes for z of shape (N, dim), by ||z||^2 + ||e||^2 - 2 z.e."""
        return squared_distances(z, self.codebook()).argmin(dim=1)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        with float32():
            return F.embedding(ids, self.codebook())

    def forward(self, z: torch.Tensor):
        with float32():
            shape = z.shape
            z = z.float().reshape(-1, self.dim)
            if self.use_l2_norm:
                z = F.normalize(z, dim=-1)
            ids = self.lookup(z.detach())
            z_q = F.embedding(ids, self.codebook())
            commitment = self.commitment_weight * F.mse_loss(z_q.detach(), z)
            codebook = self.codebook_weight * F.mse_loss(z_q, z.detach())
            z_st = z + (z_q - z).detach()  # straight-through: decoder gradients reach the encoder
            if self.training and self.dead_code_threshold > 0:
                self._restart_dead_codes(z.detach(), ids)
            ids = ids.reshape(shape[:-1])
            aux = {
                "loss": commitment + codebook,
                "commitment_loss": commitment.detach(),
                "codebook_loss": codebook.detach(),
            }
            return z_st.reshape(shape), ids, aux

    @torch.no_grad()
    def _restart_dead_codes(self, z: torch.Tensor, ids: torch.Tensor) -> None:
        # Every update is masked on the device (no branch on data, no count read back): the step never
        # waits for the device and the forward compiles as one graph. A non-finite batch changes
        # nothing (the trainer skips that step; its values must never reach the codebook).
        finite = torch.isfinite(z).all()
        if is_distributed():
            finite = finite.float()
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            finite = finite > 0
        # Unweighted hit counts as exact integers in float32 (what bincount gave), without bincount's
        # read of the largest id.
        hits = torch.zeros(self.codebook_size, device=z.device)
        hits.scatter_add_(0, ids, torch.ones_like(ids, dtype=hits.dtype))
        if is_distributed():
            dist.all_reduce(hits)
            hits /= dist.get_world_size()
        updated = self.usage.mul(self.usage_decay).add(hits, alpha=1 - self.usage_decay)
        self.usage.copy_(torch.where(finite, updated, self.usage))
        dead = (self.usage < self.dead_code_threshold) & finite
        # One draw per code (the count of dead codes is not known on the host); the j-th dead code takes
        # the j-th draw, the encoder output the former `randint(0, N, (num_dead,))` gave it.
        picks = torch.randint(0, z.shape[0], (self.codebook_size,), device=z.device)
        rank = (dead.long().cumsum(0) - 1).clamp(min=0)
        weight = self.embedding.weight
        restarted = torch.where(dead[:, None], z[picks[rank]].to(weight.dtype), weight)
        weight.data.copy_(restarted)  # .data: autograd saved the codebook for this step's backward
        self.usage.copy_(torch.where(dead, torch.full_like(self.usage, self.dead_code_threshold * 2), self.usage))
        if is_distributed():
            dist.broadcast(weight.data, src=0)


class DiagonalGaussian(Quantizer):
    """VAE bottleneck: the input holds [mean, logvar] along the last dim (2 * channels).

    forward samples mean + std * eps in training (the mode otherwise, unless `sample=True`);
    aux["loss"] = kl_weight * (KL summed over channels and tokens, averaged over the batch).
    """

    codebook_size = None

    def __init__(self, channels: int, kl_weight: float = 1e-6, logvar_range: tuple[float, float] = (-30.0, 20.0)):
        super().__init__()
        self.channels = channels
        self.kl_weight = kl_weight
        self.logvar_range = tuple(logvar_range)

    def posterior(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        if z.shape[-1] != 2 * self.channels:
            raise ValueError(f"expected {2 * self.channels} channels (mean and logvar), got {z.shape[-1]}")
        mean, logvar = z.float().chunk(2, dim=-1)
        logvar = logvar.clamp(*self.logvar_range)
        std = torch.exp(0.5 * logvar)
        kl = 0.5 * (mean.pow(2) + std.pow(2) - 1.0 - logvar).sum(-1)
        return {"mean": mean, "logvar": logvar, "std": std, "kl": kl}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        raise TypeError("a diagonal-Gaussian bottleneck has no codebook; decode its continuous latents instead")

    def forward(self, z: torch.Tensor, sample: bool | None = None, noise: torch.Tensor | None = None):
        with float32():
            post = self.posterior(z)
            if sample is None:
                sample = self.training
            latents = post["mean"]
            if sample or noise is not None:
                eps = torch.randn_like(post["std"]) if noise is None else noise.to(post["std"])
                latents = post["mean"] + post["std"] * eps
            kl = post["kl"].reshape(post["kl"].shape[0], -1).sum(1).mean()
            aux = {"loss": self.kl_weight * kl, "kl": kl.detach(), "posterior_std": post["std"].mean().detach()}
            return latents, None, aux


class FiniteScalarQuantizer(Quantizer):
    """FSQ (Mentzer et al., 2023) through vector-quantize-pytorch: each of the len(levels) channels
    is bounded by tanh and rounded to one of `levels[i]` values in [-1, 1] (straight-through);
    the id is the mixed-radix number of the per-channel levels, so codebook_size = prod(levels).

    The library's bound, rounding and id basis are the ones of the released FlexTok, so its ids
    come out unchanged. No loss: aux["loss"] is 0.
    """

    def __init__(self, levels: Sequence[int]):
        super().__init__()
        from vector_quantize_pytorch import FSQ

        self.levels = [int(level) for level in levels]
        self.dim = len(self.levels)
        # Its buffers are computed from the levels with `.item()`: build on the CPU even under a meta
        # device context (shape-only models of the released sizes); `.to()` moves them later.
        with torch.device("cpu"):
            self.fsq = FSQ(self.levels)
        self.codebook_size = int(self.fsq.codebook_size)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        with float32():
            return self.fsq.indices_to_codes(ids.long())

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Inverse of `embed` for values on the grid."""
        with float32():
            return self.fsq.codes_to_indices(codes.float()).long()

    def forward(self, z: torch.Tensor):
        with float32():
            shape = z.shape
            z_q, ids = self.fsq(z.float().reshape(-1, 1, self.dim))
            return z_q.reshape(shape), ids.long().reshape(shape[:-1]), {"loss": z_q.new_zeros(())}


class SharedMappingQuantizer(Quantizer):
    """TokenFlow's dual codebook with one shared index.

    Each entry is a pair (semantic row, pixel row); both, and the two halves of the input
    (semantic_dim + pixel_dim channels), are l2-normalised separately. The index minimises
    d_semantic + pixel_weight * d_pixel, so one id names both codes; z_q is the concatenated pair,
    returned straight-through. The codebooks are stored un-normalised, as in the released
    checkpoints, and normalised on every use.

    aux: "loss" = codebook_weight * codebook_loss + commitment_weight * commitment_loss, the parts
    unweighted ("codebook_loss" = mse(z_q, sg(z)), "commitment_loss" = mse(sg(z_q), z)), and the
    statistics "d_semantic" / "d_pixel": mean squared distance of each half to its chosen code.
    """

    # Entries of the (rows x codebook) distance matrix computed at once: a few float32 temporaries
    # of this size (64 MiB each) are alive together, about 256 MiB at the peak.
    max_distance_elements = 1 << 24

    def __init__(
        self,
        codebook_size: int,
        semantic_dim: int = 32,
        pixel_dim: int = 8,
        pixel_weight: float = 1.0,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
    ):
        super().__init__()
        self.codebook_size = codebook_size
        self.semantic_dim = semantic_dim
        self.pixel_dim = pixel_dim
        self.dim = semantic_dim + pixel_dim
        self.pixel_weight = pixel_weight
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight
        self.semantic_codebook = nn.Embedding(codebook_size, semantic_dim)
        self.pixel_codebook = nn.Embedding(codebook_size, pixel_dim)
        # Unit rows from the start (official init: uniform(-1/K, 1/K), then normalised): every use
        # normalises them, and rows far from unit length would turn slower under Adam.
        with torch.no_grad():
            for table in (self.semantic_codebook, self.pixel_codebook):
                table.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
                table.weight.copy_(F.normalize(table.weight, dim=-1))

    def codebooks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised (semantic, pixel) codebooks, float32."""
        return (F.normalize(self.semantic_codebook.weight.float(), dim=-1),
                F.normalize(self.pixel_codebook.weight.float(), dim=-1))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """l2-normalise the semantic and pixel halves of z (..., dim) separately."""
        z_s, z_p = z.split([self.semantic_dim, self.pixel_dim], dim=-1)
        return torch.cat([F.normalize(z_s, dim=-1), F.normalize(z_p, dim=-1)], dim=-1)

    @torch.no_grad()
    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """ids for normalised rows z (N, dim): argmin of d_semantic + pixel_weight * d_pixel (the
        first index wins ties), in chunks of rows to bound the (N, codebook_size) matrix."""
        sem_codes, pix_codes = self.codebooks()
        z_s, z_p = z.split([self.semantic_dim, self.pixel_dim], dim=-1)
        rows = max(1, self.max_distance_elements // self.codebook_size)
        ids = [
            (squared_distances(zs, sem_codes) + self.pixel_weight * squared_distances(zp, pix_codes))
            .argmin(dim=1)
            for zs, zp in zip(z_s.split(rows), z_p.split(rows))
        ]
        return torch.cat(ids) if ids else z.new_zeros(0, dtype=torch.long)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        with float32():
            sem_codes, pix_codes = self.codebooks()
            return torch.cat([F.embedding(ids, sem_codes), F.embedding(ids, pix_codes)], dim=-1)

    def forward(self, z: torch.Tensor):
        with float32():
            shape = z.shape
            if shape[-1] != self.dim:
                raise ValueError(f"expected {self.dim} channels ({self.semantic_dim} semantic + {self.pixel_dim} "
                                 f"pixel), got {shape[-1]}")
            z = self.normalize(z.float().reshape(-1, self.dim))
            ids = self.lookup(z.detach())
            z_q = self.embed(ids)
            codebook = F.mse_loss(z_q, z.detach())
            commitment = F.mse_loss(z_q.detach(), z)
            with torch.no_grad():
                sq = (z - z_q).pow(2)
                d_semantic = sq[:, : self.semantic_dim].sum(-1).mean()
                d_pixel = sq[:, self.semantic_dim:].sum(-1).mean()
            z_st = z + (z_q - z).detach()  # straight-through: decoder gradients reach the encoder
            aux = {
                "loss": self.codebook_weight * codebook + self.commitment_weight * commitment,
                "codebook_loss": codebook.detach(),
                "commitment_loss": commitment.detach(),
                "d_semantic": d_semantic,
                "d_pixel": d_pixel,
            }
            return z_st.reshape(shape), ids.reshape(shape[:-1]), aux


class MultiScaleResidualQuantizer(nn.Module):
    """VAR-style multi-scale residual quantization around any `Quantizer` (TokenFlow).

    forward(h) with h (B, C, G, G), G = scales[-1]: starting from residual = h, each scale s
    area-downsamples the residual to s x s, quantizes it, bicubic-upsamples the codes to G x G,
    adds them to the output and subtracts them from the residual. Returns (sum (B, C, G, G),
    ids (B, num_ids) with the scales concatenated in schedule order, each block row-major over
    (h, w), aux with every loss and statistic averaged over the quantized scales).

    In training, with probability drop_scale_prob one scale other than the first is skipped
    (its ids are -1). The draws use torch's global RNG (on the input's device), so the framework's
    seeding covers them.
    """

    def __init__(self, quantizer: Quantizer, scales: Sequence[int], drop_scale_prob: float = 0.0):
        super().__init__()
        self.quantizer = quantizer
        self.scales = [int(s) for s in scales]
        if not self.scales or any(s < 1 for s in self.scales):
            raise ValueError(f"scales must be positive sizes, got {list(scales)}")
        self.drop_scale_prob = float(drop_scale_prob)
        self.prefix_lengths = list(itertools.accumulate(s * s for s in self.scales))
        self.num_ids = self.prefix_lengths[-1]
        self.grid = self.scales[-1]

    @property
    def codebook_size(self) -> int | None:
        return self.quantizer.codebook_size

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        # At s == G the official bicubic call is an exact identity; skipping it saves the work.
        if x.shape[-1] == self.grid:
            return x
        return F.interpolate(x, size=(self.grid, self.grid), mode="bicubic", align_corners=False)

    def _dropped_scale(self, device: torch.device) -> torch.Tensor | None:
        """The index of the scale to skip as a 0-d device tensor (-1: none), or None when no scale can
        be dropped. Both draws are made every time, so no host read decides anything; a drop picks
        the scale the former `rand().item()`-then-`randint` draws picked."""
        if not (self.training and self.drop_scale_prob > 0 and len(self.scales) > 1):
            return None
        drop = torch.rand((), device=device) < self.drop_scale_prob
        which = torch.randint(1, len(self.scales), (), device=device)
        return torch.where(drop, which, -1)

    def split_ids(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """(B, L) ids, L a prefix length, -> one (B, s, s) block per scale present."""
        if ids.shape[-1] not in self.prefix_lengths:
            raise ValueError(f"got {ids.shape[-1]} ids; a multi-scale code has a prefix length of the "
                             f"schedule {self.scales}: one of {self.prefix_lengths}")
        count = self.prefix_lengths.index(ids.shape[-1]) + 1
        blocks = ids.split([s * s for s in self.scales[:count]], dim=-1)
        return [block.reshape(ids.shape[0], s, s) for block, s in zip(blocks, self.scales)]

    def forward(self, h: torch.Tensor):
        if h.ndim != 4 or h.shape[-2:] != (self.grid, self.grid):
            raise ValueError(f"expected (B, C, {self.grid}, {self.grid}) features (the last scale of "
                             f"{self.scales}), got {tuple(h.shape)}")
        with float32():
            residual = h.float()
            total = torch.zeros_like(residual)
            dropped = self._dropped_scale(h.device)
            ids, terms, kept = [], {}, []
            for k, s in enumerate(self.scales):
                x = residual if s == self.grid else F.interpolate(residual, size=(s, s), mode="area")
                z_q, ids_s, aux_s = self.quantizer(x.permute(0, 2, 3, 1))
                up = self._upsample(z_q.permute(0, 3, 1, 2))
                ids_s = ids_s.reshape(h.shape[0], s * s).long()
                if dropped is not None:
                    # The dropped scale is computed and masked out (no branch on the draw): it adds
                    # nothing, leaves the residual as it was, and its ids are -1.
                    keep = dropped != k
                    up = torch.where(keep, up, 0.0)
                    ids_s = torch.where(keep, ids_s, -1)
                    kept.append(keep)
                total = total + up
                # The residual is the target of the next scale, not a path for gradients: as in the
                # official loop, later scales' losses must not reach back through this one's codes.
                residual = residual - up.detach()
                ids.append(ids_s)
                for name, value in aux_s.items():
                    terms.setdefault(name, []).append(value)
            if dropped is None:
                aux = {name: torch.stack(values).mean() for name, values in terms.items()}
            else:  # the mean over the quantized scales
                weights = torch.stack(kept).float()
                aux = {name: (torch.stack(values) * weights).sum() / weights.sum()
                       for name, values in terms.items()}
            return total, torch.cat(ids, dim=1), aux

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids of any prefix length -> (B, C, G, G): the sum of the upsampled codes of the
        scales present. Ids of -1 (a dropped scale) contribute nothing."""
        with float32():
            total = 0
            for block in self.split_ids(ids):
                valid = block >= 0
                codes = self.quantizer.embed(block.clamp(min=0)) * valid.unsqueeze(-1)
                total = total + self._upsample(codes.permute(0, 3, 1, 2))
            return total


def build_quantizer(kind: str, dim: int | None = None, **kwargs) -> Quantizer:
    """"vq" -> VectorQuantizer(codebook_size, dim, ...); "vae" -> DiagonalGaussian(dim, ...);
    "fsq" -> FiniteScalarQuantizer(levels) (its width is len(levels));
    "shared_mapping" -> SharedMappingQuantizer(codebook_size, semantic_dim, pixel_dim, ...) (its
    width is semantic_dim + pixel_dim)."""
    if kind == "vq":
        return VectorQuantizer(dim=dim, **kwargs)
    if kind == "vae":
        return DiagonalGaussian(channels=dim, **kwargs)
    if kind == "fsq":
        quantizer = FiniteScalarQuantizer(**kwargs)
        if dim is not None and dim != quantizer.dim:
            raise ValueError(f"FSQ levels {quantizer.levels} give {quantizer.dim} channels, not {dim}")
        return quantizer
    if kind == "shared_mapping":
        quantizer = SharedMappingQuantizer(**kwargs)
        if dim is not None and dim != quantizer.dim:
            raise ValueError(f"a shared mapping of {quantizer.semantic_dim} + {quantizer.pixel_dim} channels "
                             f"is {quantizer.dim} wide, not {dim}")
        return quantizer
    raise ValueError(f"unknown quantizer {kind!r}; expected 'vq', 'vae', 'fsq' or 'shared_mapping'")
