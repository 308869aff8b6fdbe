import torch

from tokenizers_vis.nn.quantizers import FiniteScalarQuantizer, build_quantizer

LEVELS = [8, 8, 8, 5, 5, 5]


def test_ids_to_codes_to_ids_is_the_identity_over_all_64000_ids():
    fsq = FiniteScalarQuantizer(LEVELS)
    assert fsq.codebook_size == 64000
    ids = torch.arange(64000)
    codes = fsq.embed(ids)
    assert torch.equal(fsq.codes_to_ids(codes), ids)
    assert len({tuple(c) for c in codes.tolist()}) == 64000  # every id its own code


def test_quantized_values_lie_on_the_grid_and_pass_gradients():
    fsq = build_quantizer("fsq", 6, levels=LEVELS)
    z = (3 * torch.randn(4, 10, 6)).requires_grad_()
    z_q, ids, aux = fsq(z)
    assert ids.shape == (4, 10) and ids.dtype == torch.int64
    half = torch.tensor([level // 2 for level in LEVELS], dtype=torch.float32)
    steps = z_q.detach() * half
    assert torch.equal(steps, steps.round())
    assert z_q.abs().max() <= 1
    assert torch.equal(fsq.embed(ids), z_q.detach())
    assert torch.equal(fsq.codes_to_ids(z_q), ids)
    assert float(aux["loss"]) == 0.0
    z_q.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
