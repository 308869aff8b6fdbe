"""The evaluator in-process: sources, presets, max_images, token counts, FID of an exact copy."""

from __future__ import annotations

import json

import pytest
import torch
from eval_testing import (
    CONF_DIR,
    NUM_IMAGES,
    RESOLUTION,
    FeatureNet,
    IdentityTokenizer,
    PrefixTokenizer,
    compose_eval,
)

from tokenizers_vis import load_tokenizer
from tokenizers_vis.data import build_demo_shards, make_eval_loader
from tokenizers_vis.evaluation import (
    evaluate_reconstruction,
    json_ready,
    metrics_factory,
    resolve_data_source,
    run_evaluation,
    token_counts,
)
from tokenizers_vis.metrics import METRIC_KEYS, ReconstructionMetrics

REQUIRED = {"rfid", "psnr", "ssim", "lpips", "codebook_usage", "codebook_entropy", "num_images", "tokenizer",
            "data", "resolution"}


def test_folder_and_shard_pattern_give_the_same_metrics(tiny_tokenizer_dir, image_folder, shard_pattern, tmp_path,
                                                       empty_torch_home):
    records = {}
    for name, data in (("folder", image_folder), ("shards", f"'{shard_pattern}'")):
        cfg = compose_eval([f"tokenizer={tiny_tokenizer_dir}", f"data_source={data}", "batch_size=3"], tmp_path / name)
        records[name] = run_evaluation(cfg, conf_dir=CONF_DIR)
        on_disk = json.loads((tmp_path / name / "metrics.json").read_text())
        assert on_disk == records[name]
        assert REQUIRED <= on_disk.keys()
        assert on_disk["num_images"] == NUM_IMAGES and on_disk["resolution"] == RESOLUTION
        assert on_disk["rfid"] is None and "pt_inception-2015-12-05" in on_disk["notes"]["rfid"]
        assert on_disk["lpips"] is None and "vgg16-397923af.pth" in on_disk["notes"]["lpips"]
        assert 0 < on_disk["codebook_usage"] <= 1 and on_disk["psnr"] > 0
    for key in ("psnr", "ssim", "codebook_usage", "codebook_entropy", "num_images"):
        assert records["shards"][key] == pytest.approx(records["folder"][key], rel=1e-6), key


def test_max_images_and_bf16(tiny_tokenizer_dir, image_folder, tmp_path, empty_torch_home):
    cfg = compose_eval([f"tokenizer={tiny_tokenizer_dir}", f"data_source={image_folder}", "max_images=3",
                        "precision=bf16-mixed", "fid=false", "lpips=false"], tmp_path)
    record = run_evaluation(cfg, conf_dir=CONF_DIR)
    assert record["num_images"] == 3 and record["precision"] == "bf16-mixed"
    assert record["notes"] == {} and record["rfid"] is None


def test_data_presets_resolve_to_their_val_shards(tmp_path):
    build_demo_shards(tmp_path / "demo", num_train=2, num_val=3, size=40, shard_size=2)
    paths = {"data_dir": str(tmp_path)}
    assert resolve_data_source("demo", CONF_DIR, paths) == f"{tmp_path}/demo/val-*.tar"
    imagenet = resolve_data_source("imagenet", CONF_DIR, paths)
    assert imagenet == f"{tmp_path}/imagenet/val-{{000000..000049}}.tar"
    with pytest.raises(ValueError, match="no val_shards"):
        resolve_data_source("webdataset", CONF_DIR, paths)
    assert resolve_data_source("/some/folder", CONF_DIR, paths) == "/some/folder"


def test_demo_preset_end_to_end(tiny_tokenizer_dir, tmp_path, empty_torch_home):
    build_demo_shards(tmp_path / "data" / "demo", num_train=2, num_val=5, size=40, shard_size=2)
    cfg = compose_eval([f"tokenizer={tiny_tokenizer_dir}", "data_source=demo", "fid=false", "lpips=false"],
                       tmp_path / "out", data_dir=tmp_path / "data")
    record = run_evaluation(cfg, conf_dir=CONF_DIR)
    assert record["num_images"] == 5 and record["data"] == "demo"
    assert record["source"] == f"{tmp_path}/data/demo/val-*.tar"


def test_identity_reconstruction_has_zero_fid_and_null_psnr(image_folder, tmp_path):
    loader = make_eval_loader(image_folder, RESOLUTION, batch_size=3)
    metrics = ReconstructionMetrics(fid=FeatureNet(), lpips=False)
    result = evaluate_reconstruction(IdentityTokenizer(), loader, metrics, progress=False,
                                     grid_path=tmp_path / "grid.png")
    assert result["num_images"] == NUM_IMAGES
    assert abs(result["rfid"]) < 1e-6
    assert result["ssim"] == pytest.approx(1.0)
    assert result["psnr"] == float("inf")
    notes = {}
    ready = json_ready(result, notes)
    assert ready["psnr"] is None and "null" in notes["psnr"]
    json.dumps(ready, allow_nan=False)  # strict JSON
    assert (tmp_path / "grid.png").is_file()


def test_fid_sees_a_difference(image_folder):
    """A sanity check of the stand-in: a distorted reconstruction gives a clearly positive FID."""
    loader = make_eval_loader(image_folder, RESOLUTION, batch_size=4)
    result = evaluate_reconstruction(PrefixTokenizer(), loader, ReconstructionMetrics(16, fid=FeatureNet(), lpips=False),
                                     tokens=[4], progress=False)
    assert result["tokens"][4] == {k: result[k] for k in METRIC_KEYS}
    factory, notes = metrics_factory(16, fid=FeatureNet(), lpips=False)
    coarse = evaluate_reconstruction(PrefixTokenizer(), loader, factory, tokens=[1, 2, 4], progress=False)
    by_k = coarse["tokens"]
    assert sorted(by_k) == [1, 2, 4] and notes == {}
    assert by_k[1]["rfid"] > by_k[2]["rfid"] > 1e-3 and by_k[4]["rfid"] == pytest.approx(0, abs=1e-6)
    assert by_k[1]["psnr"] < by_k[2]["psnr"] < by_k[4]["psnr"]
    assert by_k[1]["codebook_usage"] < by_k[4]["codebook_usage"]
    assert all(entry["num_images"] == NUM_IMAGES for entry in by_k.values())


def test_token_counts_of_a_fixed_length_tokenizer(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    assert token_counts(None, tok) == [] and token_counts(8, tok) == [8]
    with pytest.raises(ValueError, match="fixed-length tokenizer \\(8 tokens per image\\)"):
        token_counts([4, 8], tok)
    with pytest.raises(ValueError, match="outside 1..8"):
        token_counts(16, tok)
    assert token_counts([2, 4, 2], PrefixTokenizer()) == [2, 4]
    with pytest.raises(TypeError, match="factory"):
        evaluate_reconstruction(PrefixTokenizer(), [], ReconstructionMetrics(16, fid=False, lpips=False), tokens=2)


def test_fixed_length_tokens_reported_per_length(tiny_tokenizer_dir, image_folder, tmp_path):
    cfg = compose_eval([f"tokenizer={tiny_tokenizer_dir}", f"data_source={image_folder}", "tokens=[8]",
                        "fid=false", "lpips=false"], tmp_path)
    record = run_evaluation(cfg, conf_dir=CONF_DIR)
    assert record["tokens"]["8"]["psnr"] == record["psnr"]
    bad = compose_eval([f"tokenizer={tiny_tokenizer_dir}", f"data_source={image_folder}", "tokens=4"], tmp_path)
    with pytest.raises(ValueError, match="fixed-length"):
        run_evaluation(bad, conf_dir=CONF_DIR)
