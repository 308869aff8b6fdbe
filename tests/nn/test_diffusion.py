import pytest
import torch

from tokenizers_vis.nn.diffusion import (
    AdaptiveProjectedGuidance,
    denoised_estimate,
    euler_sample,
    euler_timesteps,
    logit_normal_timesteps,
    noised,
    velocity_target,
)


@pytest.mark.parametrize("steps", [1, 3, 20])
def test_oracle_velocity_lets_euler_recover_x0(steps):
    x0, noise = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    out = euler_sample(lambda x, t: velocity_target(x0, noise), noise, steps)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_path_endpoints_and_one_step_estimate():
    x0, noise = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    assert torch.equal(noised(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(noised(x0, noise, torch.ones(3)), noise)
    t = torch.rand(3)
    x_t = noised(x0, noise, t)
    torch.testing.assert_close(denoised_estimate(x_t, velocity_target(x0, noise), t), x0)


def test_guidance_scale_one_equals_the_conditional_output_and_skips_the_unconditional_model():
    noise = torch.randn(2, 3, 4, 4)
    cond = lambda x, t: 0.5 * x + t.view(-1, 1, 1, 1)  # noqa: E731

    def uncond(x, t):
        raise AssertionError("the unconditional model must not run at scale 1")

    assert torch.equal(euler_sample(cond, noise, 5, 1.0, uncond), euler_sample(cond, noise, 5))


def test_cfg_and_apg_combine_the_two_velocities():
    noise = torch.randn(2, 3, 4, 4)
    cond = lambda x, t: x + 1  # noqa: E731
    uncond = lambda x, t: x  # noqa: E731
    # Plain CFG: v = v_u + 3 (v_c - v_u) = x + 3 for one step of size 1.
    torch.testing.assert_close(euler_sample(cond, noise, 1, 3.0, uncond), noise - (noise + 3))
    apg = AdaptiveProjectedGuidance()
    v_c, v_u = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    guided = apg(v_c, v_u, 3.0)
    update = (guided - v_c) / 2
    # Orthogonal to v_c and no longer than the threshold.
    assert (update * v_c).sum(dim=(1, 2, 3)).abs().max() < 1e-4
    assert update.flatten(1).norm(dim=1).max() <= 2.5 + 1e-5
    assert not torch.allclose(euler_sample(cond, noise, 4, 3.0, uncond, apg=True),
                              euler_sample(cond, noise, 4, 3.0, uncond))


def test_timesteps():
    assert euler_timesteps(4) == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError):
        euler_timesteps(0)
    t = logit_normal_timesteps(1000, generator=torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1 and abs(float(t.mean()) - 0.5) < 0.05
