"""Exact resume: `python train.py` stopped after N of 2N steps (by max_steps, SIGTERM or SIGKILL at an
arbitrary point) and resumed with `ckpt_path=last` ends where an uninterrupted 2N-step run ends:
same weights (tokenizer, EMA, discriminator, buffers) and the same logged losses for every step.
With the demo webdataset shards, 2 loader workers, the GAN from step 2, an objective that draws from
the RNG every step (`NoisyObjective`), validation and image logging between steps, and a checkpoint
every step."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import REPO_ROOT, final_state, wait_for_checkpoint

from tokenizers_vis.losses import ReconstructionObjective
from tokenizers_vis.models.base import batch_pixels

N = 4
OVERRIDES = [
    "experiment=titok_b", "debug=smoke", "data.num_workers=2", "model.objective.convnext_weight=0",
    "model.objective.gan_start_step=2", "model.objective._target_=test_resume.NoisyObjective",
    f"model.schedule.total_steps={2 * N}",  # the schedule must not depend on when a run stops
    "callbacks.model_checkpoint.every_n_train_steps=1", "trainer.log_every_n_steps=1", "logger=csv",
    "validate_after_fit=false",
]
LOGGED = ("loss/total", "loss/pixel", "loss/lpips", "loss/aux", "loss/disc", "loss/gan_g", "loss/lecam")


class NoisyObjective(ReconstructionObjective):
    """Reconstruct images with noise added: a training step that depends on the random state
    strongly (TiTok itself hardly does this early on), so a resume must restore it exactly.
    The subprocesses import it from this file (tests/training is on their PYTHONPATH)."""

    def forward(self, model, batch, step):
        images = batch_pixels(batch)
        return super().forward(model, images + 0.1 * torch.randn_like(images), step)


def train(run_dir, data_dir, *overrides) -> subprocess.Popen:
    tests = REPO_ROOT / "tests"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (REPO_ROOT, tests, tests / "training")))}
    env.pop("LOCAL_RANK", None)
    # Bitwise-stable MKL results whatever the memory alignment, so that run-to-run noise (tiny,
    # but amplified by Adam) does not hide behind the tolerance below.
    env["MKL_CBWR"] = "AUTO,STRICT"
    command = [sys.executable, "train.py", *OVERRIDES, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
               *overrides]
    # Its own process group, so that a signal reaches its loader workers too, as on a cluster.
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(process: subprocess.Popen, expect: int = 0) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == expect, output[-4000:]
    return output


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    finish(train(run_dir, demo_data, f"trainer.max_steps={2 * N}"))
    return final_state(run_dir, LOGGED)


def assert_same_run(run_dir, reference) -> None:
    (expected, expected_losses), (checkpoint, losses) = reference, final_state(run_dir, LOGGED)
    assert checkpoint["global_step"] == 2 * N and int(checkpoint["state_dict"]["step"]) == 2 * N
    assert checkpoint["state_dict"].keys() == expected["state_dict"].keys()
    for name, value in expected["state_dict"].items():
        assert torch.allclose(checkpoint["state_dict"][name].float(), value.float(), rtol=1e-4, atol=1e-6), name
    for opt, expected_opt in zip(checkpoint["optimizer_states"], expected["optimizer_states"]):
        for key, state in expected_opt["state"].items():
            assert torch.allclose(opt["state"][key]["exp_avg"], state["exp_avg"], rtol=1e-4, atol=1e-7)
    assert checkpoint["DemoDataModule"] == expected["DemoDataModule"]
    assert sorted(losses) == list(range(2 * N)) and "loss/disc" in losses[2 * N - 1]  # the GAN was on
    for step, logged in expected_losses.items():
        assert logged.keys() == losses[step].keys(), step
        for key, value in logged.items():
            assert losses[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if "-v" in p.name or p.name.startswith(".")]


@pytest.mark.slow
def test_resume_after_stopping_at_max_steps(demo_data, tmp_path, reference):
    finish(train(tmp_path, demo_data, f"trainer.max_steps={N}"))
    finish(train(tmp_path, demo_data, "ckpt_path=last", f"trainer.max_steps={2 * N}"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from"] == str(tmp_path / "checkpoints" / "last.ckpt")
    assert_same_run(tmp_path, reference)


@pytest.mark.slow
def test_resume_after_sigterm(demo_data, tmp_path, reference):
    process = train(tmp_path, demo_data, f"trainer.max_steps={2 * N}")
    wait_for_checkpoint(tmp_path, process, N - 1)
    os.killpg(process.pid, signal.SIGTERM)
    finish(process, expect=128 + signal.SIGTERM)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["preempted"] == "SIGTERM" and summary["steps"] < 2 * N
    stopped = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert stopped["global_step"] == summary["steps"] >= N - 1
    finish(train(tmp_path, demo_data, "ckpt_path=last", f"trainer.max_steps={2 * N}"))
    assert_same_run(tmp_path, reference)


@pytest.mark.slow
def test_resume_after_sigkill(demo_data, tmp_path, reference):
    process = train(tmp_path, demo_data, f"trainer.max_steps={2 * N}")
    wait_for_checkpoint(tmp_path, process, N)
    os.killpg(process.pid, signal.SIGKILL)  # most likely while last.ckpt of that step is being written
    process.communicate(timeout=60)
    killed_at = max(int(p.stem.split("_")[1]) for p in (tmp_path / "checkpoints").glob("step_*.ckpt"))
    assert N <= killed_at < 2 * N
    finish(train(tmp_path, demo_data, "ckpt_path=last", f"trainer.max_steps={2 * N}"))
    assert_same_run(tmp_path, reference)
