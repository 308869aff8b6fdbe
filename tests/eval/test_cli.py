"""`python eval/reconstruct.py` as users run it: files written, the missing-weights message,
strict_fid, and sharded runs under torchrun and `devices=2`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from eval_testing import CONF_DIR, NUM_IMAGES, REPO_ROOT, RESOLUTION, compose_eval
from PIL import Image

from tokenizers_vis.evaluation import run_evaluation
from tokenizers_vis.metrics import INCEPTION_WEIGHTS_FILE

SCRIPT = REPO_ROOT / "eval" / "reconstruct.py"
METRICS = ("psnr", "ssim", "codebook_usage", "codebook_entropy", "codebook_perplexity", "num_images")


def run_cli(args: list[str], cwd, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    command = (launcher or [sys.executable]) + [str(SCRIPT), *args, "num_workers=0"]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_writes_metrics_and_grid_into_the_run_folder(tiny_tokenizer_dir, image_folder, tmp_path,
                                                       empty_torch_home):
    run_dir = tmp_path / "run"
    result = run_cli([f"tokenizer={tiny_tokenizer_dir}", f"data={image_folder}", f"hydra.run.dir={run_dir}",
                      "batch_size=3"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"rfid", "psnr", "ssim", "lpips", "codebook_usage", "codebook_entropy", "num_images", "tokenizer",
            "data", "resolution"} <= metrics.keys()
    assert metrics["num_images"] == NUM_IMAGES and metrics["data"] == str(image_folder)
    assert metrics["rfid"] is None and metrics["lpips"] is None
    # The message names the file, where it is looked for, and the option that points at it.
    log = result.stdout + result.stderr
    assert "rFID will not be computed" in log and INCEPTION_WEIGHTS_FILE in log and "inception_weights=PATH" in log
    assert str(empty_torch_home / "hub" / "checkpoints") in log
    # Originals above reconstructions: 2 rows of 7 images, 2 px padding around each.
    with Image.open(run_dir / "grid.png") as grid:
        assert grid.size == (NUM_IMAGES * RESOLUTION + (NUM_IMAGES + 1) * 2, 2 * RESOLUTION + 3 * 2)


def test_cli_strict_fid_fails_with_the_message(tiny_tokenizer_dir, image_folder, tmp_path, empty_torch_home):
    result = run_cli([f"tokenizer={tiny_tokenizer_dir}", f"data={image_folder}", f"output_dir={tmp_path}/out",
                      "strict_fid=true"], cwd=tmp_path)
    assert result.returncode != 0
    assert INCEPTION_WEIGHTS_FILE in result.stderr and "inception_weights=PATH" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_data_argument_takes_a_brace_pattern(tiny_tokenizer_dir, shard_pattern, tmp_path):
    """The entry point's rewrite of `data=` (a config group name in conf/) as a quoted value."""
    spec = importlib.util.spec_from_file_location("reconstruct_cli", SCRIPT)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = cli.data_as_value([f"tokenizer={tiny_tokenizer_dir}", f"data={shard_pattern}", "fid=false", "lpips=false"])
    assert argv[1] == f"data_source='{shard_pattern}'"
    assert cli.data_as_value(["data=[a,b]", "data='x'", "batch_size=2"]) == ["data_source=[a,b]", "data_source='x'",
                                                                             "batch_size=2"]
    record = run_evaluation(compose_eval(argv, tmp_path), conf_dir=CONF_DIR)
    assert record["num_images"] == NUM_IMAGES and record["data"] == shard_pattern
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "grid.png").is_file()


def _same_metrics(sharded: dict, single: dict) -> None:
    assert sharded["num_images"] == NUM_IMAGES and sharded["world_size"] == 2
    for key in METRICS:
        assert sharded[key] == pytest.approx(single[key], rel=1e-6), key


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tiny_tokenizer_dir, shard_pattern, tmp_path, empty_torch_home):
    args = [f"tokenizer={tiny_tokenizer_dir}", f"data={shard_pattern}", "lpips=false", "batch_size=2"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = run_cli(args + [f"hydra.run.dir={tmp_path}/sharded"], cwd=tmp_path, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads((tmp_path / "sharded" / "metrics.json").read_text())
    single = run_evaluation(compose_eval(cli_overrides(args), tmp_path / "single"), conf_dir=CONF_DIR)
    _same_metrics(sharded, single)


@pytest.mark.slow
def test_devices_two_launches_two_processes(tiny_tokenizer_dir, image_folder, tmp_path, empty_torch_home):
    args = [f"tokenizer={tiny_tokenizer_dir}", f"data={image_folder}", "lpips=false", "batch_size=2"]
    result = run_cli(args + ["devices=2", "accelerator=cpu", f"hydra.run.dir={tmp_path}/sharded"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads((tmp_path / "sharded" / "metrics.json").read_text())
    single = run_evaluation(compose_eval(cli_overrides(args), tmp_path / "single"), conf_dir=CONF_DIR)
    _same_metrics(sharded, single)


def cli_overrides(args: list[str]) -> list[str]:
    return [f"data_source='{a[5:]}'" if a.startswith("data=") else a for a in args]
