"""End-to-end training runs on the demo shards (in-process, tiny models)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import EXPERIMENTS, REPO_ROOT, compose_train

from tokenizers_vis import load_tokenizer
from tokenizers_vis.hub import checkpoint_state
from tokenizers_vis.training.run import run_training


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_with_debug_smoke(experiment, demo_data, tmp_path):
    cfg = compose_train([f"experiment={experiment}", "debug=smoke", "validate_before_fit=false"], tmp_path,
                        data_dir=demo_data)
    summary = run_training(cfg)
    assert summary["steps"] == 3
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "config.yaml").is_file()
    assert "val/psnr" in summary["val_after"]
    assert list((tmp_path / "reconstructions").glob("step_*.png"))


def test_checkpoint_loads_as_ema_tokenizer(demo_data, tmp_path):
    cfg = compose_train(["experiment=titok_b", "debug=smoke"], tmp_path, data_dir=demo_data)
    run_training(cfg)
    ckpt_path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert not any(k.startswith("objective.frozen.") for k in checkpoint["state_dict"])
    tok = load_tokenizer(ckpt_path)
    assert not tok.training
    ema = checkpoint_state(checkpoint, use_ema=True)
    raw = checkpoint_state(checkpoint, use_ema=False)
    for name, value in tok.state_dict().items():
        assert torch.equal(value, ema[name])
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if raw[k].is_floating_point())
    x = torch.rand(2, 3, 64, 64)
    assert tok.encode(x).ids.shape == (2, 8)  # the smoke block's num_latent_tokens


def test_short_overfit_lowers_the_loss(demo_data, tmp_path):
    overrides = ["experiment=demo", "trainer.max_steps=60", "trainer.val_check_interval=60",
                 "data.num_workers=0", "data.batch_size=8", "data.val_max_images=8",
                 "model.tokenizer.encoder_width=64", "model.tokenizer.decoder_width=64",
                 "model.ema_decay=null", "callbacks.model_checkpoint.every_n_train_steps=60",
                 "callbacks.reconstruction_logger.every_n_steps=60", "logger=csv"]
    summary = run_training(compose_train(overrides, tmp_path, data_dir=demo_data))
    assert summary["psnr_after"] > summary["psnr_before"] + 2.0
    metrics = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    column = header.index("loss/total")
    losses = [float(row.split(",")[column]) for row in metrics[1:] if row.split(",")[column]]
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:5]) / 5


def test_train_py_command_line(demo_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "train.py", "experiment=titok_bl64_vae", "debug=smoke", f"paths.data_dir={demo_data}",
         f"hydra.run.dir={tmp_path}/run"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["name"] == "titok_bl64_vae"


@pytest.mark.slow
def test_ddp_two_cpu_processes_write_one_run_folder(demo_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("LOCAL_RANK", None)
    result = subprocess.run(
        [sys.executable, "train.py", "experiment=titok_b", "debug=smoke", "trainer=ddp", "trainer.accelerator=cpu",
         "trainer.devices=2", f"paths.data_dir={demo_data}", f"paths.log_dir={tmp_path}/outputs"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs" / "titok_b").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["steps"] == 3
