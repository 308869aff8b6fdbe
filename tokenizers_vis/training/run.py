"""`run_training(cfg)`: the body of `train.py`, importable so tests can run composed configs
in-process."""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from tokenizers_vis.config import prepare_config, resolve_ckpt_path


def instantiate_group(group: DictConfig | None) -> list:
    return [hydra.utils.instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]


def validate_metrics(trainer: L.Trainer, module, datamodule) -> dict[str, float]:
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def run_training(cfg: DictConfig) -> dict:
    """Instantiate data, model, callbacks, loggers and trainer; fit; validate the final (EMA)
    weights; write `<run>/config.yaml` and `<run>/summary.json`. Returns the summary."""
    cfg = prepare_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)

    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.model)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=instantiate_group(cfg.get("logger"))
    )
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    summary: dict = {"name": cfg.name, "run_dir": str(run_dir)}
    if cfg.get("validate_before_fit"):
        summary["val_before"] = validate_metrics(trainer, module, datamodule)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.get("ckpt_path"), run_dir))
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["steps"] = int(module.step)
    summary["nonfinite_steps"] = int(module.nonfinite_steps)
    if cfg.get("validate_after_fit"):
        summary["val_after"] = validate_metrics(trainer, module, datamodule)
    for when in ("before", "after"):
        if "val/psnr" in summary.get(f"val_{when}", {}):
            summary[f"psnr_{when}"] = summary[f"val_{when}"]["val/psnr"]
    grids = sorted((run_dir / "reconstructions").glob("step_*.png"))
    if grids:
        summary["grid"] = str(grids[-1])
    if trainer.is_global_zero:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
