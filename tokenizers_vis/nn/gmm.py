"""Gaussian-mixture heads for continuous tokens (Divot-LLM): parameters, NLL and mean prediction.

`GMMHead` maps hidden states (..., input_dim) to 2kd + k mixture parameters with Linear -> GELU ->
Linear: k means of d dims, k diagonal variances (softplus, clamped at `min_variance`, times
`var_scale`) and k mixture logits, in that order. `gmm_nll` is the mean over tokens of the negative
log-likelihood divided by d; `gmm_mean_prediction` the softmax(logits)-weighted mean of the means.
`ProjectionMLP` is the same Linear -> GELU -> Linear shape (Divot-LLM's input projection).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionMLP(nn.Module):
    """Linear(input_dim, output_dim) -> exact GELU -> Linear(output_dim, output_dim), as `proj.{0,2}`."""

    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(input_dim, output_dim), nn.GELU(), nn.Linear(output_dim, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def split_gmm_params(params: torch.Tensor, k: int, d: int, min_variance: float = 1e-5, var_scale: float = 1.0):
    """(..., 2kd + k) -> means (..., k, d), variances (..., k, d), logits (..., k)."""
    if params.shape[-1] != 2 * k * d + k:
        raise ValueError(f"a {k}-component GMM over {d} dims has {2 * k * d + k} parameters, got {params.shape[-1]}")
    lead = params.shape[:-1]
    means = params[..., :k * d].reshape(*lead, k, d)
    variances = F.softplus(params[..., k * d:2 * k * d]).clamp(min=min_variance).reshape(*lead, k, d) * var_scale
    return means, variances, params[..., 2 * k * d:]


def gmm_log_prob(means: torch.Tensor, variances: torch.Tensor, logits: torch.Tensor,
                 target: torch.Tensor) -> torch.Tensor:
    """log p(target) under the diagonal mixture, (...,); target (..., d)."""
    x = target.unsqueeze(-2)
    comp = -0.5 * (((x - means) ** 2) / variances + variances.log() + math.log(2 * math.pi)).sum(-1)
    return torch.logsumexp(comp + F.log_softmax(logits, dim=-1), dim=-1)


def gmm_nll(means, variances, logits, target) -> torch.Tensor:
    """-mean(log p) / d: Divot's GMM loss."""
    return -gmm_log_prob(means, variances, logits, target).mean() / target.shape[-1]


def gmm_mean_prediction(means: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """softmax(logits)-weighted mean of the component means, (..., d)."""
    return (F.softmax(logits, dim=-1).unsqueeze(-1) * means).sum(-2)


class GMMHead(nn.Module):
    """Hidden states -> GMM parameters (k components over d dims); `proj.{0,2}` as Divot-LLM's
    `output_resampler`."""

    def __init__(self, input_dim: int, k: int, d: int, min_variance: float = 1e-5, var_scale: float = 1.0):
        super().__init__()
        self.k, self.d, self.min_variance, self.var_scale = k, d, min_variance, var_scale
        self.proj = nn.Sequential(nn.Linear(input_dim, 2 * k * d + k), nn.GELU(),
                                  nn.Linear(2 * k * d + k, 2 * k * d + k))

    @property
    def num_outputs(self) -> int:
        return 2 * self.k * self.d + self.k

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)

    def split(self, params: torch.Tensor):
        return split_gmm_params(params, self.k, self.d, self.min_variance, self.var_scale)

    def nll(self, params: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return gmm_nll(*self.split(params), target)

    def predict(self, params: torch.Tensor) -> torch.Tensor:
        means, _, logits = self.split(params)
        return gmm_mean_prediction(means, logits)
