"""`run_training(cfg)`: the body of `train.py`, importable so tests can run composed configs
in-process."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from tokenizers_vis.config import check_config, prepare_config, resolve_ckpt_path
from tokenizers_vis.training.checkpoint import Preempted


def instantiate_group(group: DictConfig | None) -> list:
    return [hydra.utils.instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]


def validate_metrics(trainer: L.Trainer, module, datamodule) -> dict[str, float]:
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def skipped_samples(trainer: L.Trainer, datamodule) -> dict[str, int]:
    """Unreadable samples skipped, summed over ranks (a collective: every rank calls it)."""
    counts = datamodule.skipped_samples() if hasattr(datamodule, "skipped_samples") else {}
    if not counts:
        return {}
    names = sorted(counts)
    totals = trainer.strategy.reduce(torch.tensor([float(counts[n]) for n in names]), reduce_op="sum")
    return {name: int(total) for name, total in zip(names, totals.tolist())}


def run_training(cfg: DictConfig, cli_overrides: Sequence[str] = ()) -> dict:
    """Check the config; instantiate data, model, callbacks, loggers and trainer; fit (resuming
    from `ckpt_path`); validate the final (EMA) weights; write `<run>/config.yaml` and
    `<run>/summary.json`. Returns the summary. A run stopped by SIGTERM / SIGUSR1 returns after
    saving `last.ckpt`, without the final validation, with `summary["preempted"]` set (ranks
    started by rank 0 return once it has exited: `leave_after_launcher`).
    `cli_overrides`: the command line's overrides (see `prepare_config`)."""
    cfg = prepare_config(cfg, cli_overrides)
    check_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    if hasattr(datamodule, "check_sources"):
        datamodule.check_sources()  # a wrong data path fails now, not after the model is built
    module = hydra.utils.instantiate(cfg.model)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=instantiate_group(cfg.get("logger"))
    )
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    summary: dict = {"name": cfg.name, "run_dir": str(run_dir)}
    if ckpt_path:
        summary["resumed_from"] = ckpt_path
    elif cfg.get("validate_before_fit"):  # on resume the initial weights are long gone
        summary["val_before"] = validate_metrics(trainer, module, datamodule)
    start = time.perf_counter()
    try:
        # Our own checkpoints hold more than tensors (hyperparameters, RNG states): trusted, full load.
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
    except Preempted as stop:
        summary["preempted"] = signal.Signals(stop.signum).name
        summary["checkpoint"] = stop.checkpoint
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["steps"] = int(module.step)
    summary["nonfinite_steps"] = int(module.nonfinite_steps)
    if cfg.get("validate_after_fit") and "preempted" not in summary:
        summary["val_after"] = validate_metrics(trainer, module, datamodule)
    for when in ("before", "after"):
        if "val/psnr" in summary.get(f"val_{when}", {}):
            summary[f"psnr_{when}"] = summary[f"val_{when}"]["val/psnr"]
    # The same validation images painted their own mean colour: what "PSNR after" must beat.
    flat = [summary.get(f"val_{when}", {}).get("val/psnr_flat_baseline") for when in ("after", "before")]
    if any(value is not None for value in flat):
        summary["psnr_flat_baseline"] = next(value for value in flat if value is not None)
    skipped = skipped_samples(trainer, datamodule)
    if skipped:
        summary["skipped_samples"] = sum(skipped.values())
        summary["skipped_samples_by_split"] = skipped
        splits = ", ".join(f"{name} {count}" for name, count in skipped.items())
        report = f"skipped {summary['skipped_samples']} unreadable samples ({splits})"
        if summary["skipped_samples"]:
            rank_zero_warn(report)
        else:
            rank_zero_info(report)
    grids = sorted((run_dir / "reconstructions").glob("step_*.png"))
    if grids:
        summary["grid"] = str(grids[-1])
    if trainer.is_global_zero:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if "preempted" in summary:
        leave_after_launcher(trainer)
    return summary


def leave_after_launcher(trainer: L.Trainer, timeout: float = 120.0) -> None:
    """Under Lightning's local launcher (`python train.py trainer=ddp`: rank 0 starts the other
    ranks), wait until the launching rank has exited. Its watchdog SIGKILLs it as soon as a rank
    it started has exited with a non-zero code, as a preempted rank does (128 + the signal), so a
    rank leaving first could kill it before it has finished. A collective: every rank calls it."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return
    launched = bool(getattr(trainer.strategy.launcher, "procs", None))
    launchers: list[int] = [0] * trainer.world_size
    torch.distributed.all_gather_object(launchers, os.getpid() if launched else 0)
    parent = os.getppid()
    if parent not in launchers:  # srun, torchrun: no rank started the others
        return
    deadline = time.monotonic() + timeout
    while os.getppid() == parent and time.monotonic() < deadline:  # re-parented once it has exited
        time.sleep(0.1)
