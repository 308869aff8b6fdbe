"""Hydra config helpers shared by `train.py` and the evaluation entry points."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict


def wandb_offline() -> bool:
    """True unless wandb credentials exist (WANDB_API_KEY or a netrc entry for api.wandb.ai)."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("tv.wandb_offline"):
        OmegaConf.register_new_resolver("tv.wandb_offline", wandb_offline)


def prepare_config(cfg: DictConfig) -> DictConfig:
    """Apply `smoke` (merge the model config's `smoke` block) and drop that block."""
    with open_dict(cfg):
        smoke = cfg.model.pop("smoke", None)
        if cfg.get("smoke"):
            if smoke is None:
                raise ValueError("debug=smoke needs a `smoke` block in the model config (tiny sizes)")
            cfg.model = OmegaConf.merge(cfg.model, smoke)
    return cfg


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """"last" -> <run>/checkpoints/last.ckpt when it exists (a fresh start otherwise)."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
    return str(ckpt_path)
