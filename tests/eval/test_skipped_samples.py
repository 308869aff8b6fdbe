"""`skipped_samples` in the evaluator's metrics.json: the unreadable samples the loader passed over."""

from __future__ import annotations

import json

import pytest
from eval_testing import CONF_DIR, compose_eval

from tokenizers_vis.data import write_shards
from tokenizers_vis.evaluation import run_evaluation


@pytest.mark.filterwarnings("ignore::tokenizers_vis.data.pipeline.CorruptSampleWarning")
def test_metrics_json_counts_the_samples_it_could_not_read(tiny_tokenizer_dir, image_folder, tmp_path):
    files = sorted(image_folder.glob("*.png"))[:5]
    clean = [{"__key__": f.stem, "png": f.read_bytes()} for f in files]
    broken = [*clean[:2], {"__key__": "bad_a", "png": b"not an image"}, *clean[2:],
              {"__key__": "bad_b", "png": b"\x89PNG truncated"}]
    records = {}
    for name, samples in (("clean", clean), ("broken", broken)):
        write_shards(samples, tmp_path / name, "val", 3)
        cfg = compose_eval([f"tokenizer={tiny_tokenizer_dir}", f"data_source={tmp_path / name}", "fid=false",
                            "lpips=false", "batch_size=2"], tmp_path / f"out_{name}")
        run_evaluation(cfg, conf_dir=CONF_DIR)
        records[name] = json.loads((tmp_path / f"out_{name}" / "metrics.json").read_text())
    assert records["clean"]["skipped_samples"] == 0 and records["clean"]["num_images"] == 5
    assert records["broken"]["skipped_samples"] == 2 and records["broken"]["num_images"] == 5
    # The readable images are the same five: the metrics do not move.
    assert records["broken"]["psnr"] == pytest.approx(records["clean"]["psnr"], rel=1e-6)
