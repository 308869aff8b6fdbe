"""The one interface of decoders that are diffusion models: VAE + denoiser + scheduler + condition adapter.

`DiffusionDecoder(denoiser, scheduler, condition, vae)`:
- `training_loss(x0, condition)`: noise x0 (the clean latent) at random timesteps and regress the
  denoiser's output on the target of `prediction_type`: "epsilon" (the noise), "v_prediction"
  (sqrt(a) eps - sqrt(1 - a) x0) or "flow" (the rectified-flow velocity eps - x0, t in [0, 1]).
- `sample(condition, steps, guidance, noise, generator)`: the scheduler's sampling loop with
  classifier-free guidance (optionally APG and guidance rescale), or the few-step consistency
  sampler (`sampler="consistency"`). `noise` may be every random draw of the run in order of use
  (initial latent first), so a decode replays exactly.

Schedulers are diffusers schedulers (DDIM, DDPM, LCM, flow-match Euler, ...) or our
`RectifiedFlowEuler`, which is FlexTok's sampler: diffusers' flow-match Euler evaluates the model on
another grid (1, 2/3, 1/3, 0.001 for 4 steps where FlexTok uses 1, 3/4, 1/2, 1/4). `build_scheduler`
makes either from plain config (`{"name": "ddim", **kwargs}`), so Hydra configs pick them.

The denoiser is any module called as `denoiser(x_t, timesteps, **kwargs)`, timesteps of shape (B,)
in the scheduler's units ([0, 1] for `RectifiedFlowEuler`, 0..num_train_timesteps otherwise). Its
output is a tensor, a tuple (prediction first; the rest is kept as `extras`, e.g. REPA features) or
a diffusers output with `.sample`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.nn.diffusion import (
    AdaptiveProjectedGuidance,
    combine_guidance,
    denoised_estimate,
    euler_integrate,
    logit_normal_timesteps,
    noised,
    velocity_target,
)

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")
SAMPLERS = ("scheduler", "consistency")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")


class RectifiedFlowEuler:
    """FlexTok's rectified-flow Euler sampler as a scheduler: t = 1 is noise, t = 0 data, the model
    is evaluated at t = 1, 1 - 1/S, ..., 1/S (Python floats, as the release) and predicts eps - x0."""

    prediction_type = "flow"
    time_scale = 1.0  # the denoiser receives t in [0, 1]

    def __repr__(self) -> str:
        return "RectifiedFlowEuler()"


# Config names -> diffusers scheduler class names (ours is "rectified_flow").
DIFFUSERS_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "lcm": "LCMScheduler",
    "flow_match_euler": "FlowMatchEulerDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
}
SCHEDULER_NAMES = ("rectified_flow", *DIFFUSERS_SCHEDULERS)


def build_scheduler(config: Any):
    """A scheduler from plain config: `{"name": NAME, **kwargs}` with NAME in `SCHEDULER_NAMES`; the
    kwargs are the diffusers class's config (with `pretrained` / `subfolder`: read that saved scheduler
    config, the kwargs overriding it). A scheduler object is returned as it is."""
    if not isinstance(config, Mapping):
        return config
    options = dict(config)
    name = options.pop("name", None)
    if name == "rectified_flow":
        if options:
            raise ValueError(f"the rectified_flow scheduler takes no options, got {sorted(options)}")
        return RectifiedFlowEuler()
    if name not in DIFFUSERS_SCHEDULERS:
        raise ValueError(f"unknown scheduler name {name!r}; expected one of {SCHEDULER_NAMES}")
    cls = getattr(importlib.import_module("diffusers"), DIFFUSERS_SCHEDULERS[name])
    pretrained = options.pop("pretrained", None)
    subfolder = options.pop("subfolder", None)
    if pretrained:
        from tokenizers_vis.nn.pretrained import _from_pretrained

        kwargs = {"subfolder": subfolder} if subfolder else {}
        return _from_pretrained(cls, pretrained, "scheduler.pretrained", **kwargs, **options)
    return cls(**options)


def scheduler_prediction_type(scheduler) -> str:
    """"flow" for flow-matching schedulers, else the diffusers config's prediction_type."""
    if isinstance(scheduler, RectifiedFlowEuler) or _is_flow_match(scheduler):
        return "flow"
    return scheduler.config.prediction_type


def _is_flow_match(scheduler) -> bool:
    return type(scheduler).__name__.startswith("FlowMatch")


class ConditionAdapter:
    """The tokenizer's condition -> the denoiser's keyword arguments, and the unconditional ones (CFG).

    The default passes the condition as `key` (diffusers' UNets: "encoder_hidden_states") and uses
    zeros of its shape as the null condition; `extra` adds fixed keyword arguments. Models with
    learned null conditions or several inputs override `__call__` and `unconditional`.
    """

    def __init__(self, key: str = "encoder_hidden_states", extra: Mapping[str, Any] | None = None):
        self.key = key
        self.extra = dict(extra or {})

    def __call__(self, condition) -> dict[str, Any]:
        return {self.key: condition, **self.extra}

    def unconditional(self, condition) -> dict[str, Any]:
        return {self.key: torch.zeros_like(condition), **self.extra}


@dataclass
class DiffusionTrainingStep:
    """One training pass: the denoiser's prediction and everything a loss may need."""

    prediction: torch.Tensor
    target: torch.Tensor
    x_t: torch.Tensor
    timesteps: torch.Tensor  # [0, 1] for flow, integer timesteps otherwise
    noise: torch.Tensor
    extras: tuple = ()  # the denoiser's further outputs (after the prediction)


class _Draws:
    """The random draws of one sampling run: taken in order from a given list, else from the generator
    (or the global RNG)."""

    def __init__(self, given: Sequence[torch.Tensor] | None, generator: torch.Generator | None):
        self.given = list(given) if given is not None else None
        self.used = 0
        self.generator = generator

    def next(self, like: torch.Tensor) -> torch.Tensor:
        if self.given is not None:
            draw = self.given[self.used]
            self.used += 1
            if tuple(draw.shape) != tuple(like.shape):
                # Numbered in the full list, whose entry 0 is the initial latent.
                raise ValueError(f"noise[{self.used}] has shape {tuple(draw.shape)}, expected {tuple(like.shape)}")
            return draw.to(like)
        if self.generator is None:
            return torch.randn_like(like)
        return torch.randn(like.shape, generator=self.generator, device=self.generator.device,
                           dtype=like.dtype).to(like.device)


class DiffusionDecoder(nn.Module):
    """A diffusion decoder: optional VAE, a denoiser, a scheduler and a condition adapter.

    denoiser: any module, called `denoiser(x_t, timesteps, **adapter(condition))`.
    scheduler: a scheduler object or its plain config (see `build_scheduler`).
    condition: a `ConditionAdapter` (default: the condition as `encoder_hidden_states`).
    vae: None (the denoiser works in pixel space) or an object with `encode(images, noise=None)` and
        `decode(latents)` that apply the latent scaling (`tokenizers_vis.nn.pretrained.FrozenVAE`), or
        the arguments of `FrozenVAE`.
    prediction_type: None takes the scheduler's; it must agree with a diffusers scheduler's config,
        whose `step` converts the output by it.
    timestep_sampling: training timesteps: "uniform" (integers for discrete schedules, t in [0, 1) for
        flow) or "logit_normal" (flow only: t = sigmoid(N(logit_mean, logit_std^2)), SD3 / FlexTok);
        None is logit_normal for flow and uniform otherwise.
    """

    def __init__(self, denoiser: nn.Module, scheduler: Any, condition: ConditionAdapter | None = None,
                 vae: Any = None, prediction_type: str | None = None, timestep_sampling: str | None = None,
                 logit_mean: float = 0.0, logit_std: float = 1.0):
        super().__init__()
        self.denoiser = denoiser
        self.scheduler = build_scheduler(scheduler)
        self.condition = condition if condition is not None else ConditionAdapter()
        if isinstance(vae, Mapping):
            from tokenizers_vis.nn.pretrained import FrozenVAE

            vae = FrozenVAE(**dict(vae))
        self.vae = vae
        native = scheduler_prediction_type(self.scheduler)
        prediction_type = native if prediction_type is None else prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if prediction_type != native:
            raise ValueError(f"prediction_type={prediction_type!r} but the scheduler "
                             f"{type(self.scheduler).__name__} predicts {native!r}; set it in the scheduler config")
        self.prediction_type = prediction_type
        flow = prediction_type == "flow"
        timestep_sampling = timestep_sampling or ("logit_normal" if flow else "uniform")
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {timestep_sampling!r}")
        if timestep_sampling == "logit_normal" and not flow:
            raise ValueError("timestep_sampling='logit_normal' is for flow prediction only")
        self.timestep_sampling = timestep_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std

    # -- VAE ---------------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images in the VAE's range ([-1, 1]) -> scaled latents (the identity without a VAE)."""
        if self.vae is None:
            return images
        return self.vae.encode(images, noise)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (the identity without a VAE)."""
        return latents if self.vae is None else self.vae.decode(latents)

    # -- schedule ----------------------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def _time_scale(self) -> float:
        """Flow t in [0, 1] -> the denoiser's time units."""
        if isinstance(self.scheduler, RectifiedFlowEuler):
            return self.scheduler.time_scale
        return float(self.num_train_timesteps)

    def alphas(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha-bar of the scheduler at integer `timesteps` (B,), shaped and typed to broadcast on `like`."""
        abar = getattr(self.scheduler, "alphas_cumprod", None)
        if abar is None:
            raise ValueError(f"{type(self.scheduler).__name__} has no alphas_cumprod (a discrete noise schedule)")
        a = abar.to(device=like.device, dtype=like.dtype)[timesteps.to(like.device).long()]
        return a.reshape(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t: t * noise + (1 - t) * x0 for flow, sqrt(a) x0 + sqrt(1 - a) noise otherwise."""
        if self.prediction_type == "flow":
            return noised(x0, noise, timesteps)
        a = self.alphas(timesteps, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser learns to predict at x_t = add_noise(x0, noise, timesteps)."""
        if self.prediction_type == "flow":
            return velocity_target(x0, noise)
        if self.prediction_type == "epsilon":
            return noise
        a = self.alphas(timesteps, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def predict_x0(self, output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The clean sample implied by the model output at x_t (flow: x_t - t v)."""
        if self.prediction_type == "flow":
            return denoised_estimate(x_t, output, timesteps)
        a = self.alphas(timesteps, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - (1 - a).sqrt() * output) / a.sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * output

    def sample_timesteps(self, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps (B,): t in (0, 1) for flow, integers in [0, num_train_timesteps) otherwise."""
        if self.timestep_sampling == "logit_normal":
            return logit_normal_timesteps(batch, self.logit_mean, self.logit_std, device=device, generator=generator)
        draw_device = device if generator is None else generator.device
        if self.prediction_type == "flow":
            return torch.rand(batch, generator=generator, device=draw_device).to(device)
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=draw_device).to(device)

    # -- the denoiser --------------------------------------------------------------------------------------
    def model_time(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Training timesteps -> what the denoiser receives: flow t times the time scale (1 for
        `RectifiedFlowEuler`, num_train_timesteps for diffusers' flow matching), integers as they are."""
        # The dtype is kept: a float32 t must not be rounded to the latents' dtype under autocast.
        if self.prediction_type == "flow":
            scale = self._time_scale()
            return timesteps.to(like.device) if scale == 1.0 else timesteps.to(like.device) * scale
        return timesteps.to(like.device)

    def run_denoiser(self, x_t: torch.Tensor, model_time: torch.Tensor, kwargs: Mapping[str, Any]):
        """(prediction, extras) of the denoiser at x_t; model_time (B,) in the denoiser's units."""
        out = self.denoiser(x_t, model_time, **kwargs)
        if isinstance(out, torch.Tensor):
            return out, ()
        if isinstance(out, (tuple, list)):
            return out[0], tuple(out[1:])
        return out.sample, ()

    # -- training ------------------------------------------------------------------------------------------
    def training_step(self, x0: torch.Tensor, condition, noise: torch.Tensor | None = None,
                      timesteps: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> DiffusionTrainingStep:
        """One denoising pass on x0 (clean latents); timesteps, then noise, are drawn when not given."""
        if timesteps is None:
            timesteps = self.sample_timesteps(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn_like(x0) if generator is None else torch.randn(
                x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        x_t = self.add_noise(x0, noise, timesteps)
        prediction, extras = self.run_denoiser(x_t, self.model_time(timesteps, x_t), self.condition(condition))
        return DiffusionTrainingStep(prediction=prediction, target=self.target(x0, noise, timesteps), x_t=x_t,
                                     timesteps=timesteps, noise=noise, extras=extras)

    def training_loss(self, x0: torch.Tensor, condition, noise: torch.Tensor | None = None,
                      timesteps: torch.Tensor | None = None, generator: torch.Generator | None = None):
        """(MSE between prediction and target in float32, logs)."""
        step = self.training_step(x0, condition, noise, timesteps, generator)
        loss = F.mse_loss(step.prediction.float(), step.target.float())
        return loss, {"loss/diffusion": loss.detach()}

    # -- sampling ------------------------------------------------------------------------------------------
    def noise_draws(self, steps: int, sampler: str = "scheduler", eta: float = 0.0,
                    timesteps: Sequence[int] | None = None, draw_final_noise: bool = False) -> int:
        """How many tensors a full noise list holds for these options (the initial latent included)."""
        if sampler == "consistency":
            # The initial latent, one re-noise between calls, and optionally one after the last call.
            return (len(timesteps) if timesteps is not None else steps) + int(draw_final_noise)
        if sampler != "scheduler":
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not isinstance(self.scheduler, RectifiedFlowEuler) and eta > 0:
            return 1 + steps
        return 1

    def _step_accepts(self, name: str) -> bool:
        return name in inspect.signature(self.scheduler.step).parameters

    def sample(self, condition, steps: int, guidance: float = 1.0, noise=None, generator: torch.Generator | None = None,
               *, shape: Sequence[int] | None = None, guidance_rescale: float = 0.0, apg: bool = False,
               sampler: str = "scheduler", eta: float = 0.0, timesteps: Sequence[int] | None = None,
               draw_final_noise: bool = False, to_images: bool = False) -> torch.Tensor:
        """Sample latents (or images with `to_images`) for `condition`.

        noise: None (drawn from `generator`, or the global RNG, with `shape`), the initial latent, or
            the list of every draw in order: the initial latent, then the per-step draws (DDIM with
            eta > 0: one per step; consistency: one per re-noise). Per-step draws that a diffusers
            scheduler makes itself without taking them as an argument (LCM, DDPM) come from `generator`.
        guidance: CFG scale; at 1 the unconditional branch never runs. `apg`: adaptive projected
            guidance instead of plain CFG. guidance_rescale: phi of Lin et al. (2024), 0 = off.
        sampler: "scheduler" (the scheduler's own loop; FlexTok's Euler for `RectifiedFlowEuler`) or
            "consistency": at each of `timesteps` (e.g. [999, 499, 124]) predict x0 and re-noise it to
            the next listed timestep; returns the last x0. `draw_final_noise` draws (and discards) one
            more re-noise after the last call, as Layton's release does.
        eta: DDIM's eta (stochastic steps when > 0).
        Gradients are not disabled here (few-step decoders train through their sampler).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if steps < 1 and sampler == "scheduler":
            raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
        if eta > 0 and (sampler == "consistency" or isinstance(self.scheduler, RectifiedFlowEuler)):
            raise ValueError(f"eta={eta} is an option of diffusers' DDIM loop, not of this {sampler} sampler")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
        expected = self.noise_draws(steps, sampler, eta, timesteps, draw_final_noise)
        given = None
        if isinstance(noise, (list, tuple)):
            if len(noise) != expected:
                raise ValueError(f"this {sampler} run uses {expected} noise draws (initial latent first), "
                                 f"got a list of {len(noise)}")
            given, noise = list(noise[1:]), noise[0]
        if noise is None:
            if shape is None:
                raise ValueError("sample needs `noise` or the latent `shape`")
            device = _module_device(self.denoiser)
            noise = torch.randn(tuple(shape), generator=generator,
                                device=device if generator is None else generator.device).to(device)
        draws = _Draws(given, generator)
        cond = self.condition(condition)
        uncond = self.condition.unconditional(condition) if guidance != 1.0 else None
        projector = AdaptiveProjectedGuidance() if apg else None

        def predict(x, t):
            out = self.run_denoiser(x, t, cond)[0]
            if uncond is None:
                return out
            return combine_guidance(out, self.run_denoiser(x, t, uncond)[0], guidance, projector, guidance_rescale)

        if sampler == "consistency":
            x = self._consistency(predict, noise, timesteps if timesteps is not None else _spaced(steps, self),
                                  draws, draw_final_noise)
        elif isinstance(self.scheduler, RectifiedFlowEuler):
            x = euler_integrate(predict, noise, steps)
        else:
            x = self._scheduler_loop(predict, noise, steps, eta, draws)
        return self.decode_latents(x) if to_images else x

    def _scheduler_loop(self, predict: Callable, noise: torch.Tensor, steps: int, eta: float,
                        draws: _Draws) -> torch.Tensor:
        """The diffusers loop; its timesteps (integers, or sigma * num_train_timesteps for flow matching)
        are what the denoiser receives."""
        scheduler = self.scheduler
        if eta > 0 and not self._step_accepts("eta"):
            raise ValueError(f"eta={eta} is a DDIM option; {type(scheduler).__name__} takes none")
        scheduler.set_timesteps(steps, device=noise.device)
        x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching has none (1)
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            out = predict(model_in, t.expand(x.shape[0]))
            kwargs: dict[str, Any] = {}
            if eta > 0:
                # DDIM's step noise goes in as an argument, so a noise list replays it.
                kwargs.update(eta=eta, variance_noise=draws.next(x))
            elif self._step_accepts("generator"):
                kwargs["generator"] = draws.generator
            x = scheduler.step(out, t, x, **kwargs).prev_sample
        return x

    def _consistency(self, predict: Callable, noise: torch.Tensor, timesteps: Sequence[int], draws: _Draws,
                     draw_final_noise: bool) -> torch.Tensor:
        if self.prediction_type == "flow":
            raise ValueError("the consistency sampler needs a discrete schedule (epsilon or v_prediction)")
        times = [int(t) for t in timesteps]
        if not times or any(not 0 <= t < self.num_train_timesteps for t in times):
            raise ValueError(f"consistency timesteps must lie in [0, {self.num_train_timesteps}), got {times}")
        x, x0 = noise, noise
        for i, t_now in enumerate(times):
            t = torch.full((x.shape[0],), t_now, device=x.device, dtype=torch.long)
            x0 = self.predict_x0(predict(x, t), x, t)
            if i + 1 < len(times):
                t_next = torch.full_like(t, times[i + 1])
                x = self.add_noise(x0, draws.next(x0), t_next)
            elif draw_final_noise:
                draws.next(x0)
        return x0


def _spaced(steps: int, decoder: DiffusionDecoder) -> list[int]:
    """`steps` evenly spaced timesteps from the last training timestep down (999, 499 for 2 of 1000)."""
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
    n = decoder.num_train_timesteps
    return [n - 1 - (i * n) // steps for i in range(steps)]


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
