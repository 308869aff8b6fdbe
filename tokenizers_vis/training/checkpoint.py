"""Checkpoints that a run can always resume from, exactly.

- `AtomicCheckpointIO` (a trainer plugin): every checkpoint is written to a temporary file in
  the same folder and renamed over its target, so a crash leaves the old file or the new one,
  never half of one.
- `TrainingCheckpoint` (the `model_checkpoint` callback): Lightning's ModelCheckpoint (every
  `every_n_train_steps` steps, `last.ckpt`), plus `last.ckpt` when training ends between two
  intervals, on SIGTERM / SIGUSR1 (cluster preemption: save, then stop with `Preempted`; under
  SLURM with auto-requeue, SIGUSR1 also requeues the job), and after too many non-finite losses
  (the last good weights, before the error propagates).
- `find_resume_checkpoint`: what `ckpt_path=last` resumes from.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes local checkpoints atomically: to `.<name>.tmp-<pid>` next to
    the target, flushed to disk, then `os.replace`d over it. Remote paths (s3://...) are written
    as Lightning writes them."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        # The rename itself is durable once the folder's entry is on disk.
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_complete_checkpoint(path: Path) -> bool:
    """Whether `path` is a whole `torch.save` archive: a cut-off or garbled file has no readable
    zip directory (checked without reading the tensors)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def find_resume_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in `directory` (by write time: `last.ckpt` normally, a step
    checkpoint when a crash came between the two writes of a save or `last.ckpt` is damaged).
    None when there is none."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = sorted((p for p in directory.glob("*.ckpt") if p.is_file()),
                        key=lambda p: (p.stat().st_mtime_ns, p.name == LAST, p.name), reverse=True)
    for path in candidates:
        if is_complete_checkpoint(path):
            return path
        rank_zero_warn(f"{path} is not a complete checkpoint; skipping it")
    return None


def requeues_on(trainer: L.Trainer, signum: int) -> bool:
    """Whether `signum` asks to requeue the job: it is the requeue signal of a SLURM cluster
    environment with `auto_requeue` (Lightning's SLURMEnvironment, which Lightning picks itself
    under SLURM with auto_requeue=True, or one given in `trainer.plugins`)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    environment = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    return (isinstance(environment, SLURMEnvironment) and environment.auto_requeue
            and int(environment.requeue_signal or signal.SIGUSR1) == int(signum))


def requeue_slurm_job() -> bool:
    """`scontrol requeue` this job (an array job's own task); whether SLURM accepted it."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID", "")
    if not job.replace("_", "").isdigit():
        rank_zero_warn(f"cannot requeue: no SLURM job id (SLURM_JOB_ID={job!r})")
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        rank_zero_warn(f"requeueing SLURM job {job} failed: {err}")
        return False
    if result.returncode:
        rank_zero_warn(f"requeueing SLURM job {job} failed ({result.returncode}): {result.stderr.strip()}")
        return False
    rank_zero_info(f"requeued SLURM job {job}")
    return True


class Preempted(Exception):
    """Training stopped on a signal (SIGTERM / SIGUSR1) after saving `checkpoint`."""

    def __init__(self, signum: int, checkpoint: str):
        self.signum = int(signum)
        self.checkpoint = checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after saving {checkpoint}")


class TrainingCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that leaves nothing to lose.

    On top of Lightning's saving (every `every_n_train_steps`, `last.ckpt`, all through the
    trainer's CheckpointIO, atomic with `AtomicCheckpointIO`) it writes `last.ckpt`:
    - when training ends past the last interval (with `save_last`);
    - on any of `signals` during training: the handler only notes the signal; after the step in
      progress the ranks agree (one all-reduce per step under DDP, so all stop at the same step
      even if only some got the signal), save, and raise `Preempted`, skipping the validation
      a normal stop would run. `train.py` then exits with 128 + the signal number. When the
      signal is the requeue signal of a SLURM environment with `auto_requeue` (`requeues_on`),
      rank 0 requeues the job after the save. These handlers replace Lightning's during
      training (see `on_train_start`), so Lightning neither stops nor saves on its own;
    - when the module raises `NonFiniteLossError`: the weights are still the last good ones.
    Data-loader workers ignore these signals (see `PreemptionShield`), so they cannot die first.
    """

    def __init__(self, *args: Any, signals: Sequence[str | int] = ("SIGTERM", "SIGUSR1"), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.signals = [signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in signals]
        self._received = 0
        self._previous_handlers: dict[signal.Signals, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Temporary files of a process killed mid-write (see AtomicCheckpointIO); no other
        # process writes into this run's folder now.
        if trainer.is_global_zero and self.dirpath and os.path.isdir(self.dirpath):
            for stale in Path(self.dirpath).glob(".*.tmp-*"):
                stale.unlink(missing_ok=True)

    # -- signals -------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._received = 0
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous_handlers[signum] = signal.signal(signum, self._note_signal)
        # Ours replace Lightning's handlers for the whole of training. Lightning's SIGTERM handler,
        # set just before, would end training at the next batch with SIGTERMException (exit code
        # 0, no checkpoint); a SIGTERM it noted since is taken over here instead.
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and connector.received_sigterm:
            connector.received_sigterm = False
            self._received = int(signal.SIGTERM)

    def _note_signal(self, signum: int, frame: Any) -> None:
        self._received = int(signum)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _agreed_signal(self, trainer: L.Trainer) -> int:
        if trainer.world_size == 1:
            return self._received
        received = torch.tensor(self._received, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(received, reduce_op="max"))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Lightning's branch for manual optimization wants a "pre-optimization state"; a step of
        # ours is whole once it returns, and its result is what a resumed run must start from.
        every = self._every_n_train_steps
        saved_last = False
        if every >= 1 and trainer.global_step % every == 0 and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            if self.monitor is not None and self.monitor not in candidates:
                self._defer_save_until_validation = True
            else:
                self._save_topk_checkpoint(trainer, candidates)
                self._save_last_checkpoint(trainer, candidates)
                saved_last = self._last_checkpoint_saved == self._last_path()
        signum = self._agreed_signal(trainer)
        if signum:
            path = self._last_path() if saved_last else self.write_last(trainer)
            rank_zero_info(f"{signal.Signals(signum).name}: saved {path} at step {trainer.global_step}; stopping")
            if trainer.is_global_zero and requeues_on(trainer, signum):
                requeue_slurm_job()
            raise Preempted(signum, path)

    # -- end of training -----------------------------------------------------------------------
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self.write_last(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from tokenizers_vis.training.module import NonFiniteLossError

        self._restore_handlers()
        if isinstance(exception, NonFiniteLossError):
            path = self.write_last(trainer)
            exception.args = (f"{exception.args[0]} Saved that state to {path}.", *exception.args[1:])

    def _last_path(self) -> str:
        return os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def write_last(self, trainer: L.Trainer) -> str:
        """Save the current state as `<dirpath>/last.ckpt` (on every rank's call, as Lightning needs)."""
        path = self._last_path()
        self._save_checkpoint(trainer, path)
        self.last_model_path = path
        return path
