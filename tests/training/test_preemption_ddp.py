"""Preemption on a cluster.

- Under DDP (slow): `python train.py trainer=ddp` with 2 CPU processes, SIGTERM sent to the whole
  process group (as SLURM and scancel do: every rank and every loader worker gets it). One
  complete `last.ckpt` is written, every rank exits with 143 (no hang, no rank killed, no
  temporary file left), and `ckpt_path=last` continues to the same weights and logged losses as
  an uninterrupted run of the same length.
- SLURM auto-requeue (in-process, a faked SLURM job and `scontrol`): the requeue signal saves,
  requeues and stops; SIGTERM, or auto_requeue off, saves and stops without requeueing; Lightning's
  own handlers write no `hpc_ckpt_*.ckpt`.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, compose_train, final_state, wait_for_checkpoint

from tokenizers_vis.losses import ReconstructionObjective
from tokenizers_vis.training.checkpoint import is_complete_checkpoint, requeue_slurm_job
from tokenizers_vis.training.run import run_training

N = 3
OVERRIDES = [
    "experiment=titok_b", "debug=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
    "data.num_workers=1", "model.objective.convnext_weight=0", "model.objective.gan_start_step=2",
    f"model.schedule.total_steps={2 * N}",  # the schedule must not depend on when a run stops
    "callbacks.model_checkpoint.every_n_train_steps=1", "trainer.log_every_n_steps=1", "logger=csv",
    "validate_after_fit=false",
]
LOGGED = ("loss/total", "loss/pixel", "loss/lpips", "loss/aux", "loss/disc", "loss/gan_g")

# Loaded by every Python process of a run (via PYTHONPATH): records the code each rank passes to
# sys.exit, the only way to see the exit status of the ranks Lightning starts itself. With
# TV_SLOW_LAUNCHER_EXIT the launching rank (the one started without LOCAL_RANK) takes that long
# to exit: longer than two periods of Lightning's watchdog (5 s), which kills it (no record then)
# if a rank it started has exited non-zero before it.
EXIT_RECORDER = textwrap.dedent("""
    import os, sys, time
    _exit = sys.exit
    _launcher = "LOCAL_RANK" not in os.environ
    def _recording_exit(code=None):
        if _launcher:
            time.sleep(float(os.environ.get("TV_SLOW_LAUNCHER_EXIT", "0")))
        folder = os.environ.get("TV_EXIT_CODES")
        if folder:
            with open(os.path.join(folder, str(os.getpid())), "w") as f:
                f.write(str(code))
        _exit(code)
    sys.exit = _recording_exit
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(run_dir: Path, data_dir: Path, exits: Path, *overrides: str, slow_exit: float = 0.0) -> subprocess.Popen:
    exits.mkdir(parents=True, exist_ok=True)
    (exits.parent / "sitecustomize.py").write_text(EXIT_RECORDER)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(PYTHONPATH=os.pathsep.join(map(str, (exits.parent, REPO_ROOT))), TV_EXIT_CODES=str(exits),
               MASTER_PORT=str(free_port()), MKL_CBWR="AUTO,STRICT", OMP_NUM_THREADS="1",
               TV_SLOW_LAUNCHER_EXIT=str(slow_exit))
    command = [sys.executable, "train.py", *OVERRIDES, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
               *overrides]
    # Its own process group: the signal goes to the ranks and their loader workers, as on a cluster.
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(process: subprocess.Popen, expect: int) -> str:
    """Wait until every process of the run has closed its output (all ranks and workers)."""
    try:
        output, _ = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the run hung: " + process.communicate()[0][-4000:])
    assert process.returncode == expect, output[-4000:]
    return output


def live_processes(group: int) -> list[int]:
    """Processes of `group` that have not exited (zombies waiting to be reaped do not count)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    finish(train(root / "run", demo_data, root / "exits", f"trainer.max_steps={2 * N}"), expect=0)
    return final_state(root / "run", LOGGED)


@pytest.mark.slow
def test_sigterm_to_every_rank_saves_once_and_resumes_exactly(demo_data, tmp_path, reference):
    run_dir, exits = tmp_path / "run", tmp_path / "exits"
    process = train(run_dir, demo_data, exits, f"trainer.max_steps={2 * N}", slow_exit=11.0)
    wait_for_checkpoint(run_dir, process, N - 1)
    os.killpg(process.pid, signal.SIGTERM)
    output = finish(process, expect=128 + signal.SIGTERM)

    # Every process of the run is gone, and both ranks left through sys.exit(143): rank 0 too,
    # although it took longer to leave than the rank it started.
    deadline = time.monotonic() + 30
    while live_processes(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not live_processes(process.pid)
    codes = sorted(p.read_text() for p in exits.iterdir())
    assert codes == ["143", "143"], (codes, output[-4000:])
    assert "Traceback" not in output, output[-4000:]

    # One complete checkpoint of the step all ranks stopped after; nothing half-written.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["preempted"] == "SIGTERM" and N - 1 <= summary["steps"] < 2 * N
    checkpoints = run_dir / "checkpoints"
    assert is_complete_checkpoint(checkpoints / "last.ckpt")
    stopped = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert stopped["global_step"] == summary["steps"] == int(stopped["state_dict"]["step"])
    assert len(stopped["training_state"]["rng"]) == 2  # saved by a 2-rank run
    assert not [p.name for p in checkpoints.iterdir() if ".tmp-" in p.name or "-v" in p.name]
    assert not list(run_dir.rglob("hpc_ckpt_*"))  # Lightning's own SIGTERM / requeue saving stayed out

    resume_exits = tmp_path / "resume_exits"
    finish(train(run_dir, demo_data, resume_exits, "ckpt_path=last", f"trainer.max_steps={2 * N}"), expect=0)
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] == str(checkpoints / "last.ckpt")

    (expected, expected_losses), (checkpoint, losses) = reference, final_state(run_dir, LOGGED)
    assert checkpoint["global_step"] == 2 * N and int(checkpoint["state_dict"]["step"]) == 2 * N
    assert checkpoint["state_dict"].keys() == expected["state_dict"].keys()
    mismatched = {name: float((checkpoint["state_dict"][name].float() - value.float()).abs().max())
                  for name, value in expected["state_dict"].items()
                  if not torch.allclose(checkpoint["state_dict"][name].float(), value.float(), rtol=1e-4, atol=1e-6)}
    assert not mismatched, mismatched
    for opt, expected_opt in zip(checkpoint["optimizer_states"], expected["optimizer_states"]):
        for key, state in expected_opt["state"].items():
            assert torch.allclose(opt["state"][key]["exp_avg"], state["exp_avg"], rtol=1e-4, atol=1e-7)
    assert sorted(losses) == list(range(2 * N)) and "loss/disc" in losses[2 * N - 1]  # the GAN was on
    for step, logged in expected_losses.items():
        assert logged.keys() == losses[step].keys(), step
        for key, value in logged.items():
            assert losses[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
    assert not [p.name for p in checkpoints.iterdir() if ".tmp-" in p.name]


# -- SLURM auto-requeue ----------------------------------------------------------------------------
@pytest.fixture
def slurm_job(tmp_path, monkeypatch):
    """A faked one-task SLURM job whose `scontrol` records its arguments; returns the record's path."""
    bin_dir, record = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train",
                       "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    return record


def test_requeue_names_the_job_or_the_array_task(slurm_job, monkeypatch):
    assert requeue_slurm_job()
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert requeue_slurm_job()
    assert slurm_job.read_text().splitlines() == ["requeue 4242", "requeue 77_3"]


@pytest.mark.parametrize(("signum", "auto_requeue", "requeued"), [
    (signal.SIGUSR1, True, True),    # the requeue signal
    (signal.SIGTERM, True, False),   # scancel, time limit: SLURM decides
    (signal.SIGUSR1, False, False),  # requeueing switched off
])
def test_slurm_requeue_signal_saves_requeues_and_stops(demo_data, tmp_path, monkeypatch, slurm_job, signum,
                                                       auto_requeue, requeued):
    forward = ReconstructionObjective.forward

    def signalled(self, model, batch, step):
        if step == 2:
            os.kill(os.getpid(), signum)  # arrives in the middle of step 2
        return forward(self, model, batch, step)

    monkeypatch.setattr(ReconstructionObjective, "forward", signalled)
    cfg = compose_train(["experiment=titok_b", "debug=smoke", "trainer=slurm", "~trainer.strategy",
                         "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32",
                         f"trainer.plugins.1.auto_requeue={str(auto_requeue).lower()}", "trainer.max_steps=6",
                         "model.objective.lpips_weight=0", "model.objective.convnext_weight=0",
                         "validate_after_fit=false", "callbacks.model_checkpoint.every_n_train_steps=100"],
                        tmp_path / "run", data_dir=demo_data)
    before = signal.getsignal(signum)
    summary = run_training(cfg)
    assert summary["preempted"] == signal.Signals(signum).name and summary["steps"] == 3
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 3
    assert (slurm_job.read_text().splitlines() if slurm_job.exists() else []) == (["requeue 4242"] if requeued else [])
    assert not list((tmp_path / "run").rglob("hpc_ckpt_*"))
    assert signal.getsignal(signum) == before


def test_a_sigterm_lightning_noted_before_training_is_taken_over(tmp_path):
    """Between Lightning's handler registration and `on_train_start` a SIGTERM reaches Lightning's
    handler, which would end training with SIGTERMException (exit 0, no checkpoint)."""
    import lightning as L

    from tokenizers_vis.training.checkpoint import TrainingCheckpoint

    callback = TrainingCheckpoint(dirpath=tmp_path)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[callback], max_steps=1,
                        enable_progress_bar=False, enable_model_summary=False)
    before = signal.getsignal(signal.SIGTERM)
    trainer._signal_connector.received_sigterm = True
    callback.on_train_start(trainer, L.LightningModule())
    try:
        assert not trainer.received_sigterm and callback._agreed_signal(trainer) == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == callback._note_signal
    finally:
        callback._restore_handlers()
    assert signal.getsignal(signal.SIGTERM) == before
