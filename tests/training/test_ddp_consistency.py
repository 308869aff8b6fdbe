"""DDP consistency with 2 CPU processes (gloo): ranks that see different images end with identical
weights, EMA and codebook, dead-code restarts included; and one step on 2 ranks x B images is one
step on 1 rank x 2B images (gradients averaged over ranks)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import REPO_ROOT

B = 4  # images per rank

SCRIPT = textwrap.dedent(
    """
    import sys
    from functools import partial

    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    from tokenizers_vis.losses.objective import ReconstructionObjective
    from tokenizers_vis.models.titok import TiTok
    from tokenizers_vis.nn.quantizers import VectorQuantizer
    from tokenizers_vis.training.module import TokenizerModule

    mode, devices, out, B = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    restart = mode == "restart"
    THRESHOLD = 1.0
    restarts = []

    if restart:
        original = VectorQuantizer._restart_dead_codes

        def counted(self, z, ids):
            original(self, z, ids)
            # A restarted code's usage is set back to 2 x threshold; decayed ones never equal it.
            restarts.append(int((self.usage == 2 * THRESHOLD).sum()))

        VectorQuantizer._restart_dead_codes = counted


    class Module(TokenizerModule):
        def train_dataloader(self):
            if restart:  # 6 steps, different images on each rank
                generator = torch.Generator().manual_seed(100 + self.global_rank)
                batches = [torch.rand(B, 3, 32, 32, generator=generator) for _ in range(6)]
            else:  # one step: this rank's share of the same 2B images
                images = torch.rand(2 * B, 3, 32, 32, generator=torch.Generator().manual_seed(7))
                share = len(images) // devices
                batches = [images[self.global_rank * share:(self.global_rank + 1) * share]]
            return torch.utils.data.DataLoader([{"image": x} for x in batches], batch_size=None)


    torch.manual_seed(0)
    tokenizer = TiTok(image_size=32, patch_size=8, num_latent_tokens=4, encoder_width=32, encoder_depth=1,
                      encoder_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2, codebook_size=64,
                      token_dim=4, use_l2_norm=False, dead_code_threshold=THRESHOLD if restart else 0.0)
    if restart:
        tokenizer.quantize.usage_decay = 0.5  # codes die within a few steps instead of ~70
    initial = {k: v.clone() for k, v in tokenizer.state_dict().items()}
    objective = ReconstructionObjective(lpips_weight=0.0, gan_weight=0.0, discriminator=None)
    # SGD: Adam's first step is sign(g) and would turn float noise in near-zero gradients into lr.
    module = Module(tokenizer, objective, optimizer=partial(torch.optim.SGD, lr=0.5),
                    ema_decay=0.9 if restart else None, grad_clip=1.0 if restart else None)
    strategy = DDPStrategy(find_unused_parameters=False, broadcast_buffers=False) if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=6 if restart else 1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        use_distributed_sampler=False)
    trainer.fit(module)
    state = {"tokenizer": module.tokenizer.state_dict(), "restarts": restarts, "initial": initial,
             "ema": module.ema.state_dict() if module.ema is not None else None}
    torch.save(state, f"{out}/{mode}_{devices}_rank{trainer.global_rank}.pt")
    """
)


def launch(tmp_path, mode, devices):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("LOCAL_RANK", None)
    result = subprocess.run([sys.executable, str(script), mode, str(devices), str(tmp_path), str(B)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(tmp_path / f"{mode}_{devices}_rank{r}.pt", weights_only=False) for r in range(devices)]


@pytest.mark.slow
def test_ranks_end_identical_with_dead_code_restarts(tmp_path):
    rank0, rank1 = launch(tmp_path, "restart", 2)
    # Restarts happened, on every step after the first few, the same number on both ranks.
    assert sum(rank0["restarts"]) > 0 and rank0["restarts"] == rank1["restarts"]
    assert rank0["tokenizer"].keys() == rank1["tokenizer"].keys()
    for name, value in rank0["tokenizer"].items():
        assert torch.equal(value, rank1["tokenizer"][name]), name
    for name, value in rank0["ema"].items():
        assert torch.equal(value, rank1["ema"][name]), f"ema.{name}"
    assert torch.equal(rank0["tokenizer"]["quantize.embedding.weight"], rank1["tokenizer"]["quantize.embedding.weight"])
    assert torch.equal(rank0["tokenizer"]["quantize.usage"], rank1["tokenizer"]["quantize.usage"])


@pytest.mark.slow
def test_one_step_on_two_ranks_equals_one_step_on_one_rank_with_both_batches(tmp_path):
    (single,) = launch(tmp_path, "step", 1)
    rank0, rank1 = launch(tmp_path, "step", 2)
    initial = single["initial"]
    moved = 0
    for name, value in single["tokenizer"].items():
        assert torch.equal(rank0["tokenizer"][name], rank1["tokenizer"][name]), name
        torch.testing.assert_close(rank0["tokenizer"][name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        moved += int(not torch.allclose(value, initial[name], rtol=1e-4, atol=1e-5))
    # The step moved most weights (by far more than the tolerance), so the comparison is not vacuous.
    assert moved > len(initial) // 2, (moved, len(initial))
