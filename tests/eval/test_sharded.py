"""Two gloo processes, each reading its share of 7 images, count every image once and give the
one-process numbers (to float rounding)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp
from eval_testing import CONF_DIR, NUM_IMAGES, RESOLUTION, FeatureNet, compose_eval, sharded_worker

from tokenizers_vis import load_tokenizer
from tokenizers_vis.data import make_eval_loader
from tokenizers_vis.evaluation import evaluate_reconstruction, run_evaluation
from tokenizers_vis.metrics import ReconstructionMetrics

WORLD_SIZE = 2
# Forked workers reuse this process's imports (seconds each on 2 cores with spawn).
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


# An untrained TiTok reconstructs every image as black: the reconstruction covariance is singular.
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_two_processes_match_one(tiny_tokenizer_dir, image_folder, tmp_path, empty_torch_home):
    overrides = [f"tokenizer={tiny_tokenizer_dir}", f"data_source={image_folder}", "batch_size=2",
                 "lpips=false", "grid_images=4"]
    sharded_cfg = compose_eval(overrides, tmp_path / "sharded")
    args = (WORLD_SIZE, str(tmp_path / "pg_init"), str(tmp_path), str(tiny_tokenizer_dir), str(image_folder),
            sharded_cfg)
    mp.start_processes(sharded_worker, args=args, nprocs=WORLD_SIZE, start_method=START_METHOD)

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    metrics = ReconstructionMetrics(tokenizer.codebook_size, fid=FeatureNet(), lpips=False)
    single_api = evaluate_reconstruction(tokenizer, make_eval_loader(image_folder, RESOLUTION, batch_size=5),
                                         metrics, progress=False)
    single_record = run_evaluation(compose_eval(overrides, tmp_path / "single"), conf_dir=CONF_DIR)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    keys = [k for saved in ranks for k in saved["keys"]]
    assert sorted(keys) == [f"img_{i:02d}" for i in range(NUM_IMAGES)]  # each image once
    assert [len(saved["keys"]) for saved in ranks] == [4, 3]
    on_disk = json.loads((tmp_path / "sharded" / "metrics.json").read_text())
    assert on_disk["world_size"] == 2 and on_disk["num_images"] == NUM_IMAGES
    assert (tmp_path / "sharded" / "grid.png").is_file()
    for saved in ranks:
        assert saved["api"]["num_images"] == NUM_IMAGES
        for key, value in single_api.items():
            if value is None:
                assert saved["api"][key] is None, key
            else:
                assert saved["api"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        assert {**saved["record"], "seconds": None} == {**on_disk, "seconds": None}  # every rank returns it
    for key in ("psnr", "ssim", "codebook_usage", "codebook_entropy", "codebook_perplexity", "num_images"):
        assert on_disk[key] == pytest.approx(single_record[key], rel=1e-6), key
    assert single_record["rfid"] is None and on_disk["rfid"] is None
