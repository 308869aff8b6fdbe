"""rFID in training validation (EMA weights), switched on from the config:
`++model.val_metrics.fid=true ++model.val_metrics.inception_weights=PATH`.

`++` sets the key whether or not the model config lists it (conf/model/*.yaml has `val_metrics: {}`).
"""

from __future__ import annotations

import csv
import logging
import math

import hydra
import pytest
from eval_testing import CONF_DIR, compose_eval, random_inception_weights
from helpers import compose_train

from tokenizers_vis.config import prepare_config
from tokenizers_vis.data import ensure_demo_shards
from tokenizers_vis.evaluation import run_evaluation
from tokenizers_vis.metrics import INCEPTION_WEIGHTS_FILE, InceptionFeatures
from tokenizers_vis.training.run import run_training

SMOKE = ["experiment=demo", "debug=smoke", "validate_before_fit=false", "++model.val_metrics.fid=true"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    ensure_demo_shards(data_dir / "demo", num_train=16, num_val=4, shard_size=8)
    return data_dir


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return random_inception_weights(tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE)


def validation_metrics(overrides: list[str], tmp_path):
    """The ReconstructionMetrics the module builds for a validation epoch under these overrides."""
    cfg = prepare_config(compose_train(SMOKE + overrides, tmp_path))
    module = hydra.utils.instantiate(cfg.model)
    module.on_validation_epoch_start()
    return module._val_metrics


def test_config_passes_the_inception_weights_to_validation(inception_file, tmp_path, empty_torch_home):
    metrics = validation_metrics([f"++model.val_metrics.inception_weights={inception_file}"], tmp_path)
    assert isinstance(metrics.fid.extractor, InceptionFeatures) and metrics.lpips is None


def test_missing_inception_weights_leave_rfid_out_with_the_message(tmp_path, empty_torch_home, caplog):
    with caplog.at_level(logging.WARNING):
        metrics = validation_metrics([], tmp_path)
    assert metrics.fid is None
    assert INCEPTION_WEIGHTS_FILE in caplog.text and "inception_weights=PATH" in caplog.text


def logged(run_dir, column: str) -> list[float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 4 images, 2048-d features: singular
def test_training_logs_val_rfid_equal_to_the_evaluators(demo_data, inception_file, tmp_path, empty_torch_home):
    """The rFID logged by validation is the evaluator's (eval/reconstruct.py) on the same images
    and the same (EMA) weights: the final checkpoint, the 4 validation images, the same Inception."""
    overrides = [f"++model.val_metrics.inception_weights={inception_file}", "validate_after_fit=false", "logger=csv"]
    summary = run_training(compose_train(SMOKE + overrides, tmp_path / "run", data_dir=demo_data))
    assert summary["steps"] == 3
    rfid, psnr = logged(tmp_path / "run", "val/rfid"), logged(tmp_path / "run", "val/psnr")
    assert len(rfid) == 1 and math.isfinite(rfid[0]) and len(psnr) == 1
    cfg = compose_eval([f"tokenizer={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
                        f"data_source={demo_data / 'demo' / 'val-*.tar'}", "resolution=64", "batch_size=2",
                        f"inception_weights={inception_file}", "lpips=false", "download=false"], tmp_path / "eval")
    record = run_evaluation(cfg, conf_dir=CONF_DIR)
    assert record["num_images"] == 4
    # Same features up to float summation order; the Frechet distance of 4 points is ill-conditioned.
    assert record["rfid"] == pytest.approx(rfid[0], rel=1e-3)
    assert record["psnr"] == pytest.approx(psnr[0], rel=1e-4)


@pytest.mark.slow
def test_training_without_inception_weights_trains_on(demo_data, tmp_path, empty_torch_home, caplog):
    with caplog.at_level(logging.WARNING):
        summary = run_training(compose_train(SMOKE, tmp_path, data_dir=demo_data))
    assert summary["steps"] == 3
    assert "val/psnr" in summary["val_after"] and "val/rfid" not in summary["val_after"]
    assert "rFID will not be computed" in caplog.text
