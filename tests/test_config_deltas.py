"""Configs state only deltas: the TokenizerModule's runtime options are defined in one file that
every model config composes, and the two-stage TiTok recipe composes TiTok's tokenizer and
optimizers instead of copying them."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import CONF_DIR, REPO_ROOT
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from tokenizers_vis.config import register_resolvers
from tokenizers_vis.training import TokenizerModule

RUNTIME_FILE = CONF_DIR / "model" / "base" / "runtime.yaml"
# TokenizerModule arguments that each recipe sets itself; the rest is the runtime block.
RECIPE_ARGS = {"tokenizer", "objective", "optimizer", "disc_optimizer", "schedule"}
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of every non-dict value (an empty dict is a leaf)."""
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _runtime_defaults() -> dict[str, Any]:
    runtime = _load(RUNTIME_FILE)
    runtime.pop("_target_")
    return runtime


def _model_nodes(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The model-config dicts a conf file states: a model file's top level and its stage deltas;
    the `model:` block of a global-package file (experiments, debug presets)."""
    data = _load(path)
    if path.relative_to(CONF_DIR).parts[0] == "model":
        nodes = [("", data)]
        nodes += [(f"stages.{k}.", v) for k, v in (data.get("stages") or {}).items()]
        return nodes
    return [("model.", data["model"])] if isinstance(data.get("model"), dict) else []


def _compose_model(conf_dir: Path, model: str, tmp_path: Path) -> DictConfig:
    register_resolvers()
    overrides = [f"model={model}", f"paths.output_dir={tmp_path}", f"paths.root_dir={REPO_ROOT}"]
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose(config_name="train.yaml", overrides=overrides).model


def test_runtime_block_is_the_module_options_besides_the_recipe():
    params = inspect.signature(TokenizerModule.__init__).parameters
    options = set(params) - {"self"} - RECIPE_ARGS
    runtime = _load(RUNTIME_FILE)
    assert runtime.pop("_target_") == "tokenizers_vis.training.TokenizerModule"
    assert set(runtime) == options, f"{RUNTIME_FILE.relative_to(REPO_ROOT)} defines every TokenizerModule option"


def test_runtime_keys_are_defined_in_exactly_one_file():
    """Elsewhere a runtime key may only change a value; stating the default again is a copy."""
    runtime = _runtime_defaults()
    defaults = _leaves(runtime)
    full, copies = [], []
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        if path == RUNTIME_FILE:
            continue
        for prefix, node in _model_nodes(path):
            if set(runtime) <= set(node):
                full.append(path)
            stated = _leaves({key: value for key, value in node.items() if key in runtime})
            copies += [f"{path.relative_to(CONF_DIR)}: {prefix}{key}" for key, value in stated.items()
                       if key in defaults and defaults[key] == value]
    assert not full, f"the whole runtime block is repeated in {full}"
    assert not copies, f"runtime defaults repeated outside {RUNTIME_FILE.name}: {copies}"


@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes_the_runtime_defaults(model, tmp_path):
    """Each model config gets every runtime default except the values its own file changes."""
    composed = _compose_model(CONF_DIR, model, tmp_path)
    assert composed._target_ == "tokenizers_vis.training.TokenizerModule"
    own = _leaves(_load(CONF_DIR / "model" / f"{model}.yaml"))
    for key, value in _leaves(_runtime_defaults()).items():
        assert OmegaConf.select(composed, key) == own.get(key, value), f"model={model}: {key}"


def test_a_change_to_the_runtime_file_reaches_every_model(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    runtime = _load(conf / "model" / "base" / "runtime.yaml")
    runtime["grad_clip"] = 0.25
    runtime["val_metrics"]["lpips_weights"] = "/changed/lpips.pth"
    (conf / "model" / "base" / "runtime.yaml").write_text(yaml.safe_dump(runtime))
    for model in MODELS:
        composed = _compose_model(conf, model, tmp_path)
        assert composed.grad_clip == 0.25, model
        assert composed.val_metrics.lpips_weights == "/changed/lpips.pth", model


def test_two_stage_titok_states_only_what_differs_from_titok(tmp_path):
    titok = OmegaConf.to_container(_compose_model(CONF_DIR, "titok", tmp_path), resolve=False)
    two_stage = OmegaConf.to_container(_compose_model(CONF_DIR, "titok_two_stage", tmp_path), resolve=False)
    own = _load(CONF_DIR / "model" / "titok_two_stage.yaml")
    for block in ("tokenizer", "optimizer", "disc_optimizer", "schedule", "smoke"):
        if not own.get(block):
            continue
        base = _leaves(titok[block])
        repeated = [f"{block}.{key}" for key, value in _leaves(own[block]).items() if key in base and base[key] == value]
        assert not repeated, f"titok_two_stage.yaml repeats titok's values: {repeated}"
    for block in ("tokenizer", "optimizer", "disc_optimizer", "schedule"):
        # Everything it does not state comes from TiTok's composition.
        expected = OmegaConf.to_container(OmegaConf.merge(titok[block], own.get(block) or {}))
        assert two_stage[block] == expected, block
