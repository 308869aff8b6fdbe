"""DiffusionDecoder: training targets, diffusers sampling loops, the consistency sampler, guidance, VAE."""

import pytest
import torch
from torch import nn

from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

from tokenizers_vis.nn.diffusion import euler_sample, rescale_guidance  # noqa: E402
from tokenizers_vis.nn.diffusion_decoder import (  # noqa: E402
    ConditionAdapter,
    DiffusionDecoder,
    RectifiedFlowEuler,
    build_scheduler,
)

SHAPE = (2, 4, 6, 6)
TINY_VAE = {"block_out_channels": [8, 8], "norm_num_groups": 4, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "layers_per_block": 1}


class TinyDenoiser(nn.Module):
    """conv(x) scaled by the time, plus a projection of the condition; records every call."""

    def __init__(self, channels=4, dim=3, extra=False):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.proj = nn.Linear(dim, channels)
        self.extra = extra
        self.calls = []

    def forward(self, x, t, encoder_hidden_states):
        self.calls.append((t.clone(), encoder_hidden_states.clone()))
        scale = 1 + t.float().reshape(-1, 1, 1, 1) / 1000
        out = self.conv(x) * scale + self.proj(encoder_hidden_states)[:, :, None, None]
        return (out, out.mean()) if self.extra else out


def _decoder(scheduler, **kwargs):
    torch.manual_seed(0)
    return DiffusionDecoder(TinyDenoiser(extra=kwargs.pop("extra", False)), scheduler, **kwargs)


def _ddim(prediction_type="epsilon", **kwargs):
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type, **kwargs)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_discrete_training_targets_equal_the_schedule_and_diffusers(prediction_type):
    scheduler = _ddim(prediction_type)
    decoder = _decoder(scheduler)
    x0, noise, cond = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(2, 3)
    t = torch.tensor([10, 900])
    step = decoder.training_step(x0, cond, noise=noise, timesteps=t)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(step.x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    torch.testing.assert_close(step.x_t, scheduler.add_noise(x0, noise, t))
    if prediction_type == "epsilon":
        assert torch.equal(step.target, noise)
    else:
        torch.testing.assert_close(step.target, a.sqrt() * noise - (1 - a).sqrt() * x0)
        torch.testing.assert_close(step.target, scheduler.get_velocity(x0, noise, t))
    assert torch.equal(decoder.denoiser.calls[-1][0], t)  # integer timesteps go in as they are
    torch.testing.assert_close(decoder.predict_x0(step.target, step.x_t, t), x0, atol=1e-4, rtol=0)
    loss, logs = decoder.training_loss(x0, cond, noise=noise, timesteps=t)
    torch.testing.assert_close(loss, ((step.prediction - step.target) ** 2).mean())
    assert loss.requires_grad and torch.equal(logs["loss/diffusion"], loss.detach())
    drawn = decoder.sample_timesteps(4000, generator=torch.Generator().manual_seed(0))
    assert drawn.dtype == torch.int64 and int(drawn.min()) >= 0 and int(drawn.max()) <= 999


@pytest.mark.parametrize("scheduler,scale", [(RectifiedFlowEuler(), 1.0), (FlowMatchEulerDiscreteScheduler(), 1000.0)])
def test_flow_training_target_and_time_units(scheduler, scale):
    decoder = _decoder(scheduler, extra=True)
    assert decoder.prediction_type == "flow" and decoder.timestep_sampling == "logit_normal"
    x0, noise, cond = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(2, 3)
    t = torch.tensor([0.25, 0.8])
    step = decoder.training_step(x0, cond, noise=noise, timesteps=t)
    torch.testing.assert_close(step.x_t, t.view(-1, 1, 1, 1) * noise + (1 - t.view(-1, 1, 1, 1)) * x0)
    assert torch.equal(step.target, noise - x0)
    torch.testing.assert_close(decoder.denoiser.calls[-1][0], t * scale)
    assert len(step.extras) == 1  # the denoiser's further outputs are kept
    torch.testing.assert_close(decoder.predict_x0(step.target, step.x_t, t), x0, atol=1e-5, rtol=0)
    # Drawn timesteps: t first, then the noise, both reproducible from a generator.
    a = decoder.training_step(x0, cond, generator=torch.Generator().manual_seed(1))
    b = decoder.training_step(x0, cond, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.noise, b.noise)
    assert 0 < float(a.timesteps.min()) and float(a.timesteps.max()) < 1


def test_ddim_sample_equals_a_manual_loop_of_scheduler_steps():
    decoder = _decoder(_ddim("v_prediction", steps_offset=1))
    cond, noise = torch.randn(2, 3), torch.randn(SHAPE)
    with torch.no_grad():
        out = decoder.sample(cond, 5, noise=noise)
        manual = _ddim("v_prediction", steps_offset=1)
        manual.set_timesteps(5)
        x = noise
        for t in manual.timesteps:
            x = manual.step(decoder.denoiser(x, t.expand(2), cond), t, x).prev_sample
    assert torch.equal(out, x)
    assert [int(c[0][0]) for c in decoder.denoiser.calls[:5]] == [801, 601, 401, 201, 1]


def test_stochastic_ddim_replays_a_noise_list_and_takes_cfg_with_rescale():
    decoder = _decoder(_ddim())
    cond = torch.randn(2, 3)
    draws = [torch.randn(SHAPE) for _ in range(4)]
    with torch.no_grad():
        out = decoder.sample(cond, 3, guidance=3.0, noise=draws, eta=1.0, guidance_rescale=0.7)
        assert torch.equal(out, decoder.sample(cond, 3, guidance=3.0, noise=draws, eta=1.0, guidance_rescale=0.7))
        manual = _ddim()
        manual.set_timesteps(3)
        x = draws[0]
        for i, t in enumerate(manual.timesteps):
            c = decoder.denoiser(x, t.expand(2), cond)
            u = decoder.denoiser(x, t.expand(2), torch.zeros_like(cond))  # the default null condition
            g = u + 3.0 * (c - u)
            dims = (1, 2, 3)
            g = 0.7 * g * c.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True) + 0.3 * g
            x = manual.step(g, t, x, eta=1.0, variance_noise=draws[i + 1]).prev_sample
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)
    other = [draws[0]] + [torch.randn(SHAPE) for _ in range(3)]
    with torch.no_grad():
        assert not torch.allclose(out, decoder.sample(cond, 3, guidance=3.0, noise=other, eta=1.0,
                                                      guidance_rescale=0.7))


def _layton_like():
    # A few-step consistency decoder: eps prediction on the SD/SDXL schedule.
    return _decoder({"name": "ddim", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})


def test_consistency_sampler_is_x0_from_eps_and_renoise_and_replays_its_draws():
    decoder = _layton_like()
    cond = torch.randn(2, 3)
    times = [999, 499, 124]
    draws = [torch.randn(SHAPE) for _ in range(4)]
    options = dict(sampler="consistency", timesteps=times, draw_final_noise=True)
    with torch.no_grad():
        out = decoder.sample(cond, 3, noise=draws, **options)
        assert torch.equal(out, decoder.sample(cond, 3, noise=draws, **options))
        abar = decoder.scheduler.alphas_cumprod
        x = draws[0]
        for i, t in enumerate(times):
            eps = decoder.denoiser(x, torch.full((2,), t), cond)
            x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
            if i < 2:
                x = abar[times[i + 1]].sqrt() * x0 + (1 - abar[times[i + 1]]).sqrt() * draws[i + 1]
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    other = draws[:1] + [torch.randn(SHAPE) for _ in range(3)]
    with torch.no_grad():
        assert not torch.allclose(out, decoder.sample(cond, 3, noise=other, **options))
        # The final draw is discarded: it never changes the output.
        assert torch.equal(out, decoder.sample(cond, 3, noise=draws[:3] + [torch.randn(SHAPE)], **options))
        seeded = [decoder.sample(cond, 3, generator=torch.Generator().manual_seed(4), shape=SHAPE, **options)
                  for _ in range(2)]
    assert torch.equal(*seeded)
    # Few-step decoders train through the sampler: the gradient reaches the denoiser.
    decoder.sample(cond, 2, noise=draws[0], sampler="consistency").sum().backward()
    assert decoder.denoiser.conv.weight.grad.abs().sum() > 0


def test_guidance_one_is_the_conditional_output_and_never_runs_the_unconditional_branch():
    class Refusing(ConditionAdapter):
        def unconditional(self, condition):
            raise AssertionError("the unconditional branch must not run at guidance 1")

    decoder = _layton_like()
    decoder.condition = Refusing()
    cond, noise = torch.randn(2, 3), torch.randn(SHAPE)
    with torch.no_grad():
        out = decoder.sample(cond, 1, guidance=1.0, noise=noise, sampler="consistency")
        eps = decoder.denoiser(noise, torch.full((2,), 999), cond)
    abar = decoder.scheduler.alphas_cumprod[999]
    torch.testing.assert_close(out, (noise - (1 - abar).sqrt() * eps) / abar.sqrt())


def test_guidance_rescale_formula():
    cond, guided = torch.randn(3, 4, 5, 5), 3 * torch.randn(3, 4, 5, 5)
    out = rescale_guidance(guided, cond, 0.7)
    std = lambda x: x.flatten(1).std(dim=1).view(-1, 1, 1, 1)  # noqa: E731  (unbiased, as torch's default)
    torch.testing.assert_close(out, 0.7 * guided * std(cond) / std(guided) + 0.3 * guided)
    torch.testing.assert_close(std(rescale_guidance(guided, cond, 1.0)), std(cond))


def test_rectified_flow_scheduler_is_flextoks_euler_sampler():
    decoder = _decoder({"name": "rectified_flow"})
    cond, noise = torch.randn(2, 3), torch.randn(SHAPE)
    with torch.no_grad():
        for guidance, apg in [(1.0, False), (2.5, False), (3.0, True)]:
            out = decoder.sample(cond, 4, guidance=guidance, noise=noise, apg=apg)
            den = decoder.denoiser
            ref = euler_sample(lambda x, t: den(x, t, cond), noise, 4, guidance,
                               lambda x, t: den(x, t, torch.zeros_like(cond)), apg=apg)
            assert torch.equal(out, ref), (guidance, apg)
    assert [float(c[0][0]) for c in decoder.denoiser.calls[:4]] == [1.0, 0.75, 0.5, 0.25]


def test_diffusers_flow_matching_receives_its_own_timesteps():
    decoder = _decoder({"name": "flow_match_euler"})
    cond, noise = torch.randn(2, 3), torch.randn(SHAPE)
    with torch.no_grad():
        out = decoder.sample(cond, 3, noise=noise)
        manual = FlowMatchEulerDiscreteScheduler()
        manual.set_timesteps(3)
        x = noise
        for t in manual.timesteps:
            x = manual.step(decoder.denoiser(x, t.expand(2), cond), t, x).prev_sample
    assert torch.equal(out, x)


def test_lcm_draws_its_step_noise_from_the_generator():
    decoder = _decoder(LCMScheduler())
    cond, noise = torch.randn(2, 3), torch.randn(SHAPE)
    with torch.no_grad():
        a, b, c = (decoder.sample(cond, 2, noise=noise, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_vae_stage_scales_latents_both_ways():
    from tokenizers_vis.nn.pretrained import FrozenVAE

    torch.manual_seed(0)
    decoder = _decoder(_ddim(), vae={"config": TINY_VAE, "scaling_factor": 0.5})
    assert isinstance(decoder.vae, FrozenVAE)
    ae = decoder.vae.model
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = decoder.encode_images(images)
        torch.testing.assert_close(latents, ae.encode(images).latent_dist.mean * 0.5)
        torch.testing.assert_close(decoder.decode_latents(latents), ae.decode(latents / 0.5).sample)
        noise = torch.randn(1, 4, 8, 8)
        sampled = decoder.sample(torch.zeros(1, 3), 2, noise=noise)
        torch.testing.assert_close(decoder.sample(torch.zeros(1, 3), 2, noise=noise, to_images=True),
                                   decoder.decode_latents(sampled))
    pixel = _decoder(_ddim())
    assert pixel.encode_images(images) is images and pixel.decode_latents(images) is images


def test_schedulers_from_plain_config(tmp_path):
    ddim = build_scheduler({"name": "ddim", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                            "beta_schedule": "scaled_linear", "timestep_spacing": "trailing"})
    assert isinstance(ddim, DDIMScheduler) and ddim.config.prediction_type == "v_prediction"
    assert float(ddim.alphas_cumprod[-1]) < 1e-6  # zero terminal SNR
    assert DiffusionDecoder(TinyDenoiser(), ddim).prediction_type == "v_prediction"
    assert isinstance(build_scheduler({"name": "rectified_flow"}), RectifiedFlowEuler)
    assert isinstance(build_scheduler({"name": "lcm"}), LCMScheduler)
    for name in ("ddpm", "euler"):  # the other named diffusers loops run through the same interface
        decoder = _decoder({"name": name})
        with torch.no_grad():
            runs = [decoder.sample(torch.zeros(2, 3), 2, generator=torch.Generator().manual_seed(0), shape=SHAPE)
                    for _ in range(2)]
        assert runs[0].shape == SHAPE and torch.equal(*runs) and torch.isfinite(runs[0]).all()
    assert build_scheduler(ddim) is ddim
    ddim.save_config(tmp_path / "scheduler")
    loaded = build_scheduler({"name": "ddim", "pretrained": str(tmp_path), "subfolder": "scheduler", "steps_offset": 1})
    assert loaded.config.prediction_type == "v_prediction" and loaded.config.steps_offset == 1


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown scheduler name 'dpm'"):
        build_scheduler({"name": "dpm"})
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        _decoder(_ddim(), prediction_type="x0")
    with pytest.raises(ValueError, match="set it in the scheduler config"):
        _decoder(_ddim(), prediction_type="v_prediction")
    with pytest.raises(ValueError, match="flow prediction only"):
        _decoder(_ddim(), timestep_sampling="logit_normal")
    decoder = _layton_like()
    cond = torch.randn(2, 3)
    with pytest.raises(ValueError, match="uses 4 noise draws"):
        decoder.sample(cond, 3, noise=[torch.randn(SHAPE)] * 3, sampler="consistency", timesteps=[999, 499, 124],
                       draw_final_noise=True)
    with pytest.raises(ValueError, match="uses 1 noise draws"):
        decoder.sample(cond, 3, noise=[torch.randn(SHAPE)] * 2)
    with pytest.raises(ValueError, match=r"noise\[1\] has shape"):
        decoder.sample(cond, 2, noise=[torch.randn(SHAPE), torch.randn(1, 4, 6, 6)], sampler="consistency")
    with pytest.raises(ValueError, match="sampler must be one of"):
        decoder.sample(cond, 2, noise=torch.randn(SHAPE), sampler="heun")
    with pytest.raises(ValueError, match="needs `noise` or the latent `shape`"):
        decoder.sample(cond, 2)
    flow = _decoder(RectifiedFlowEuler())
    with pytest.raises(ValueError, match="discrete schedule"):
        flow.sample(cond, 2, noise=torch.randn(SHAPE), sampler="consistency", timesteps=[999, 499])
    with pytest.raises(ValueError, match="eta"):
        flow.sample(cond, 2, noise=torch.randn(SHAPE), eta=1.0)
