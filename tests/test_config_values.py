"""Values with a valid range are checked before anything is built (`VALUE_RULES` in
tokenizers_vis/config.py): each error names the key, the value and what is allowed."""

import os
import re
import subprocess
import sys

import pytest
from helpers import EXPERIMENTS, REPO_ROOT, compose_train
from omegaconf import OmegaConf

from tokenizers_vis.config import VALUE_RULES, ConfigError, _leaves, _pattern, check_config, prepare_config


def composed(tmp_path, experiment, *overrides):
    """The config `train.py` would check, with placeholders for the keys a recipe requires
    outside smoke runs (a multi-stage recipe's pretrained files: not what is checked here)."""
    extra: list[str] = []
    while True:
        try:
            return prepare_config(compose_train([f"experiment={experiment}", *overrides, *extra], tmp_path))
        except ValueError as err:
            required = re.search(r"\(([\w.]+)=\.\.\.\)", str(err))
            if required is None or len(extra) > 8:
                raise
            extra.append(f"{required.group(1)}=placeholder")


def error_of(tmp_path, experiment, *overrides) -> str:
    with pytest.raises(ConfigError) as info:
        check_config(composed(tmp_path, experiment, *overrides))
    return str(info.value)


def assert_rejected(tmp_path, experiment, override, message):
    """`override` fails the check with `message` ("<key>=<value>: invalid value, must be <range>")."""
    assert message in error_of(tmp_path, experiment, override)


@pytest.mark.parametrize(("override", "message"), [
    ("data.batch_size=-1", "data.batch_size=-1: invalid value, must be an integer >= 1"),
    ("data.batch_size=0", "data.batch_size=0: invalid value, must be an integer >= 1"),
    ("data.batch_size=null", "data.batch_size=null: invalid value, must be an integer >= 1"),
    ("data.val_batch_size=0", "data.val_batch_size=0: invalid value, must be an integer >= 1, or null"),
])
def test_batch_sizes(tmp_path, override, message):
    assert_rejected(tmp_path, "demo", override, message)


def test_worker_counts(tmp_path):
    assert_rejected(tmp_path, "demo", "data.num_workers=-1", "data.num_workers=-1: invalid value, must be an integer >= 0")
    check_config(composed(tmp_path, "demo", "data.num_workers=0"))  # loading in the main process


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.max_steps=0", "trainer.max_steps=0: invalid value, must be an integer >= 1"),
    ("trainer.max_steps=-1", "trainer.max_steps=-1: invalid value, must be an integer >= 1"),
    ("trainer.val_check_interval=0",
     "trainer.val_check_interval=0: invalid value, must be an integer >= 1 or a number in (0, 1], or null"),
    ("trainer.val_check_interval=2.5",
     "trainer.val_check_interval=2.5: invalid value, must be an integer >= 1 or a number in (0, 1], or null"),
    ("callbacks.model_checkpoint.every_n_train_steps=-5",
     "callbacks.model_checkpoint.every_n_train_steps=-5: invalid value, must be an integer >= 0, or null"),
    ("callbacks.reconstruction_logger.every_n_steps=-1",
     "callbacks.reconstruction_logger.every_n_steps=-1: invalid value, must be an integer >= 0, or null"),
    ("model.schedule.warmup_steps=-1", "model.schedule.warmup_steps=-1: invalid value, must be an integer >= 0"),
    ("model.schedule.total_steps=0", "model.schedule.total_steps=0: invalid value, must be an integer >= 1, or null"),
])
def test_step_counts(tmp_path, override, message):
    assert_rejected(tmp_path, "demo", override, message)


def test_warmup_longer_than_the_schedule(tmp_path):
    message = error_of(tmp_path, "demo", "model.schedule.warmup_steps=100", "model.schedule.total_steps=50")
    assert "model.schedule.warmup_steps=100: invalid value, must be at most model.schedule.total_steps (50)" in message
    check_config(composed(tmp_path, "demo", "model.schedule.warmup_steps=50", "model.schedule.total_steps=50"))


@pytest.mark.parametrize(("override", "message"), [
    ("model.optimizer.lr=0", "model.optimizer.lr=0: invalid value, must be a number > 0"),
    ("model.disc_optimizer.lr=-0.0001", "model.disc_optimizer.lr=-0.0001: invalid value, must be a number > 0"),
    ("model.optimizer.weight_decay=-0.1", "model.optimizer.weight_decay=-0.1: invalid value, must be a number >= 0"),
    ("model.optimizer.betas=[0.9,1.0]",
     "model.optimizer.betas=[0.9, 1.0]: invalid value, must be a list, every item a number in [0, 1)"),
    ("model.schedule.min_lr_ratio=1.5", "model.schedule.min_lr_ratio=1.5: invalid value, must be a number in [0, 1]"),
    ("model.schedule.name=cosin", "model.schedule.name='cosin': invalid value, must be one of 'cosine', 'constant'"),
])
def test_learning_rates_and_weight_decay(tmp_path, override, message):
    assert_rejected(tmp_path, "titok_b", override, message)


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.5"])
def test_ema_decay(tmp_path, value):
    shown = repr(float(value)) if "." in value else value
    assert_rejected(tmp_path, "demo", f"model.ema_decay={value}",
                    f"model.ema_decay={shown}: invalid value, must be a number in (0, 1), or null")


@pytest.mark.parametrize("key", ["grad_clip", "disc_grad_clip"])
def test_grad_clip(tmp_path, key):
    assert_rejected(tmp_path, "titok_b", f"model.{key}=0",
                    f"model.{key}=0: invalid value, must be a number > 0, or null")


def test_resolution_against_patch_size(tmp_path):
    # demo: 32 px, patch_size 4
    assert_rejected(tmp_path, "demo", "model.tokenizer.patch_size=7",
                    "model.tokenizer.image_size=32: invalid value, must be a multiple of model.tokenizer.patch_size (7)")
    assert_rejected(tmp_path, "demo", "data.resolution=30",
                    "model.tokenizer.image_size=30: invalid value, must be a multiple of model.tokenizer.patch_size (4)")
    # A model built for another size than the data delivers.
    assert_rejected(tmp_path, "demo", "model.tokenizer.image_size=128",
                    "model.tokenizer.image_size=128: invalid value, must be equal to data.resolution (32)")
    check_config(composed(tmp_path, "demo", "data.resolution=96"))  # the model follows the data


def test_widths_against_heads(tmp_path):
    assert_rejected(tmp_path, "demo", "model.tokenizer.encoder_heads=3",
                    "model.tokenizer.encoder_width=128: invalid value, must be a multiple of "
                    "model.tokenizer.encoder_heads (3)")


@pytest.mark.parametrize(("experiment", "override", "message"), [
    ("demo", "model.tokenizer.num_latent_tokens=0",
     "model.tokenizer.num_latent_tokens=0: invalid value, must be an integer >= 1"),
    ("flextok_demo", "model.tokenizer.num_registers=-4",
     "model.tokenizer.num_registers=-4: invalid value, must be an integer >= 1"),
    ("demo", "model.tokenizer.codebook_size=0", "model.tokenizer.codebook_size=0: invalid value, must be an integer >= 1"),
    ("flextok_demo", "model.tokenizer.levels=[8,1,5]",
     "model.tokenizer.levels=[8, 1, 5]: invalid value, must be a list, every item an integer >= 2"),
])
def test_token_counts(tmp_path, experiment, override, message):
    assert_rejected(tmp_path, experiment, override, message)


@pytest.mark.parametrize(("experiment", "override", "message"), [
    ("tokenflow_demo", "model.tokenizer.drop_scale_prob=1.5",
     "model.tokenizer.drop_scale_prob=1.5: invalid value, must be a number in [0, 1]"),
    ("flextok_demo", "model.tokenizer.cond_dropout=-0.1",
     "model.tokenizer.cond_dropout=-0.1: invalid value, must be a number in [0, 1]"),
    ("flextok_demo", "model.tokenizer.nested_dropout=half",
     "model.tokenizer.nested_dropout='half': invalid value, must be one of 'none', 'uniform', 'pow2', 'uniform_pow2'"),
    ("demo", "data.crop_scale=[0,1]",
     "data.crop_scale=[0, 1]: invalid value, must be [lo, hi] with 0 < lo <= hi <= 1, or null"),
    ("demo", "data.crop_scale=[0.5,1.2]",
     "data.crop_scale=[0.5, 1.2]: invalid value, must be [lo, hi] with 0 < lo <= hi <= 1, or null"),
    ("demo", "data.crop_scale=[0.9,0.8]",
     "data.crop_scale=[0.9, 0.8]: invalid value, must be [lo, hi] with 0 < lo <= hi <= 1, or null"),
    ("demo", "model.objective.lpips_weight=-1",
     "model.objective.lpips_weight=-1: invalid value, must be a number >= 0"),
    ("demo", "data.color_jitter.hue=0.7", "data.color_jitter.hue=0.7: invalid value, must be a number in [0, 0.5]"),
    ("demo", "data.color_jitter.saturation=1.0",
     "data.color_jitter.saturation=1.0: invalid value, must be a number in [0, 1)"),
])
def test_probabilities_and_weights(tmp_path, experiment, override, message):
    assert_rejected(tmp_path, experiment, override, message)


@pytest.mark.parametrize(("experiment", "overrides"), [
    ("demo", ["model.ema_decay=null", "model.grad_clip=null", "data.val_batch_size=null", "data.crop_scale=[0.8,1.0]",
              "data.crop_scale=[1,1]", "trainer.val_check_interval=0.5", "trainer.val_check_interval=null",
              "callbacks.model_checkpoint.every_n_train_steps=0", "model.schedule.total_steps=null",
              "model.schedule.min_lr_ratio=0", "model.schedule.min_lr_ratio=1", "model.optimizer.lr=1"]),
    ("tokenflow_demo", ["model.tokenizer.drop_scale_prob=0", "model.tokenizer.drop_scale_prob=1"]),
    ("flextok_demo", ["model.tokenizer.nested_dropout=none", "model.tokenizer.cond_dropout=1.0"]),
])
def test_the_edges_of_each_range_pass(tmp_path, experiment, overrides):
    for override in overrides:
        check_config(composed(tmp_path, experiment, override))


def test_every_problem_is_listed_once(tmp_path):
    message = error_of(tmp_path, "demo", "data.batch_size=0", "model.ema_decay=2", "trainer.max_steps=abc")
    lines = message.splitlines()[1:]
    assert len(lines) == 3, message
    assert any(line.strip().startswith("data.batch_size=0: invalid value") for line in lines)
    assert any(line.strip().startswith("model.ema_decay=2: invalid value") for line in lines)
    # A wrong type is reported as such, not a second time as a value out of range.
    assert any(line.strip().startswith("trainer.max_steps='abc': wrong type") for line in lines)


def test_a_bad_value_fails_before_anything_is_built(tmp_path, monkeypatch):
    import hydra

    from tokenizers_vis.training.run import run_training

    def build(*args, **kwargs):
        pytest.fail("something was instantiated")

    monkeypatch.setattr(hydra.utils, "instantiate", build)
    with pytest.raises(ConfigError, match=r"data\.batch_size=-1: invalid value, must be an integer >= 1"):
        run_training(compose_train(["experiment=demo", "data.batch_size=-1"], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_patterns():
    assert _pattern("callbacks.*.every_n_steps").fullmatch("callbacks.logger.every_n_steps")
    assert not _pattern("callbacks.*.every_n_steps").fullmatch("callbacks.a.b.every_n_steps")
    assert _pattern("**.cond_dropout").fullmatch("cond_dropout")
    assert _pattern("**.cond_dropout").fullmatch("model.tokenizer.cond_dropout")
    assert not _pattern("**.cond_dropout").fullmatch("model.tokenizer.cond_dropouts")
    regex = _pattern("model.{optimizer,disc_optimizer}.lr")
    assert regex.fullmatch("model.disc_optimizer.lr") and not regex.fullmatch("model.other_optimizer.lr")
    assert _pattern("model.tokenizer.{scales,*channel_mult}").fullmatch("model.tokenizer.pixel_channel_mult")


def test_every_rule_applies_to_some_experiment(tmp_path):
    """A row whose pattern matches no key (a typo, a renamed option) would check nothing."""
    keys = set()
    for experiment in EXPERIMENTS:
        keys |= {key for key, _ in _leaves(composed(tmp_path, experiment), "")}
    unused = [pattern for pattern, _ in VALUE_RULES if not any(_pattern(pattern).fullmatch(key) for key in keys)]
    assert not unused


@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_passes_the_value_checks(tmp_path, experiment, smoke):
    overrides = ["debug=smoke"] if smoke else []
    data = composed(tmp_path, experiment, *overrides).data
    # Data paths left ??? are the command line's to give; they have no range to check.
    overrides += [f"data.{key}=/placeholder/{key}" for key in ("train_shards", "val_shards")
                  if key in data.keys() and OmegaConf.is_missing(data, key)]
    check_config(composed(tmp_path, experiment, *overrides))


def test_train_py_reports_a_bad_value_without_a_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([sys.executable, "train.py", "experiment=demo", "data.batch_size=-1",
                             f"hydra.run.dir={tmp_path}/run"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "data.batch_size=-1: invalid value, must be an integer >= 1" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()
