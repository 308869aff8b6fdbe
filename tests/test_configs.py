"""Every config composes, and every experiment turns into a tiny buildable model with debug=smoke."""

import hydra
import pytest
import torch
import yaml
from helpers import CONF_DIR, EXPERIMENTS, compose_train
from omegaconf import OmegaConf

from tokenizers_vis.config import prepare_config
from tokenizers_vis.models import Tokenizer

REQUIRED_EXPERIMENTS = {"demo", "titok_b", "titok_bl64_vq8k", "titok_bl128_vq8k", "titok_sl256_vq8k",
                        "titok_ll32_vae", "titok_bl64_vae", "titok_bl128_vae"}


def test_required_experiments_exist():
    assert REQUIRED_EXPERIMENTS <= set(EXPERIMENTS)


def _leaves(node, prefix=""):
    """{dotted key: value} of every scalar in a plain nested dict/list."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return {prefix: node}
    out = {}
    for key, value in items:
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


@pytest.mark.parametrize("group", ["trainer", "logger", "data", "callbacks", "debug", "model"])
def test_every_group_option_composes(group, tmp_path):
    """Each option composes, and its own values are what the composed config holds: every scalar the
    option file sets (defaults lists and interpolations aside) is found at its key, so an option
    that composed but was shadowed or mis-packaged would show."""
    for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        cfg = compose_train([f"{group}={option}"], tmp_path)
        raw = yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text()) or {}
        raw.pop("defaults", None)
        root = OmegaConf.to_container(cfg if group == "debug" else cfg[group], resolve=False)
        composed = _leaves(root)
        stated = {k: v for k, v in _leaves(raw).items() if not (isinstance(v, str) and "${" in v)}
        assert stated, f"{group}/{option}.yaml sets no value of its own"
        assert {k: composed.get(k, "<absent>") for k in stated} == stated, f"{group}={option}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_names_itself(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}"], tmp_path)
    assert cfg.name == experiment
    assert cfg.model.tokenizer.image_size == cfg.data.resolution


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_smoke_makes_a_tiny_model(experiment, tmp_path):
    cfg = prepare_config(compose_train([f"experiment={experiment}", "debug=smoke"], tmp_path))
    assert "smoke" not in cfg.model
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.max_steps <= 3
    tokenizer = hydra.utils.instantiate(cfg.model.tokenizer)
    assert isinstance(tokenizer, Tokenizer)
    assert sum(p.numel() for p in tokenizer.parameters()) < 2_000_000
    x = torch.rand(1, 3, cfg.data.resolution, cfg.data.resolution)
    output = tokenizer(x)
    # A model whose training forward decodes no pixels (SEED's decoder is a frozen diffusion model)
    # still decodes images of the input's shape.
    reconstruction = output.reconstruction if output.reconstruction is not None else tokenizer.reconstruct(x)
    assert reconstruction.shape == x.shape


def test_released_architectures_are_what_the_experiments_build(tmp_path):
    cfg = compose_train(["experiment=titok_bl64_vq8k"], tmp_path)
    with torch.device("meta"):
        tokenizer = hydra.utils.instantiate(cfg.model.tokenizer)
    assert sum(p.numel() for p in tokenizer.parameters()) == 390016148  # official titok_bl64_vq8k


def test_command_line_model_keys_win_over_the_smoke_block(tmp_path):
    """`debug=smoke model.tokenizer.decoder_channels=64` keeps the 64 (the smoke block sets it to
    null); keys the command line leaves alone still get the smoke values."""
    overrides = ["experiment=tokenflow_demo", "debug=smoke", "model.tokenizer.decoder_channels=64",
                 "++model.tokenizer.decoder_num_res_blocks=3", "trainer.max_steps=5"]
    plain = prepare_config(compose_train(overrides, tmp_path))
    assert plain.model.tokenizer.decoder_channels is None  # without the command line: smoke wins
    cfg = prepare_config(compose_train(overrides, tmp_path), cli_overrides=overrides)
    assert cfg.model.tokenizer.decoder_channels == 64 and cfg.model.tokenizer.decoder_num_res_blocks == 3
    assert cfg.model.tokenizer.semantic_decoder_width == plain.model.tokenizer.semantic_decoder_width == 32
    assert "smoke" not in cfg.model
    # A stage key the stage merge consumed is not put back.
    staged = ["experiment=titok_b64", "debug=smoke", "model.stage=1", "model.stages.1.objective.aux_weight=2.0"]
    cfg = prepare_config(compose_train(staged, tmp_path), cli_overrides=staged)
    assert "stages" not in cfg.model
