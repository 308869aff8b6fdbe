"""Rectified flow: the noise path, its velocity target, training timesteps, and the Euler sampler
with classifier-free guidance (plain or adaptive projected guidance).

Convention (FlexTok, SD3): t = 0 is data and t = 1 is noise, x_t = t * eps + (1 - t) * x0, and the
model predicts the velocity v = eps - x0, so sampling integrates from t = 1 down to t = 0.

The latent-diffusion decoder interface built on these parts (`DiffusionDecoder`, `ConditionAdapter`,
`RectifiedFlowEuler`, `build_scheduler`, ...) is `tokenizers_vis.nn.diffusion_decoder`; it imports this
module, so this one cannot re-export it (the layer test forbids import circles).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like)


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t * noise + (1 - t) * x0, with t of shape (B,)."""
    t = _expand(t, x0)
    return t * noise + (1 - t) * x0


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d t = noise - x0."""
    return noise - x0


def denoised_estimate(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The one-step estimate of x0 from x_t and a velocity: x_t - t * v."""
    return x_t - _expand(t, x_t) * velocity


def logit_normal_timesteps(batch: int, mean: float = 0.0, std: float = 1.0, device=None,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """t = sigmoid(N(mean, std^2)): training timesteps that favour the middle of the path (SD3)."""
    normal = torch.randn(batch, generator=generator, device=device if generator is None else generator.device)
    return torch.sigmoid(mean + std * normal).to(device)


def euler_timesteps(steps: int) -> list[float]:
    """The times at which the sampler evaluates the model: 1, 1 - 1/S, ..., 1/S."""
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
    return [1.0 - i / steps for i in range(steps)]


class AdaptiveProjectedGuidance:
    """APG (Sadat et al., 2024) with the constants of the released FlexTok.

    The guidance direction d = v_cond - v_uncond gets a (negative) momentum over the sampling steps,
    is rescaled to an L2 norm of at most `norm_threshold` per sample, and only its part orthogonal
    to v_cond is kept in full (the parallel part is weighted by `eta`), which avoids the
    oversaturation of large plain-CFG scales. One instance per sampling run: it holds the momentum.
    """

    def __init__(self, momentum: float = -0.5, norm_threshold: float = 2.5, eta: float = 0.0):
        self.momentum = momentum
        self.norm_threshold = norm_threshold
        self.eta = eta
        self.running: torch.Tensor | float = 0.0

    def __call__(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        dims = tuple(range(1, v_cond.dim()))
        diff = v_cond - v_uncond + self.momentum * self.running
        self.running = diff
        if self.norm_threshold > 0:
            norm = diff.norm(p=2, dim=dims, keepdim=True)
            diff = diff * torch.minimum(torch.ones_like(norm), self.norm_threshold / norm)
        # The projection in float64: the parallel part is a small difference of large numbers.
        d64, v64 = diff.double(), v_cond.double()
        unit = v64 / v64.norm(p=2, dim=dims, keepdim=True)
        parallel = (d64 * unit).sum(dim=dims, keepdim=True) * unit
        orthogonal = d64 - parallel
        update = (orthogonal + self.eta * parallel).to(diff.dtype)
        return v_cond + (scale - 1) * update


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def euler_sample(
    velocity: VelocityFn,
    noise: torch.Tensor,
    steps: int,
    guidance_scale: float = 1.0,
    uncond_velocity: VelocityFn | None = None,
    apg: bool = False,
) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from x(1) = noise to t = 0 with `steps` Euler steps.

    velocity(x, t) is the conditional model, t a (B,) tensor. With guidance_scale != 1 the
    unconditional model is needed too: plain CFG gives v_u + s * (v_c - v_u); `apg` uses
    adaptive projected guidance instead. At scale 1 the unconditional model is never run.
    """
    guided = guidance_scale != 1.0
    if guided and uncond_velocity is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs an unconditional velocity")
    projector = AdaptiveProjectedGuidance() if apg else None

    def guided_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = velocity(x, t)
        return combine_guidance(v, uncond_velocity(x, t), guidance_scale, projector) if guided else v

    return euler_integrate(guided_velocity, noise, steps)


def euler_integrate(velocity: VelocityFn, x: torch.Tensor, steps: int) -> torch.Tensor:
    """The Euler loop of `euler_sample` without guidance and without disabling gradients."""
    times = euler_timesteps(steps)
    for i, t_now in enumerate(times):
        t_next = times[i + 1] if i + 1 < steps else 0.0
        t = torch.full((x.shape[0],), t_now, device=x.device, dtype=x.dtype)
        x = x - (t_now - t_next) * velocity(x, t)
    return x


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al., 2024): the guided output scaled to the conditional output's std
    (torch's unbiased std over the non-batch dims), mixed with the unscaled one by `rescale`."""
    dims = tuple(range(1, cond.dim()))
    scaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * scaled + (1 - rescale) * guided


def combine_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float,
                     projector: AdaptiveProjectedGuidance | None = None, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance: u + s (c - u), or APG with a `projector`; then guidance rescale if > 0."""
    guided = projector(cond, uncond, scale) if projector is not None else uncond + scale * (cond - uncond)
    return rescale_guidance(guided, cond, rescale) if rescale > 0 else guided
