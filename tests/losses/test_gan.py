import pytest
import torch

from tokenizers_vis.losses import LeCamRegularizer, adaptive_gan_weight, hinge_d_loss, hinge_g_loss


def test_hinge_d_loss_on_known_logits():
    real = torch.tensor([2.0, 0.5])  # relu(1 - real) = [0, 0.5] -> mean 0.25
    fake = torch.tensor([-2.0, 0.0])  # relu(1 + fake) = [0, 1]  -> mean 0.5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    # Confident and correct on both sides: nothing to learn.
    assert hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -3.0)).item() == 0.0


def test_hinge_g_loss_is_negative_mean_in_float32():
    fake = torch.tensor([[1.0, -3.0], [0.5, 0.5]], dtype=torch.bfloat16)
    loss = hinge_g_loss(fake)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.25)


def test_lecam_ema_update_and_penalty():
    lecam = LeCamRegularizer(decay=0.9)
    # First call: the averages take the batch means (no bias towards the zero init).
    lecam(torch.full((2, 1, 4, 4), 2.0), torch.full((2, 1, 4, 4), -1.0))
    assert lecam.ema_real.item() == pytest.approx(2.0)
    assert lecam.ema_fake.item() == pytest.approx(-1.0)
    # Second call: ema = 0.9 * ema + 0.1 * mean, then the penalty uses the updated averages.
    reg = lecam(torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4))
    assert lecam.ema_real.item() == pytest.approx(0.9 * 2.0 + 0.1 * 0.0)
    assert lecam.ema_fake.item() == pytest.approx(0.9 * -1.0 + 0.1 * 1.0)
    expected = (0.0 - (-0.8)) ** 2 + (1.8 - 1.0) ** 2  # relu(real - ema_fake)^2 + relu(ema_real - fake)^2
    assert reg.item() == pytest.approx(expected)
    assert int(lecam.num_updates) == 2


def test_lecam_state_resumes_and_eval_does_not_update():
    lecam = LeCamRegularizer(decay=0.99)
    for _ in range(3):
        lecam(torch.randn(8), torch.randn(8))
    state = lecam.state_dict()
    assert set(state) == {"ema_real", "ema_fake", "num_updates"}
    resumed = LeCamRegularizer(decay=0.99)
    resumed.load_state_dict(state)
    real, fake = torch.randn(8), torch.randn(8)
    assert torch.equal(lecam(real, fake), resumed(real, fake))

    resumed.eval()
    before = resumed.ema_real.clone()
    resumed(torch.full((8,), 10.0), torch.zeros(8))
    assert torch.equal(resumed.ema_real, before)


def test_lecam_rejects_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        LeCamRegularizer(decay=1.0)


def test_adaptive_weight_matches_hand_computed_ratio():
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    target = torch.randn(5, 2)
    weight = torch.nn.Parameter(torch.randn(2, 3))  # a linear "last layer": y = x @ W^T
    y = x @ weight.T
    nll = ((y - target) ** 2).sum()
    g_loss = -y.mean()

    # d nll / dW = 2 (y - t)^T x ;  d g / dW = -(1 / numel) * ones^T x
    nll_grad = 2 * (y - target).detach().T @ x
    g_grad = -torch.ones(5, 2).T @ x / y.numel()
    expected = nll_grad.norm() / (g_grad.norm() + 1e-4)

    adaptive = adaptive_gan_weight(nll, g_loss, weight)
    assert not adaptive.requires_grad
    assert adaptive.item() == pytest.approx(expected.item(), rel=1e-5)
    # retain_graph=True: the caller can still backpropagate through the same graph.
    (nll + adaptive * g_loss).backward()
    assert weight.grad is not None


def test_adaptive_weight_is_clamped():
    weight = torch.nn.Parameter(torch.ones(2, 2))
    nll = (weight * 100).sum()
    g_loss = (weight * 1e-6).sum()
    assert adaptive_gan_weight(nll, g_loss, weight, max_weight=3.0).item() == pytest.approx(3.0)


def _lecam_rank(rank: int, world_size: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        lecam = LeCamRegularizer(decay=0.5)
        for step in range(3):  # each rank sees other logits
            lecam(torch.full((2, 1, 4, 4), float(rank + step)), torch.full((2, 1, 4, 4), -float(rank)))
        torch.save({"real": lecam.ema_real.clone(), "fake": lecam.ema_fake.clone()}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_lecam_averages_are_the_same_on_every_ddp_rank(tmp_path):
    """The checkpoint holds one rank's buffers, so every rank must hold the same ones: the batch
    means are averaged over ranks before the update (2 gloo processes, different logits each)."""
    import torch.multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_lecam_rank, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, start_method=method)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    # Global means: real 0.5 + step, fake -0.5; ema after 3 updates (the first copies) at decay 0.5.
    expected_real = 0.5 * (0.5 * 0.5 + 0.5 * 1.5) + 0.5 * 2.5
    for saved in ranks:
        assert saved["real"].item() == pytest.approx(expected_real)
        assert saved["fake"].item() == pytest.approx(-0.5)
