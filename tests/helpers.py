"""Helpers shared by tests: composing the Hydra configs of this repo in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tokenizers_vis.config import register_resolvers

REPO_ROOT = Path(__file__).resolve().parents[1]
# The reference fixtures (official-code outputs); TOKENIZERS_VIS_SHARED points elsewhere (and lets a
# test check what a checkout without them does).
SHARED = Path(os.environ.get("TOKENIZERS_VIS_SHARED", REPO_ROOT.parent / "shared"))
CONF_DIR = REPO_ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


# Set by CI (.ci/run): the reference fixtures of ../shared are then required, and a missing one fails
# the test instead of skipping it, so that a moved or renamed fixture cannot silently turn the
# strongest tests off. Users who clone without ../shared (variable unset) get skips.
REQUIRE_SHARED_VAR = "REQUIRE_SHARED"


def shared_required() -> bool:
    return os.environ.get(REQUIRE_SHARED_VAR, "") not in ("", "0")


def missing_fixture(message: str) -> None:
    """Fail (REQUIRE_SHARED set) or skip the running test because a reference fixture is absent."""
    if shared_required():
        pytest.fail(f"{message}; {REQUIRE_SHARED_VAR}=1 requires it", pytrace=False)
    pytest.skip(message)


def reference_path(shared_dir: Path, model: str, name: str = "") -> Path:
    """`shared_dir/reference/<model>/<name>`, or a skip (a failure under REQUIRE_SHARED=1) naming what is missing."""
    path = shared_dir / "reference" / model / name
    if not path.exists():
        missing_fixture(f"{path} is absent: the {model} reference fixtures are not in this checkout")
    return path


def compose_train(overrides: list[str], output_dir: Path | str, data_dir: Path | str | None = None) -> DictConfig:
    """Compose conf/train.yaml the way `train.py` would, with the run folder at `output_dir`."""
    register_resolvers()
    base = [f"paths.output_dir={output_dir}", f"paths.root_dir={REPO_ROOT}"]
    if data_dir is not None:
        base.append(f"paths.data_dir={data_dir}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train.yaml", overrides=base + list(overrides))


# -- subprocess training runs (resume and preemption tests) -------------------------------------------
def wait_for_checkpoint(run_dir: Path, process, step: int) -> None:
    """Until step_<k>.ckpt exists for some k >= step (the file appears complete: atomic writes)."""
    import time

    deadline = time.monotonic() + 600
    while not any(int(p.stem.split("_")[1]) >= step for p in (run_dir / "checkpoints").glob("step_*.ckpt")):
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def final_state(run_dir: Path, logged) -> tuple[dict, dict]:
    """last.ckpt of a run, and its logged values of the `logged` keys by step (each step once)."""
    import csv

    import torch

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    losses: dict[int, dict[str, float]] = {}
    with open(run_dir / "logs" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("loss/total"):
                step = int(row["step"])
                assert step not in losses, f"step {step} logged twice"
                losses[step] = {k: float(row[k]) for k in logged if row.get(k)}
    return checkpoint, losses
