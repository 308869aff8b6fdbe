"""DDIM as latent-diffusion (lvdm / DynamiCrafter) samplers run it, where that differs from diffusers.

`RoundedScheduleDDIM` is a scheduler for `DiffusionDecoder` (the diffusers interface it calls:
`config`, `alphas_cumprod`, `set_timesteps`, `timesteps`, `step(..., eta, variance_noise)`):
- the training schedule is built in float64 and stored in float32 (diffusers builds it in float32,
  which moves some values by an ulp): linear betas in sqrt space ("scaled_linear"), optionally
  rescaled to zero terminal SNR (Lin et al., 2024);
- "uniform" DDIM timesteps range(0, T, T // S) + 1 (the lvdm spacing; diffusers' "leading" has no +1);
- the step's a_t and a_prev come from the schedule rounded to `alpha_dtype` (float16: Divot's sampler
  casts alphas_cumprod to half before gathering them); a_prev of the last step is alphas_cumprod[0];
- a v or epsilon output converts to (eps, x0) through the float32 schedule at t, as lvdm does.
x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma * noise, with
sigma = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)). With the float16 schedule the release
computes 1 / (1 - a_t) as a float16 reciprocal (numpy array divided by a half tensor runs torch's
`__rtruediv__`, a reciprocal in the tensor's dtype); that is reproduced, so the sigmas match to the
last bit. a_prev and sigma then enter the step as float32 (`torch.full` of the sampler).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch


def scaled_linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> np.ndarray:
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alphas_cumprod) so its last value is 0 and its first unchanged."""
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    abar = root ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


@dataclass
class _StepOutput:
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class RoundedScheduleDDIM:
    """See the module docstring. alpha_dtype: "float16" (Divot) or "float32" / "float64" (no rounding)."""

    init_noise_sigma = 1.0

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", rescale_betas_zero_snr: bool = True,
                 prediction_type: str = "v_prediction", alpha_dtype: str = "float16"):
        if beta_schedule == "scaled_linear":
            betas = scaled_linear_betas(beta_start, beta_end, num_train_timesteps)
        elif beta_schedule == "linear":
            betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
        else:
            raise ValueError(f"beta_schedule must be 'scaled_linear' or 'linear', got {beta_schedule!r}")
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        if prediction_type not in ("v_prediction", "epsilon"):
            raise ValueError(f"prediction_type must be 'v_prediction' or 'epsilon', got {prediction_type!r}")
        self.config = SimpleNamespace(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                                      beta_end=beta_end, beta_schedule=beta_schedule,
                                      rescale_betas_zero_snr=rescale_betas_zero_snr, prediction_type=prediction_type,
                                      alpha_dtype=alpha_dtype)
        self.betas = torch.tensor(betas, dtype=torch.float32)
        self.alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)
        self.rounded = self.alphas_cumprod.to(getattr(torch, alpha_dtype)).double()
        self.timesteps = torch.zeros(0, dtype=torch.long)

    def __repr__(self) -> str:
        return f"RoundedScheduleDDIM({vars(self.config)})"

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= n:
            raise ValueError(f"the number of DDIM steps must lie in [1, {n}], got {num_inference_steps}")
        ascending = torch.arange(0, n, n // num_inference_steps, dtype=torch.long) + 1
        ascending = ascending[ascending < n]
        self.ddim_alphas = self.rounded[ascending]
        self.ddim_alphas_prev = torch.cat([self.rounded[:1], self.rounded[ascending[:-1]]])
        self._prev = dict(zip(ascending.tolist(), self.ddim_alphas_prev.tolist()))
        self._sigma = dict(zip(ascending.tolist(), self.sigmas(1.0).tolist()))
        self.timesteps = ascending.flip(0).to(device)

    def sigmas(self, eta: float = 1.0) -> torch.Tensor:
        """sigma of each DDIM step (ascending timesteps), float64."""
        a, p = self.ddim_alphas, self.ddim_alphas_prev
        dtype = getattr(torch, self.config.alpha_dtype)
        inverse = (1 - a.to(dtype)).reciprocal().double()  # in the schedule's dtype, as the release
        return eta * torch.sqrt((1 - p) * inverse * (1 - a / p))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             variance_noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> _StepOutput:
        t = int(timestep)
        abar = self.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)[t]
        if self.config.prediction_type == "v_prediction":
            eps = abar.sqrt() * model_output + (1 - abar).sqrt() * sample
            x0 = abar.sqrt() * sample - (1 - abar).sqrt() * model_output
        else:
            eps = model_output
            x0 = (sample - (1 - abar).sqrt() * model_output) / abar.sqrt()
        # float32 scalars, as the release's torch.full(size, value) makes them
        a_prev = torch.tensor(self._prev[t], dtype=torch.float32)
        sigma = torch.tensor(eta * self._sigma[t], dtype=torch.float32)
        prev = a_prev.sqrt().to(x0) * x0 + (1 - a_prev - sigma ** 2).sqrt().to(eps) * eps
        if eta > 0:
            if variance_noise is None:
                variance_noise = torch.randn(sample.shape, generator=generator, dtype=sample.dtype,
                                             device=generator.device if generator is not None else sample.device)
            prev = prev + sigma.to(prev) * variance_noise.to(prev)
        return _StepOutput(prev_sample=prev, pred_original_sample=x0)
