"""Helpers shared by tests: composing the Hydra configs of this repo in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tokenizers_vis.config import register_resolvers

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def reference_path(shared_dir: Path, model: str, name: str = "") -> Path:
    """`shared_dir/reference/<model>/<name>`, or a skip naming what is missing."""
    path = shared_dir / "reference" / model / name
    if not path.exists():
        pytest.skip(f"{path} is absent: the {model} reference fixtures are not in this checkout")
    return path


def compose_train(overrides: list[str], output_dir: Path | str, data_dir: Path | str | None = None) -> DictConfig:
    """Compose conf/train.yaml the way `train.py` would, with the run folder at `output_dir`."""
    register_resolvers()
    base = [f"paths.output_dir={output_dir}", f"paths.root_dir={REPO_ROOT}"]
    if data_dir is not None:
        base.append(f"paths.data_dir={data_dir}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train.yaml", overrides=base + list(overrides))
