"""TokenFlow's shared-mapping quantizer and the multi-scale residual wrapper, against the official
fixtures (../shared/reference/tokenflow) and against brute force."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import reference_path
from safetensors import safe_open
from safetensors.torch import load_file

from tokenizers_vis.nn.quantizers import (
    MultiScaleResidualQuantizer,
    SharedMappingQuantizer,
    VectorQuantizer,
    build_quantizer,
)

FIXTURES = ["tiny_clipb", "tiny_clipb_enhanced", "tiny_siglip"]


def load_fixture(shared_dir, name):
    path = reference_path(shared_dir, "tokenflow", f"{name}.safetensors")
    with safe_open(str(path), "pt") as f:
        scales = json.loads(f.metadata()["scale_rq_layers"])
    tensors = load_file(str(path))
    quantizer = SharedMappingQuantizer(512)
    # Strict load under our names: the official ones are quantize.embedding_vqkd / embedding_vqgan.
    quantizer.load_state_dict({
        "semantic_codebook.weight": tensors["state_dict.quantize.embedding_vqkd.weight"],
        "pixel_codebook.weight": tensors["state_dict.quantize.embedding_vqgan.weight"],
    })
    return tensors, MultiScaleResidualQuantizer(quantizer, scales).eval(), scales


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", FIXTURES)
def test_matches_the_official_multi_scale_quantization(shared_dir, name):
    t, msq, scales = load_fixture(shared_dir, name)
    with torch.no_grad():
        quant, ids, _ = msq(t["io.encode.h"])
        assert torch.equal(ids, t["io.encode.ids"])
        assert max_diff(quant, t["io.encode.quant"]) < 1e-5
        # Each scale on its own: the quantizer on the stored residual input, and our upsampling.
        for k, s in enumerate(scales):
            z_q, ids_k, _ = msq.quantizer(t[f"io.quant.scale{k}.input"].permute(0, 2, 3, 1))
            assert torch.equal(ids_k.reshape(2, s * s), t[f"io.quant.scale{k}.ids"])
            z_q = z_q.permute(0, 3, 1, 2)
            assert max_diff(z_q, t[f"io.quant.scale{k}.zq"]) < 1e-5
            assert max_diff(msq._upsample(z_q), t[f"io.quant.scale{k}.upsampled"]) < 1e-5


@pytest.mark.parametrize("name", FIXTURES)
def test_embed_matches_official_decode_code_and_its_prefix(shared_dir, name):
    t, msq, _ = load_fixture(shared_dir, name)
    ids = t["io.encode.ids"]
    assert max_diff(msq.embed(ids), t["io.decode_code.quant"]) < 1e-5
    assert max_diff(msq.embed(ids[:, :5]), t["io.decode_code_prefix.quant"]) < 1e-5


def brute_force_ids(z, sem_codes, pix_codes, semantic_dim, pixel_weight):
    """Explicit loop over entries: per-half normalisation, d_sem + w * d_pix, first minimum wins."""
    z_s = F.normalize(z[:, :semantic_dim], dim=-1)
    z_p = F.normalize(z[:, semantic_dim:], dim=-1)
    best = torch.full((z.shape[0],), float("inf"))
    ids = torch.zeros(z.shape[0], dtype=torch.long)
    for k in range(sem_codes.shape[0]):
        e_s = F.normalize(sem_codes[k], dim=-1)
        e_p = F.normalize(pix_codes[k], dim=-1)
        d = (z_s - e_s).pow(2).sum(-1) + pixel_weight * (z_p - e_p).pow(2).sum(-1)
        better = d < best  # strict: an equal later entry does not replace the first
        best = torch.where(better, d, best)
        ids = torch.where(better, torch.full_like(ids, k), ids)
    return ids


@pytest.mark.parametrize("pixel_weight", [1.0, 3.0])
def test_ids_equal_brute_force_argmin(pixel_weight):
    q = SharedMappingQuantizer(24, semantic_dim=6, pixel_dim=3, pixel_weight=pixel_weight)
    z = torch.randn(5, 7, 9) * 3
    z_q, ids, _ = q(z)
    expected = brute_force_ids(z.reshape(-1, 9), q.semantic_codebook.weight.detach(),
                               q.pixel_codebook.weight.detach(), 6, pixel_weight)
    assert torch.equal(ids.reshape(-1), expected)
    # z_q holds the two normalised halves of the chosen entry.
    torch.testing.assert_close(z_q[..., :6].norm(dim=-1), torch.ones(5, 7))
    torch.testing.assert_close(z_q[..., 6:].norm(dim=-1), torch.ones(5, 7))
    torch.testing.assert_close(z_q, q.embed(ids), atol=1e-6, rtol=0)


def test_pixel_weight_changes_the_choice():
    # Guards the brute-force test above: a weight that did nothing would pass it for both values.
    torch.manual_seed(1)
    q = SharedMappingQuantizer(64, semantic_dim=6, pixel_dim=3)
    z = torch.randn(256, 9)
    ids_1 = q(z)[1]
    q.pixel_weight = 10.0
    assert (q(z)[1] != ids_1).any()


def test_chunked_lookup_equals_one_shot():
    q = SharedMappingQuantizer(40, semantic_dim=5, pixel_dim=2)
    z = torch.randn(100, 7)
    ids = q(z)[1]
    q.max_distance_elements = 40 * 3  # 3 rows per chunk, the last chunk partial
    assert torch.equal(q(z)[1], ids)


def test_losses_and_statistics_match_their_definition():
    q = SharedMappingQuantizer(32, semantic_dim=6, pixel_dim=2, commitment_weight=0.25, codebook_weight=0.5)
    z = torch.randn(4, 3, 8)
    z_q, ids, aux = q(z)
    zn = torch.cat([F.normalize(z[..., :6], dim=-1), F.normalize(z[..., 6:], dim=-1)], -1)
    codes = q.embed(ids)
    mse = (codes - zn).pow(2).mean()
    torch.testing.assert_close(aux["codebook_loss"], mse)
    torch.testing.assert_close(aux["commitment_loss"], mse)
    torch.testing.assert_close(aux["loss"], 0.75 * mse)
    torch.testing.assert_close(aux["d_semantic"], (codes - zn)[..., :6].pow(2).sum(-1).mean())
    torch.testing.assert_close(aux["d_pixel"], (codes - zn)[..., 6:].pow(2).sum(-1).mean())
    assert not aux["d_semantic"].requires_grad


def test_straight_through_gradient_reaches_input_and_codebooks():
    q = SharedMappingQuantizer(32, semantic_dim=6, pixel_dim=2)
    msq = MultiScaleResidualQuantizer(q, [1, 2, 4])
    h = torch.randn(2, 8, 4, 4, requires_grad=True)
    target = torch.randn(2, 8, 4, 4)
    total, _, aux = msq(h)
    ((total - target).pow(2).sum()).backward(retain_graph=True)
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert q.semantic_codebook.weight.grad is None  # the reconstruction path does not train codes
    aux["loss"].backward()
    assert q.semantic_codebook.weight.grad.abs().sum() > 0
    assert q.pixel_codebook.weight.grad.abs().sum() > 0


def test_float32_under_autocast():
    q = SharedMappingQuantizer(32, semantic_dim=6, pixel_dim=2)
    msq = MultiScaleResidualQuantizer(q, [1, 2, 4])
    h = torch.randn(2, 8, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, ids, aux = msq(h)
    assert total.dtype == torch.float32 and aux["loss"].dtype == torch.float32
    # Same ids and values as a float32 run on the same (bf16-rounded) input.
    expected_total, expected_ids, _ = msq(h.float())
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(total, expected_total, atol=0, rtol=0)


def test_id_layout_and_count():
    msq = MultiScaleResidualQuantizer(SharedMappingQuantizer(16), [1, 2, 4, 6, 8])
    assert msq.num_ids == 1 + 4 + 16 + 36 + 64 == 121
    assert msq.prefix_lengths == [1, 5, 21, 57, 121]
    assert msq.grid == 8 and msq.codebook_size == 16
    total, ids, _ = msq(torch.randn(3, 40, 8, 8))
    assert ids.shape == (3, 121) and ids.dtype == torch.int64 and total.shape == (3, 40, 8, 8)
    blocks = msq.split_ids(ids)
    assert [tuple(b.shape) for b in blocks] == [(3, s, s) for s in [1, 2, 4, 6, 8]]
    assert torch.equal(blocks[2].reshape(3, -1), ids[:, 5:21])  # row-major (h, w) inside a block
    assert [tuple(b.shape) for b in msq.split_ids(ids[:, :5])] == [(3, 1, 1), (3, 2, 2)]


def test_embed_rejects_lengths_that_are_not_prefixes():
    msq = MultiScaleResidualQuantizer(SharedMappingQuantizer(16), [1, 2, 4])
    with pytest.raises(ValueError, match=r"got 20 ids.*\[1, 5, 21\]"):
        msq.embed(torch.zeros(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="got 6 ids"):
        msq.embed(torch.zeros(2, 6, dtype=torch.long))


def test_forward_rejects_a_grid_other_than_the_last_scale():
    msq = MultiScaleResidualQuantizer(SharedMappingQuantizer(16), [1, 2, 4])
    with pytest.raises(ValueError, match=r"\(B, C, 4, 4\)"):
        msq(torch.randn(2, 40, 8, 8))


def test_works_with_any_quantizer():
    msq = MultiScaleResidualQuantizer(VectorQuantizer(16, 5), [1, 3])
    total, ids, aux = msq(torch.randn(2, 5, 3, 3))
    assert ids.shape == (2, 10) and set(aux) >= {"loss", "codebook_loss", "commitment_loss"}
    torch.testing.assert_close(msq.embed(ids), total, atol=1e-5, rtol=0)


def run_with_drop(seed, scales=(1, 2, 3, 4)):
    torch.manual_seed(123)
    msq = MultiScaleResidualQuantizer(SharedMappingQuantizer(32, semantic_dim=6, pixel_dim=2), scales,
                                      drop_scale_prob=0.5).train()
    h = torch.randn(2, 8, scales[-1], scales[-1])
    torch.manual_seed(seed)
    return msq, h, msq(h)


def dropped_scales(msq, ids):
    return [k for k, block in enumerate(msq.split_ids(ids)) if (block == -1).all()]


def test_scale_drop_is_seeded_by_torch():
    msq, h, (total_a, ids_a, _) = run_with_drop(seed=7)
    _, _, (total_b, ids_b, _) = run_with_drop(seed=7)
    assert torch.equal(ids_a, ids_b) and torch.equal(total_a, total_b)
    outcomes = {tuple(dropped_scales(msq, run_with_drop(seed)[2][1])) for seed in range(40)}
    assert len(outcomes) > 1, "different seeds should eventually drop differently"
    assert () in outcomes and any(len(o) == 1 for o in outcomes)


def test_scale_drop_skips_exactly_one_non_first_scale():
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        msq = MultiScaleResidualQuantizer(SharedMappingQuantizer(32, semantic_dim=6, pixel_dim=2), [1, 2, 3, 4],
                                          drop_scale_prob=1.0).train()
        h = torch.randn(2, 8, 4, 4)
        total, ids, _ = msq(h)
        dropped = dropped_scales(msq, ids)
        assert len(dropped) == 1 and dropped[0] != 0
        assert (ids >= 0).sum() == ids.numel() - 2 * msq.scales[dropped[0]] ** 2
        seen.add(dropped[0])
        # The dropped scale contributes nothing: embedding the ids (with -1) gives the output.
        torch.testing.assert_close(msq.embed(ids), total, atol=1e-5, rtol=0)
    assert seen == {1, 2, 3}


def test_no_scale_drop_in_eval():
    msq = MultiScaleResidualQuantizer(SharedMappingQuantizer(32, semantic_dim=6, pixel_dim=2), [1, 2, 4],
                                      drop_scale_prob=1.0).eval()
    ids = msq(torch.randn(2, 8, 4, 4))[1]
    assert (ids >= 0).all()


def test_build_quantizer_shared_mapping():
    q = build_quantizer("shared_mapping", 40, codebook_size=64, semantic_dim=32, pixel_dim=8)
    assert isinstance(q, SharedMappingQuantizer) and q.codebook_size == 64
    with pytest.raises(ValueError, match="40 wide, not 41"):
        build_quantizer("shared_mapping", 41, codebook_size=64)


def test_residual_carries_no_gradient_between_scales():
    """Each scale's losses reach the input only through that scale's own straight-through codes: the
    residual handed to the next scale is detached, as in the official loop."""
    torch.manual_seed(0)
    msq = MultiScaleResidualQuantizer(SharedMappingQuantizer(32, 4, 2), scales=[1, 2, 4])
    h = torch.randn(2, 6, 4, 4, requires_grad=True)
    total, _, aux = msq(h)
    (total.square().sum() + aux["loss"]).backward()

    reference = h.detach().clone().requires_grad_(True)  # the official loop, written out
    residual, out, losses = reference, 0, []
    for s in (1, 2, 4):
        x = residual if s == 4 else F.interpolate(residual, size=(s, s), mode="area")
        z_q, _, aux_s = msq.quantizer(x.permute(0, 2, 3, 1))
        up = z_q.permute(0, 3, 1, 2)
        up = up if s == 4 else F.interpolate(up, size=(4, 4), mode="bicubic", align_corners=False)
        out, residual = out + up, residual - up.detach()
        losses.append(aux_s["loss"])
    (out.square().sum() + torch.stack(losses).mean()).backward()
    assert torch.allclose(h.grad, reference.grad, atol=1e-6)
