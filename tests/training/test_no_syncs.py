"""The training step reads nothing back from the device and its forward compiles as one graph.

Host syncs are counted on the CPU with the benchmark's counter (`benchmarks/train_throughput.py`:
the ops that would read back from a GPU). Tiny (`debug=smoke`) configs of the three demo models.
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from helpers import compose_train

from tokenizers_vis.config import prepare_config
from tokenizers_vis.nn.quantizers import VectorQuantizer
from tokenizers_vis.training import NonFiniteLossError
from tokenizers_vis.training.module import TokenizerModule

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
MODELS = ["demo", "flextok_demo", "tokenflow_demo"]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import train_throughput

        yield train_throughput
    finally:
        sys.path.remove(str(BENCHMARKS))


def tiny_module(tmp_path, experiment: str, *overrides: str) -> TokenizerModule:
    # Fused AdamW: it skips a non-finite step on the device (the others need one host read per step).
    cfg = prepare_config(compose_train([f"experiment={experiment}", "debug=smoke", "++model.optimizer.fused=true",
                                        *overrides], tmp_path))
    torch.manual_seed(0)
    return hydra.utils.instantiate(cfg.model)


def fit(module: TokenizerModule, batches: list[dict], callbacks=(), log_every: int = 10**9) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=log_every,
                        callbacks=list(callbacks))
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


def image_batches(n: int, size: int = 64, nan_at: tuple[int, ...] = ()) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(2, 3, size, size, generator=generator) * (float("nan") if i in nan_at else 1.0)}
            for i in range(n)]


# -- the sync-free parts equal the ones they replace --------------------------------------------------
def restart_with_host_reads(vq: VectorQuantizer, z: torch.Tensor, ids: torch.Tensor) -> None:
    """The dead-code restart as it was before the masked one (its branches read the device)."""
    if not bool(torch.isfinite(z).all()):
        return
    hits = torch.bincount(ids, minlength=vq.codebook_size).float()
    vq.usage.mul_(vq.usage_decay).add_(hits, alpha=1 - vq.usage_decay)
    dead = vq.usage < vq.dead_code_threshold
    num_dead = int(dead.sum())
    if num_dead == 0:
        return
    picks = torch.randint(0, z.shape[0], (num_dead,))
    vq.embedding.weight.data[dead] = z[picks]
    vq.usage[dead] = vq.dead_code_threshold * 2


@pytest.mark.parametrize("case", ["some_dead", "none_dead", "most_dead", "non_finite"])
def test_the_masked_restart_equals_the_restart_with_host_reads(case):
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 4, dead_code_threshold=0.5, usage_decay=0.5).train()
    z = torch.randn(64, 4)
    ids = torch.randint(8, 32, (64,))  # codes 0..7 get no hits
    with torch.no_grad():
        vq.usage.copy_({"some_dead": torch.linspace(0.0, 2.0, 32), "none_dead": torch.full((32,), 5.0),
                        "most_dead": torch.zeros(32), "non_finite": torch.zeros(32)}[case])
    if case == "non_finite":
        z[3, 1] = float("nan")
    reference, before = copy.deepcopy(vq), vq.embedding.weight.detach().clone()
    torch.manual_seed(1)
    restart_with_host_reads(reference, z, ids)
    torch.manual_seed(1)
    vq._restart_dead_codes(z, ids)
    assert torch.equal(vq.embedding.weight, reference.embedding.weight)
    assert torch.equal(vq.usage, reference.usage)
    restarted = (vq.embedding.weight != before).any(1)
    assert bool(restarted.any()) == (case in ("some_dead", "most_dead"))


def test_code_counts_equal_bincount_and_skip_non_finite_steps():
    ids = torch.tensor([[3, 3, -1, 0], [7, -1, 3, 15]])
    holder = types.SimpleNamespace(_code_hist=torch.zeros(16, dtype=torch.long))
    output = types.SimpleNamespace(encoded=types.SimpleNamespace(ids=ids))
    TokenizerModule._count_codes(holder, output, torch.tensor(True))
    assert torch.equal(holder._code_hist, torch.bincount(ids[ids >= 0], minlength=16))
    TokenizerModule._count_codes(holder, output, torch.tensor(False))
    assert torch.equal(holder._code_hist, torch.bincount(ids[ids >= 0], minlength=16))


# -- compile: one graph --------------------------------------------------------------------------------
# Tracing TokenFlow (CLIP tower, VQGAN CNN, four scales) takes ~10-30 s on a shared 2-core machine.
@pytest.mark.parametrize("experiment", ["demo", "flextok_demo",
                                        pytest.param("tokenflow_demo", marks=pytest.mark.slow)])
def test_the_training_forward_compiles_without_graph_breaks(tmp_path, experiment):
    """What `model.compile=true` compiles for these objectives (no discriminator): the objective's
    forward, which runs the tokenizer's training forward (FlexTok: `flow_step`) and the losses."""
    module = tiny_module(tmp_path, experiment)
    assert module.objective.discriminator is None
    torch._dynamo.reset()
    explained = torch._dynamo.explain(module.objective)(module.tokenizer.train(), image_batches(1)[0], 5)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


# -- no host syncs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", MODELS)
def test_no_host_sync_inside_the_training_step(tmp_path, bench, experiment):
    """Steps other than the first (which reads the step counter once) and the last (which reads the
    skip counters, as every log_every_n_steps) read nothing back."""
    module = tiny_module(tmp_path, experiment)
    counts = []
    step = module.training_step

    def counted(*args, **kwargs):
        with bench.counting_host_syncs() as mode:
            result = step(*args, **kwargs)
        counts.append(dict(mode.sites))
        return result

    module.training_step = counted
    fit(module, image_batches(4))
    assert len(counts) == 4
    assert counts[1:3] == [{}, {}], counts
    assert sum(counts[0].values()) == 1 and sum(counts[3].values()) == 1, counts  # the counter works


def test_a_non_fused_optimizer_keeps_one_host_read(tmp_path, bench):
    module = tiny_module(tmp_path, "demo", "++model.optimizer.fused=false")
    step, counts = module.training_step, []

    def counted(*args, **kwargs):
        with bench.counting_host_syncs() as mode:
            result = step(*args, **kwargs)
        counts.append(sum(mode.sites.values()))
        return result

    module.training_step = counted
    fit(module, image_batches(3))
    assert counts[1] == 1


# -- the non-finite skip, done on the device ----------------------------------------------------------
class Snapshots(L.Callback):
    def __init__(self):
        self.states = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        optimizers = [copy.deepcopy(opt.state_dict()) for opt in trainer.optimizers]
        self.states.append((copy.deepcopy(module.state_dict()), optimizers, trainer.global_step))


def test_a_nonfinite_step_changes_nothing_with_the_skip_on_the_device(tmp_path):
    """TiTok with GAN (both optimizers fused) and dead-code restart: the NaN step leaves weights, EMA,
    buffers and both optimizers' states as they were and does not count as a step taken."""
    module = tiny_module(tmp_path, "titok_b", "model.objective.lpips_weight=0", "model.objective.convnext_weight=0",
                         "++model.tokenizer.dead_code_threshold=0.05")
    module.objective.gan_start_step = 0  # the smoke block sets 1; the discriminator trains at step 0 here
    snapshots = Snapshots()
    trainer = fit(module, image_batches(4, nan_at=(1,)), [snapshots], log_every=1)
    (before, opt_before, _), (after, opt_after, global_step) = snapshots.states[0], snapshots.states[1]
    # max_steps=4 counts the steps taken: five were attempted, the skipped one is not counted.
    assert global_step == 1 and trainer.global_step == 4 and len(snapshots.states) == 5
    assert int(module.nonfinite_steps) == 1
    for name, value in before.items():
        if name not in ("step", "nonfinite_steps"):
            assert torch.equal(value, after[name]), name
    assert len(opt_before) == 2  # generator and discriminator
    for state_before, state_after in zip(opt_before, opt_after):
        assert state_before["state"].keys() == state_after["state"].keys() != set()
        for key, entry in state_before["state"].items():
            for name, value in entry.items():
                assert torch.equal(value, state_after["state"][key][name]), (key, name)
    assert all(torch.isfinite(v).all() for v in snapshots.states[-1][0].values() if v.is_floating_point())
    # The step after the skip trains again.
    assert not torch.equal(snapshots.states[2][0]["tokenizer.encoder.conv_out.weight"],
                           after["tokenizer.encoder.conv_out.weight"])


def test_consecutive_nonfinite_steps_stop_training_at_the_check(tmp_path):
    module = tiny_module(tmp_path, "demo", "model.max_nonfinite_steps=2")
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive non-finite losses \(steps 1\.\.2\)"):
        fit(module, image_batches(5, nan_at=(1, 2)), log_every=1)
    assert int(module.step) == 3 and int(module.nonfinite_steps) == 2
