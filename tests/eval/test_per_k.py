"""Per token count outputs of variable-length tokenizers: per_k.png (metrics against k) and
k_grid.png (images decoded at each k), written only when more than one k is evaluated."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from eval_testing import CONF_DIR, NUM_IMAGES, RESOLUTION, FeatureNet, PrefixTokenizer, compose_eval
from PIL import Image

from tokenizers_vis import save_pretrained
from tokenizers_vis.data import make_eval_loader
from tokenizers_vis.evaluation import (
    K_GRID_FILE,
    K_GRID_LABEL_HEIGHT,
    PER_K_PLOT_FILE,
    evaluate_reconstruction,
    metrics_factory,
    run_evaluation,
    write_k_grid,
    write_per_k_plot,
)
from tokenizers_vis.models import FlexTok

# Tiny models on 8 x 8 patches: too narrow for clean decodes, which these tests do not need.
pytestmark = pytest.mark.filterwarnings("ignore:FlexTok patches hold")

PAD = 2


def k_grid_size(rows: int, counts: int, side: int = RESOLUTION) -> tuple[int, int]:
    """(width, height): the original plus one column per count, under the label strip."""
    return (1 + counts) * side + (2 + counts) * PAD, K_GRID_LABEL_HEIGHT + rows * side + (rows + 1) * PAD


def tile(grid: np.ndarray, row: int, column: int, side: int = RESOLUTION) -> np.ndarray:
    top, left = K_GRID_LABEL_HEIGHT + PAD + row * (side + PAD), PAD + column * (side + PAD)
    return grid[top:top + side, left:left + side].astype(np.int16)


def test_k_grid_columns_are_the_original_then_each_count(image_folder, tmp_path):
    loader = make_eval_loader(image_folder, RESOLUTION, batch_size=2)
    factory, _ = metrics_factory(16, fid=FeatureNet(), lpips=False)
    result = evaluate_reconstruction(PrefixTokenizer(), loader, factory, tokens=[1, 2, 4], progress=False,
                                     k_grid_path=tmp_path / K_GRID_FILE, k_grid_images=3)
    with Image.open(tmp_path / K_GRID_FILE) as image:
        assert image.size == k_grid_size(rows=3, counts=3)  # 3 images from two batches
        grid = np.asarray(image.convert("RGB"))
    for row in range(3):
        original, k1, k2, k4 = (tile(grid, row, c) for c in range(4))
        assert np.array_equal(original, k4)  # PrefixTokenizer is exact at its full length
        # Fewer tokens, coarser: the error grows from right to left.
        errors = [np.abs(original - t).mean() for t in (k4, k2, k1)]
        assert errors[0] < errors[1] < errors[2]
    assert sorted(result["tokens"]) == [1, 2, 4]


def test_small_k_grid_tiles_are_enlarged_pixel_for_pixel(tmp_path):
    torch.manual_seed(0)
    originals = torch.rand(2, 3, 16, 16)
    decoded = {1: torch.rand(2, 3, 16, 16), 4: originals}
    write_k_grid(originals, decoded, tmp_path / K_GRID_FILE, min_tile=60)  # 16 px -> 4x (64 px)
    with Image.open(tmp_path / K_GRID_FILE) as image:
        assert image.size == k_grid_size(rows=2, counts=2, side=64)
        grid = np.asarray(image.convert("RGB"))
    expected = (originals[1] * 255).round().byte().permute(1, 2, 0).numpy()
    for column in (0, 2):  # the original and the k=4 decode (the same image)
        assert np.array_equal(tile(grid, 1, column, side=64), np.repeat(np.repeat(expected, 4, 0), 4, 1))
    write_k_grid(originals, decoded, tmp_path / "big.png", min_tile=16)  # already large enough
    with Image.open(tmp_path / "big.png") as image:
        assert image.size == k_grid_size(rows=2, counts=2, side=16)


def test_per_k_plot_draws_the_measured_metrics(tmp_path):
    per_k = {"1": {"psnr": 20.0, "rfid": 9.0, "ssim": 0.5, "lpips": None},
             "4": {"psnr": 25.0, "rfid": 4.0, "ssim": 0.7, "lpips": None},
             "16": {"psnr": float("inf"), "rfid": 1.0, "ssim": 1.0, "lpips": None}}
    # LPIPS not measured: no panel; PSNR infinite at one k: that point left out, the line kept.
    drawn = write_per_k_plot(per_k, tmp_path / PER_K_PLOT_FILE)
    assert drawn == ["psnr", "rfid", "ssim"]
    with Image.open(tmp_path / PER_K_PLOT_FILE) as image:
        assert image.size == (3 * 360, 320)  # 3.6 x 3.2 inches per panel at 100 dpi
        pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 64 and pixels.max() > 250  # something drawn on a white page
    only_psnr = {k: {"psnr": v["psnr"], "rfid": None} for k, v in per_k.items()}
    assert write_per_k_plot(only_psnr, tmp_path / "psnr.png") == ["psnr"]


TINY_FLEXTOK = dict(image_size=RESOLUTION, vae=None, patch_size=8, num_registers=4, encoder_width=32,
                    encoder_depth=1, encoder_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2,
                    sample_steps=2, guidance_scale=1.0)


@pytest.fixture(scope="module")
def flextok_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = FlexTok(**TINY_FLEXTOK).eval()
    with torch.no_grad():  # adaLN-zero starts as the identity: random values make k matter
        for name, p in tok.named_parameters():
            if "modulation" in name or "head.proj" in name:
                p.normal_(0, 0.2)
    return save_pretrained(tok, tmp_path_factory.mktemp("flextok") / "tiny")


def _evaluate(flextok_dir, image_folder, out_dir, *overrides):
    cfg = compose_eval([f"tokenizer={flextok_dir}", f"data_source={image_folder}", "fid=false", "lpips=false",
                        "batch_size=4", *overrides], out_dir)
    record = run_evaluation(cfg, conf_dir=CONF_DIR)
    assert json.loads((out_dir / "metrics.json").read_text()) == record
    return record


def test_flextok_evaluation_writes_per_k_files_only_for_several_counts(flextok_dir, image_folder, tmp_path):
    several = _evaluate(flextok_dir, image_folder, tmp_path / "several", "tokens=[1,2,4]", "k_grid_images=5")
    with Image.open(tmp_path / "several" / K_GRID_FILE) as image:
        # conf/eval.yaml's k_grid_min_tile (96) enlarges the 32 px tiles 3x.
        assert image.size == k_grid_size(rows=5, counts=3, side=3 * RESOLUTION)
    with Image.open(tmp_path / "several" / PER_K_PLOT_FILE) as image:
        assert image.size == (2 * 360, 320)  # PSNR and SSIM: no rFID or LPIPS measured
    assert sorted(several["tokens"]) == ["1", "2", "4"] and several["num_images"] == NUM_IMAGES
    # Each count is its own measurement: decoding 1, 2 or 4 tokens gives different reconstructions.
    for metric in ("psnr", "ssim"):
        values = [several["tokens"][k][metric] for k in ("1", "2", "4")]
        assert len(set(values)) == 3, (metric, values)

    one = _evaluate(flextok_dir, image_folder, tmp_path / "one", "tokens=[4]")
    plain = _evaluate(flextok_dir, image_folder, tmp_path / "plain")
    for run in ("one", "plain"):
        assert (tmp_path / run / "grid.png").is_file()
        assert not (tmp_path / run / PER_K_PLOT_FILE).exists() and not (tmp_path / run / K_GRID_FILE).exists()
    # The plots add nothing to metrics.json, and the full-length numbers do not move.
    assert several.keys() == one.keys() == plain.keys() | {"tokens"}
    for key in ("psnr", "ssim", "codebook_usage", "num_images"):
        assert several[key] == one[key] == plain[key], key
    assert one["tokens"]["4"]["psnr"] == plain["psnr"]
