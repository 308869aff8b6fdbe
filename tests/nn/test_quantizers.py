import pytest
import torch

from tokenizers_vis.nn.quantizers import DiagonalGaussian, VectorQuantizer, build_quantizer


def test_l2_codes_have_unit_norm_and_ids_are_nearest():
    vq = VectorQuantizer(64, 8, use_l2_norm=True)
    z = torch.randn(4, 10, 8)
    z_q, ids, aux = vq(z)
    assert ids.shape == (4, 10)
    torch.testing.assert_close(z_q.norm(dim=-1), torch.ones(4, 10), atol=1e-5, rtol=0)
    codes = torch.nn.functional.normalize(vq.embedding.weight, dim=-1)
    zn = torch.nn.functional.normalize(z, dim=-1)
    brute = torch.cdist(zn.reshape(-1, 8), codes).argmin(1).reshape(4, 10)
    assert torch.equal(ids, brute)
    torch.testing.assert_close(vq.embed(ids), z_q, atol=1e-6, rtol=0)
    assert set(aux) >= {"loss", "commitment_loss", "codebook_loss"}


def test_losses_match_definition():
    vq = VectorQuantizer(16, 4, use_l2_norm=False, commitment_weight=0.25, codebook_weight=1.0)
    z = torch.randn(3, 5, 4)
    z_q, ids, aux = vq(z)
    codes = vq.embedding.weight[ids]
    mse = ((codes - z) ** 2).mean()
    torch.testing.assert_close(aux["loss"], 1.25 * mse)


def test_straight_through_gradient_reaches_the_encoder():
    vq = VectorQuantizer(32, 6, use_l2_norm=True)
    encoder = torch.nn.Linear(6, 6)
    z_q, _, aux = vq(encoder(torch.randn(8, 6)))
    (z_q.pow(2).sum() + aux["loss"]).backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    assert vq.embedding.weight.grad is not None and vq.embedding.weight.grad.abs().sum() > 0


def test_dead_codes_are_restarted_from_encoder_outputs():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, dead_code_threshold=0.5, usage_decay=0.5).train()
    # All inputs sit next to code 0, so every other code is dead after a few steps.
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.randn(16, 4) * 10)
        vq.embedding.weight[0] = 0
    before = vq.embedding.weight.detach().clone()
    z = torch.randn(64, 4) * 0.01
    for _ in range(5):
        vq(z)
    after = vq.embedding.weight.detach()
    changed = (after != before).any(dim=1)
    assert changed[1:].all(), "dead codes should have been re-initialised"
    # Restarted codes are copies of encoder outputs from the batch (exact distances: cdist's matmul
    # expansion, used from 25 rows on, has rounding errors above 1e-6 at this scale).
    distances = torch.cdist(after[1:], z, compute_mode="donot_use_mm_for_euclid_dist")
    assert distances.min(dim=1).values.max() < 1e-6


def test_no_restart_in_eval_mode():
    vq = VectorQuantizer(16, 4, dead_code_threshold=0.5).eval()
    before = vq.embedding.weight.detach().clone()
    for _ in range(5):
        vq(torch.randn(8, 4) * 0.01)
    assert torch.equal(before, vq.embedding.weight)


def test_quantizer_stays_float32_under_autocast():
    vq = VectorQuantizer(16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, _, aux = vq(torch.randn(2, 3, 4).bfloat16())
    assert z_q.dtype == torch.float32 and aux["loss"].dtype == torch.float32


def test_diagonal_gaussian_mean_noise_and_kl():
    q = DiagonalGaussian(3, kl_weight=0.5)
    z = torch.randn(2, 4, 6)
    mean, logvar = z.chunk(2, dim=-1)
    q.eval()
    latents, ids, aux = q(z)
    assert ids is None
    torch.testing.assert_close(latents, mean)
    noise = torch.randn(2, 4, 3)
    sampled, _, _ = q(z, noise=noise)
    torch.testing.assert_close(sampled, mean + torch.exp(0.5 * logvar) * noise)
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(-1).sum(1).mean()
    torch.testing.assert_close(aux["loss"], 0.5 * kl)
    with pytest.raises(TypeError, match="no codebook"):
        q.embed(torch.zeros(1, 1, dtype=torch.long))


def test_build_quantizer_rejects_unknown():
    with pytest.raises(ValueError, match="unknown quantizer"):
        build_quantizer("lfq", 4)


def test_non_finite_inputs_never_reach_the_codebook():
    vq = VectorQuantizer(16, 4, dead_code_threshold=10.0, usage_decay=0.0).train()  # every code dead at once
    z = torch.randn(8, 4)
    z[:, 0] = float("nan")
    vq(z)
    assert torch.isfinite(vq.embedding.weight).all()
