"""What a run does with bad steps, bad data, bad configs, signals and damaged checkpoint files
(in-process, tiny models; the subprocess resume tests are in test_resume.py)."""

import copy
import functools
import inspect
import os
import signal

import hydra
import pytest
import torch
from helpers import CONF_DIR, EXPERIMENTS, compose_train
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from tokenizers_vis.config import ConfigError, check_config, prepare_config, resolve_ckpt_path
from tokenizers_vis.data import write_shards
from tokenizers_vis.losses import ReconstructionObjective
from tokenizers_vis.models.base import batch_pixels
from tokenizers_vis.training import NonFiniteLossError
from tokenizers_vis.training.checkpoint import AtomicCheckpointIO, find_resume_checkpoint
from tokenizers_vis.training.loggers import ResumableCSVLogger
from tokenizers_vis.training.run import run_training


def tiny(tmp_path, demo_data, *overrides):
    """A TiTok smoke run without perceptual nets (GAN from step 1), a checkpoint every step."""
    return compose_train(
        ["experiment=titok_b", "debug=smoke", "model.objective.lpips_weight=0", "model.objective.convnext_weight=0",
         "validate_after_fit=false", "callbacks.model_checkpoint.every_n_train_steps=1",
         "callbacks.reconstruction_logger.every_n_steps=100", *overrides],
        tmp_path, data_dir=demo_data)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


# -- non-finite losses -----------------------------------------------------------------------------
@pytest.fixture
def nan_steps(monkeypatch):
    """Steps whose images reach the model as NaN: NaN reconstructions, logits and losses, and NaN
    fed into the in-place statistics (LeCam averages, codebook counts) a skip must undo."""
    steps = set()
    forward = ReconstructionObjective.forward

    def poisoned(self, model, batch, step):
        images = batch_pixels(batch)
        return forward(self, model, images * float("nan") if step in steps else images, step)

    monkeypatch.setattr(ReconstructionObjective, "forward", poisoned)
    return steps


def test_a_nonfinite_step_is_skipped_and_counted(demo_data, tmp_path, nan_steps):
    nan_steps.add(1)
    summary = run_training(tiny(tmp_path, demo_data, "trainer.max_steps=3", "model.max_nonfinite_steps=2"))
    # max_steps counts the steps taken; the skipped one only advances the module's counter.
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == 4
    last = load(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_consecutive_nonfinite_steps_stop_with_the_last_good_state(demo_data, tmp_path, nan_steps):
    nan_steps.update({2, 3})
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive non-finite.*last\.ckpt"):
        run_training(tiny(tmp_path, demo_data, "trainer.max_steps=6", "model.max_nonfinite_steps=2"))
    good = load(tmp_path / "checkpoints" / "step_0000002.ckpt")  # after steps 0 and 1
    last = load(tmp_path / "checkpoints" / "last.ckpt")
    assert int(last["state_dict"]["step"]) == 4 and int(last["state_dict"]["nonfinite_steps"]) == 2
    for name, value in good["state_dict"].items():
        if name not in ("step", "nonfinite_steps"):
            assert torch.equal(value, last["state_dict"][name]), name
    for good_opt, last_opt in zip(good["optimizer_states"], last["optimizer_states"]):
        for key, state in good_opt["state"].items():
            assert torch.equal(state["exp_avg"], last_opt["state"][key]["exp_avg"])


# -- signals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_saves_last_and_stops_after_the_step_in_progress(demo_data, tmp_path, monkeypatch, signum):
    forward = ReconstructionObjective.forward

    def signalled(self, model, images, step):
        if step == 2:
            os.kill(os.getpid(), signum)  # arrives in the middle of step 2
        return forward(self, model, images, step)

    monkeypatch.setattr(ReconstructionObjective, "forward", signalled)
    before = signal.getsignal(signum)
    summary = run_training(tiny(tmp_path, demo_data, "trainer.max_steps=6",
                                "callbacks.model_checkpoint.every_n_train_steps=100"))
    assert summary["preempted"] == signal.Signals(signum).name and summary["steps"] == 3
    assert "val_after" not in summary
    last = load(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3 and int(last["state_dict"]["step"]) == 3
    assert signal.getsignal(signum) == before


# -- bad data --------------------------------------------------------------------------------------
def _png(seed: int) -> bytes:
    import io

    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (72, 72, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore::tokenizers_vis.data.pipeline.CorruptSampleWarning")
def test_corrupt_samples_and_truncated_shards_are_skipped_and_summed_up(tmp_path):
    data = tmp_path / "data"
    train = [{"__key__": f"t{i:03d}", "png": _png(i) if i % 3 else b"broken"} for i in range(24)]
    write_shards(train, data / "demo", "train", 12)
    second = data / "demo" / "train-000001.tar"
    second.write_bytes(second.read_bytes()[: second.stat().st_size // 2])
    val = [{"__key__": f"v{i}", "png": _png(100 + i) if i != 1 else b"broken"} for i in range(4)]
    write_shards(val, data / "demo", "val", 4)
    cfg = tiny(tmp_path / "run", data, "trainer.max_steps=6", "data.num_workers=2", "validate_after_fit=true")
    summary = run_training(cfg)
    assert summary["steps"] == 6
    assert summary["skipped_samples_by_split"]["train"] >= 2  # consumed batches crossed broken samples
    assert summary["skipped_samples_by_split"]["eval"] >= 1
    assert summary["skipped_samples"] == sum(summary["skipped_samples_by_split"].values())


def test_a_data_path_without_shards_fails_before_the_model_is_built(tmp_path, monkeypatch):
    import tokenizers_vis.training.module as module

    @functools.wraps(module.TokenizerModule.__init__)  # keeps the signature the config check reads
    def build(*args, **kwargs):
        pytest.fail("the model was built")

    monkeypatch.setattr(module.TokenizerModule, "__init__", build)
    cfg = compose_train(["experiment=titok_b", "debug=smoke", "data=webdataset", "data.num_workers=0",
                         f"data.train_shards={tmp_path}/nowhere/train-000000.tar",
                         f"data.val_shards={tmp_path}/nowhere/val-000000.tar"], tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="nowhere/train"):
        run_training(cfg)


# -- bad configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("override", "message"), [
    ("+model.tokenizer.widht=3", r"model\.tokenizer\.widht: unknown key"),
    ("+model.objective.lpips_wieght=0.5", r"model\.objective\.lpips_wieght: .*did you mean lpips_weight"),
    ("trainer.max_steps=abc", r"trainer\.max_steps='abc': wrong type.*int"),
    ("model.tokenizer.num_latent_tokens=abc", r"model\.tokenizer\.num_latent_tokens='abc': wrong type"),
    ("callbacks.model_checkpoint.every_n_train_steps=abc", r"every_n_train_steps='abc': wrong type"),
])
def test_bad_configs_fail_before_training_naming_the_key(tmp_path, override, message):
    cfg = compose_train(["experiment=demo", override], tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        run_training(cfg)
    assert not (tmp_path / "run").exists()


def test_a_typo_on_the_command_line_fails_at_composition(tmp_path):
    with pytest.raises(ConfigCompositionException, match="widht"):
        compose_train(["experiment=titok_b", "model.tokenizer.widht=3"], tmp_path)


def _target_nodes(node, path=""):
    """(key path, node) of every node with a `_target_` (what the config check inspects)."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node.keys():
            if not (path == "" and key == "hydra") and not OmegaConf.is_interpolation(node, key):
                yield from _target_nodes(node[key], f"{path}.{key}" if path else str(key))


def _takes_any_keyword(target: str) -> bool:
    function = hydra.utils.get_object(target)
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(function).parameters.values())


def _assert_the_check_passes_and_reaches_every_target(cfg):
    """`check_config` accepts `cfg`, and rejects a copy with an unknown key added to every node it
    builds, naming each one whose target has no **kwargs (a check that skipped a node would pass)."""
    check_config(cfg)
    broken = copy.deepcopy(cfg)
    expected = []
    for path, node in list(_target_nodes(broken)):
        with open_dict(node):
            node["widht"] = 3
        if not _takes_any_keyword(node._target_):
            expected.append(f"{path}.widht: unknown key")
    assert len(expected) >= 6  # tokenizer, objective, optimizer, trainer, logger, callbacks at least
    with pytest.raises(ConfigError) as err:
        check_config(broken)
    assert [key for key in expected if key not in str(err.value)] == []


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_passes_the_config_check(experiment, tmp_path):
    _assert_the_check_passes_and_reaches_every_target(
        prepare_config(compose_train([f"experiment={experiment}", "debug=smoke"], tmp_path)))


@pytest.mark.parametrize("group", ["trainer", "callbacks", "logger", "data"])
def test_every_group_option_passes_the_config_check(group, tmp_path):
    # Video data options pair with video experiments (checked with them), not with the image demo.
    for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.endswith("_video")):
        shards = ["data.train_shards=x", "data.val_shards=y"] if option == "webdataset" else []
        cfg = prepare_config(compose_train(["experiment=demo", f"{group}={option}", *shards], tmp_path))
        _assert_the_check_passes_and_reaches_every_target(cfg)


# -- checkpoint files ------------------------------------------------------------------------------
def test_atomic_checkpoint_write_never_leaves_half_a_file(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, path)

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"w": torch.zeros(3)}, path)
    assert torch.equal(load(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    assert resolve_ckpt_path("last", tmp_path / "run") is None  # a fresh start
    io = AtomicCheckpointIO()
    for name in ("step_0000001.ckpt", "step_0000002.ckpt", "last.ckpt"):
        io.save_checkpoint({"name": name}, ckpts / name)
    assert resolve_ckpt_path("last", tmp_path / "run") == str(ckpts / "last.ckpt")
    (ckpts / "last.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes()[:100])  # damaged
    with pytest.warns(UserWarning, match="not a complete checkpoint"):
        assert find_resume_checkpoint(ckpts) == ckpts / "step_0000002.ckpt"
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), tmp_path / "run")


def test_csv_logger_keeps_the_rows_of_the_run_it_resumes(tmp_path):
    first = ResumableCSVLogger(tmp_path, name="logs", version="")
    for step in range(5):
        first.log_metrics({"loss": float(step)}, step=step)
    first.log_metrics({"val/psnr": 20.0}, step=4)
    first.save()
    resumed = ResumableCSVLogger(tmp_path, name="logs", version="")
    resumed.resume_at_step(3)  # the checkpoint was taken after step 2
    for step in range(3, 6):
        resumed.log_metrics({"loss": 10.0 + step, "lr": 1.0}, step=step)
    resumed.save()
    import csv

    rows = list(csv.DictReader(open(tmp_path / "logs" / "metrics.csv")))
    assert [(int(r["step"]), float(r["loss"])) for r in rows] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0),
                                                                  (5, 15.0)]
    assert {"val/psnr", "lr"} <= set(rows[0])
