"""`eval/compare.py`: several tokenizers on the same images, each measured exactly as the evaluator
measures it alone; bits per image from the Tokenizer attributes; the plot, grid and leaderboard
files; the per-model cache; bad entries refused before anything runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_testing import CONF_DIR, NUM_IMAGES, REPO_ROOT, RESOLUTION, TINY_TITOK, FeatureNet, compose_eval
from PIL import Image

import tokenizers_vis.comparison as comparison
from tokenizers_vis import load_tokenizer, save_pretrained
from tokenizers_vis.comparison import (
    COMPARE_GRID_FILE,
    GRID_LABEL_HEIGHT,
    GRID_PADDING,
    LEADERBOARD_FILES,
    RATE_DISTORTION_FILE,
    EntryError,
    bits_per_image,
    grid_layout,
    parse_entries,
    rd_layout,
    run_comparison,
    write_compare_grid,
)
from tokenizers_vis.data import make_eval_loader
from tokenizers_vis.evaluation import evaluate_reconstruction, metrics_factory, run_evaluation
from tokenizers_vis.metrics import ReconstructionMetrics
from tokenizers_vis.models import FlexTok, TiTok, TokenFlow

# Tiny models on 8 x 8 patches: too narrow for clean decodes, which these tests do not need.
pytestmark = pytest.mark.filterwarnings("ignore:FlexTok patches hold")

TINY_FLEXTOK = dict(image_size=RESOLUTION, vae=None, patch_size=8, num_registers=4, encoder_width=32,
                    encoder_depth=1, encoder_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2,
                    sample_steps=2, guidance_scale=1.0)  # FSQ levels: the default (8, 8, 8, 5, 5, 5)
TINY_CLIP = {"kind": "openai_clip", "pretrained": None, "seed": 3,
             "config": {"image_size": RESOLUTION, "patch_size": 8, "width": 32, "layers": 1, "heads": 2,
                        "output_dim": 24}}
TINY_TOKENFLOW = dict(image_size=RESOLUTION, semantic_encoder=TINY_CLIP, semantic_decoder_width=32,
                      semantic_decoder_depth=1, semantic_decoder_heads=2, semantic_out_dim=24, pixel_channels=32,
                      pixel_channel_mult=(1, 1, 1, 1), pixel_num_res_blocks=1, z_channels=32, codebook_size=64,
                      scales=(1, 2, 4), drop_scale_prob=0.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    """One saved tiny model per kind of rate: VQ, continuous (VAE), FSQ variable-length, multi-scale."""
    root = tmp_path_factory.mktemp("compare_models")
    torch.manual_seed(1)
    vae = save_pretrained(TiTok(**{**TINY_TITOK, "quantizer": "vae"}).eval(), root / "titok_vae")
    torch.manual_seed(0)
    flextok = FlexTok(**TINY_FLEXTOK).eval()
    with torch.no_grad():  # adaLN-zero starts as the identity: random values make k and steps matter
        for name, p in flextok.named_parameters():
            if "modulation" in name or "head.proj" in name:
                p.normal_(0, 0.2)
    flextok = save_pretrained(flextok, root / "flextok")
    torch.manual_seed(0)
    tokenflow = save_pretrained(TokenFlow(**TINY_TOKENFLOW).eval(), root / "tokenflow")
    return {"vq": tiny_tokenizer_dir, "vae": vae, "flextok": flextok, "tokenflow": tokenflow}


def compose_compare(overrides: list[str], output_dir: Path, cache_dir: Path):
    from hydra import compose, initialize_config_dir

    base = [f"output_dir={output_dir}", f"cache_dir={cache_dir}", f"paths.root_dir={REPO_ROOT}", "num_workers=0",
            "progress=false", f"resolution={RESOLUTION}", "batch_size=3"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="compare.yaml", overrides=base + list(overrides))


def feature_net_metrics(codebook_size):
    """FID with the small stand-in network (no Inception weights here), no LPIPS."""
    return metrics_factory(codebook_size, fid=FeatureNet(), lpips=False)


@pytest.fixture
def evaluations(monkeypatch) -> list[str]:
    """Counts the evaluator's runs: the label of the progress bar of each."""
    calls = []
    original = comparison.evaluate_reconstruction

    def counting(tokenizer, loader, *args, **kwargs):
        calls.append(loader.label)
        return original(tokenizer, loader, *args, **kwargs)

    monkeypatch.setattr(comparison, "evaluate_reconstruction", counting)
    return calls


def test_each_model_equals_its_own_evaluation(models, image_folder, tmp_path, evaluations):
    """Four families, FID by the stand-in network: every number equals evaluate_reconstruction of
    that model alone on the same loader, and the bits follow codebook_size and the token counts."""
    entries = [str(models["vq"]), str(models["vae"]), {"path": str(models["flextok"]), "label": "FlexTok"},
               str(models["tokenflow"])]
    cfg = compose_compare([f"data_source={image_folder}"], tmp_path / "out", tmp_path / "cache")
    cfg.tokenizers = entries
    record = run_comparison(cfg, conf_dir=CONF_DIR, metrics_builder=feature_net_metrics)
    assert evaluations == ["tiny", "titok_vae", "FlexTok", "tokenflow"]

    rows = {row["model"]: row for row in record["rows"]}
    assert list(rows) == ["tiny", "titok_vae", "FlexTok k=1", "FlexTok k=2", "FlexTok k=4", "tokenflow k=1",
                          "tokenflow k=5", "tokenflow k=21"]
    # Bits: K x log2(codebook); FSQ 8*8*8*5*5*5 = 64000 codes; multi-scale prefixes 1, 1+4, 1+4+16 ids.
    assert rows["tiny"]["bits_per_image"] == 8 * 6
    assert rows["titok_vae"]["bits_per_image"] == "continuous" and rows["titok_vae"]["codebook_size"] is None
    for k in (1, 2, 4):
        assert rows[f"FlexTok k={k}"]["codebook_size"] == 64000
        assert rows[f"FlexTok k={k}"]["bits_per_image"] == pytest.approx(k * math.log2(64000), abs=0.01)
    for k in (1, 5, 21):
        assert rows[f"tokenflow k={k}"]["bits_per_image"] == k * 6 and rows[f"tokenflow k={k}"]["tokens"] == k

    # The same numbers as the evaluator gives each model alone, on the same images.
    for label, directory, tokens in (("tiny", models["vq"], None), ("titok_vae", models["vae"], None),
                                     ("FlexTok", models["flextok"], [1, 2, 4]),
                                     ("tokenflow", models["tokenflow"], [1, 5, 21])):
        tokenizer = load_tokenizer(directory)
        factory, _ = feature_net_metrics(tokenizer.codebook_size)
        alone = evaluate_reconstruction(tokenizer, make_eval_loader(image_folder, RESOLUTION, batch_size=3), factory,
                                        tokens=tokens, progress=False)
        for k in tokens or [tokenizer.num_tokens]:
            row = rows[label if tokens is None else f"{label} k={k}"]
            expected = alone if tokens is None else alone["tokens"][k]
            for key in ("rfid", "psnr", "ssim", "codebook_usage", "codebook_entropy", "num_images"):
                assert row[key] == expected[key] or row[key] is expected[key] is None, (label, k, key)
        written = json.loads((tmp_path / "out" / "models" / label / "metrics.json").read_text())
        assert written["psnr"] == alone["psnr"] and written["rfid"] == pytest.approx(alone["rfid"], rel=1e-12)
    assert rows["tiny"]["rfid"] > 0 and rows["tiny"]["params_encoder"] > 0 and rows["tiny"]["params_decoder"] > 0

    # Every model saw the same pixels; the parameters split by what encode and decode read.
    assert record["meta"]["num_images"] == NUM_IMAGES and len(record["meta"]["images_sha256"]) == 64
    tokenflow = load_tokenizer(models["tokenflow"])
    unused = sum(p.numel() for n, p in tokenflow.named_parameters() if n.startswith("semantic_decoder."))
    assert rows["tokenflow k=1"]["params_decoder"] <= rows["tokenflow k=1"]["params_total"] - unused

    # The files: a panel per measured metric (rFID, PSNR, SSIM; no LPIPS), a legend row per 4 models.
    for name in LEADERBOARD_FILES:
        assert (tmp_path / "out" / name).is_file()
    with Image.open(tmp_path / "out" / RATE_DISTORTION_FILE) as image:
        assert image.size == rd_layout(num_panels=3, num_models=4) == (3 * 400, 340 + 25)
        pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 64 and pixels.max() > 250
    # The grid: 6 images, each followed by its zoom row; 32 px tiles enlarged 4x to 128.
    with Image.open(tmp_path / "out" / COMPARE_GRID_FILE) as image:
        assert image.size == grid_layout(6, 4, RESOLUTION, min_tile=128, zoom=4)
        assert image.size == (5 * 128 + 6 * GRID_PADDING, GRID_LABEL_HEIGHT + 12 * 128 + 13 * GRID_PADDING)
        grid = np.asarray(image.convert("RGB"))
    first = next(iter(make_eval_loader(image_folder, RESOLUTION, batch_size=1)))["image"][0]
    expected = (first * 255).round().byte().permute(1, 2, 0).numpy().repeat(4, 0).repeat(4, 1)
    top, left = GRID_LABEL_HEIGHT + GRID_PADDING, GRID_PADDING
    tile = grid[top:top + 128, left:left + 128]
    box = np.zeros((128, 128), dtype=bool)  # the red box marking the zoomed centre
    box[48:80, 48:80] = True
    box[49:79, 49:79] = False
    assert np.array_equal(tile[~box], expected[~box])

    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "| FlexTok k=4 | flextok |" in md and "continuous" in md and "rfid" not in record["meta"]["notes"]
    # The trivial baseline under the table: the same for every model (the same images).
    flat = {row["psnr_flat_baseline"] for row in record["rows"]}
    assert len(flat) == 1 and f"mean colour): PSNR {flat.pop():.2f} dB" in md
    csv_rows = (tmp_path / "out" / "leaderboard.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 8 and csv_rows[0].startswith("model,family,tokenizer,params_encoder")


def test_metrics_json_equals_reconstruct(models, image_folder, tmp_path, empty_torch_home):
    """models/<label>/metrics.json is eval/reconstruct.py's metrics.json for that model, key for key."""
    cfg = compose_compare([f"data_source={image_folder}", "tokens=null"], tmp_path / "out", tmp_path / "cache")
    cfg.tokenizers = [str(models["vq"]), str(models["flextok"])]
    run_comparison(cfg, conf_dir=CONF_DIR)
    for label, directory in (("tiny", models["vq"]), ("flextok", models["flextok"])):
        alone = run_evaluation(compose_eval([f"tokenizer={directory}", f"data_source={image_folder}", "batch_size=3"],
                                            tmp_path / f"alone_{label}"), conf_dir=CONF_DIR)
        compared = json.loads((tmp_path / "out" / "models" / label / "metrics.json").read_text())
        assert compared.pop("seconds") >= 0 and alone.pop("seconds") >= 0
        assert compared == alone
        assert compared["rfid"] is None and "pt_inception" in compared["notes"]["rfid"]
        with Image.open(tmp_path / "out" / "models" / label / "grid.png") as a, \
                Image.open(tmp_path / f"alone_{label}" / "grid.png") as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_cached_model_is_not_evaluated_again(models, image_folder, tmp_path, evaluations):
    cache = tmp_path / "cache"
    vq = tmp_path / "vq"
    save_pretrained(load_tokenizer(models["vq"]), vq)

    def compare(entries, out, *extra):
        cfg = compose_compare([f"data_source={image_folder}", "fid=false", "lpips=false", *extra], tmp_path / out,
                              cache)
        cfg.tokenizers = entries
        return run_comparison(cfg, conf_dir=CONF_DIR)

    first = compare([str(vq)], "one")
    assert evaluations == ["vq"]
    second = compare([str(vq), {"path": str(models["flextok"]), "label": "flex", "tokens": [2, 4]}], "two")
    assert evaluations == ["vq", "flex"]  # only the new model ran
    assert second["rows"][0] == first["rows"][0]
    assert [row["model"] for row in second["rows"]] == ["vq", "flex k=2", "flex k=4"]
    assert (tmp_path / "two" / "models" / "vq" / "metrics.json").is_file()
    compare([str(vq), {"path": str(models["flextok"]), "label": "renamed", "tokens": [2, 4]}], "three")
    assert evaluations == ["vq", "flex"]  # a new label is the same model
    # What changes the numbers is a new cache entry: other decode settings, other images, new weights.
    compare([{"path": str(models["flextok"]), "label": "flex", "tokens": [2, 4], "steps": 1}], "four")
    compare([str(vq)], "five", "max_images=4")
    os.utime(vq / "model.safetensors", ns=(0, 0))
    compare([str(vq)], "six")
    assert evaluations == ["vq", "flex", "flex", "vq", "vq"]
    compare([str(vq)], "seven", "recompute=true")
    assert evaluations[-1] == "vq" and len(evaluations) == 6


def test_bad_entries_fail_before_any_model_runs(models, image_folder, tmp_path, evaluations):
    missing = tmp_path / "no_such_run" / "checkpoints" / "last.ckpt"
    cfg = compose_compare([f"data_source={image_folder}"], tmp_path / "out", tmp_path / "cache")
    cfg.tokenizers = [str(models["vq"]), {"path": str(missing), "label": "ghost"}]
    with pytest.raises(EntryError, match=r"tokenizers\[1\] \(ghost: .*no_such_run/checkpoints/last.ckpt\)"):
        run_comparison(cfg, conf_dir=CONF_DIR)
    assert evaluations == [] and not (tmp_path / "out").exists()

    with pytest.raises(EntryError, match=r"unknown keys \['step'\]"):
        parse_entries([{"path": str(models["vq"]), "step": 3}])
    with pytest.raises(EntryError, match="labels \\['a'\\] are given to more than one entry"):
        parse_entries([{"path": str(models["vq"]), "label": "a"}, {"path": str(models["vae"]), "label": "a"}])
    labels = [e.label for e in parse_entries([str(models["vq"]), str(models["vq"])])]
    assert labels == ["tiny", "tiny-2"]
    # Decode settings a model does not take, and token counts it cannot decode, name the entry too.
    cfg.tokenizers = [{"path": str(models["vq"]), "steps": 4}]
    with pytest.raises(EntryError, match=r"tokenizers\[0\] \(tiny: .*\): its TiTok decode takes no \['steps'\]"):
        run_comparison(cfg, conf_dir=CONF_DIR)
    cfg.tokenizers = [{"path": str(models["tokenflow"]), "tokens": [2]}]
    with pytest.raises(EntryError, match=r"tokenizers\[0\].*not a prefix of whole scales"):
        run_comparison(cfg, conf_dir=CONF_DIR)
    assert evaluations == []


def test_decode_settings_reach_the_decoder(models, image_folder, tmp_path):
    cfg = compose_compare([f"data_source={image_folder}", "fid=false", "lpips=false", "tokens=[4]"],
                          tmp_path / "out", tmp_path / "cache")
    cfg.tokenizers = [{"path": str(models["flextok"]), "label": "one_step", "steps": 1},
                      {"path": str(models["flextok"]), "label": "two_steps", "steps": 2}]
    rows = {row["model"]: row for row in run_comparison(cfg, conf_dir=CONF_DIR)["rows"]}
    # steps=2 is the saved default: the same as evaluating the model alone.
    tok = load_tokenizer(models["flextok"])
    alone = evaluate_reconstruction(tok, make_eval_loader(image_folder, RESOLUTION, batch_size=3),
                                    ReconstructionMetrics(tok.codebook_size, fid=False, lpips=False), progress=False)
    assert rows["two_steps"]["psnr"] == alone["psnr"]
    assert rows["one_step"]["psnr"] != rows["two_steps"]["psnr"]
    assert rows["one_step"]["decode"] == {"steps": 1}


def test_bits_per_image_and_grid_sizes(tmp_path):
    assert bits_per_image(32, 4096) == 384 and bits_per_image(256, 64000) == pytest.approx(256 * 15.9658, rel=1e-4)
    assert bits_per_image(128, None) is None
    torch.manual_seed(0)
    originals, recon = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    write_compare_grid(originals, {"a": recon, "b": originals}, tmp_path / "g.png", min_tile=100, zoom=1)
    with Image.open(tmp_path / "g.png") as image:  # 64 px -> 2x; no zoom rows
        assert image.size == grid_layout(3, 2, 64, min_tile=100, zoom=1) == (3 * 128 + 4 * 2, 18 + 3 * 128 + 4 * 2)
        grid = np.asarray(image.convert("RGB"))
    top = GRID_LABEL_HEIGHT + GRID_PADDING + 2 * (128 + GRID_PADDING)
    original, copy = (grid[top:top + 128, GRID_PADDING + c * 130:GRID_PADDING + c * 130 + 128] for c in (0, 2))
    assert np.array_equal(original, copy)
    expected = (originals[2] * 255).round().byte().permute(1, 2, 0).numpy().repeat(2, 0).repeat(2, 1)
    assert np.array_equal(original, expected)


def test_cli_runs_a_comparison(models, image_folder, tmp_path, empty_torch_home):
    entries = f"[{models['vq']},{{path:{models['flextok']},label:FlexTok,tokens:[1,4]}}]"
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    command = [sys.executable, str(REPO_ROOT / "eval" / "compare.py"), f"tokenizers={entries}", f"data={image_folder}",
               f"resolution={RESOLUTION}", f"hydra.run.dir={tmp_path}/run", f"cache_dir={tmp_path}/cache",
               "num_workers=0", "lpips=false"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    board = json.loads((tmp_path / "run" / "leaderboard.json").read_text())
    assert [row["model"] for row in board["rows"]] == ["tiny", "FlexTok k=1", "FlexTok k=4"]
    assert board["meta"]["data"] == str(image_folder) and board["meta"]["num_images"] == NUM_IMAGES
    assert "FlexTok" in (result.stdout + result.stderr)  # the per-model progress bar
    missing = subprocess.run(command[:2] + [f"tokenizers=[{models['vq']},{tmp_path}/nothing]"] + command[3:],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert f"tokenizers[1] (nothing: {tmp_path}/nothing)" in missing.stderr


def test_video_data_uses_the_video_evaluator(models, tmp_path, evaluations):
    """On video clips each model is measured by eval/reconstruct.py's video path (an image tokenizer
    frame by frame): the same metrics.json, the video metrics in the table, bits per clip."""
    from tokenizers_vis.data.video import encode_video
    from tokenizers_vis.video_evaluation import run_video_evaluation

    rng = np.random.default_rng(0)
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):  # smooth colour fields that drift from frame to frame
        base = rng.uniform(0, 255, size=(1, 4, 4, 3))
        frames = np.concatenate([np.clip(base + 12 * t, 0, 255) for t in range(6)]).astype(np.uint8)
        frames = frames.repeat(10, axis=1).repeat(12, axis=2)  # (6, 40, 48, 3)
        (videos / f"clip_{i}.mp4").write_bytes(encode_video(frames, 8.0, crf=0))
    cfg = compose_compare([f"data_source={videos}", "frames=4", "fid=false", "lpips=false"], tmp_path / "out",
                          tmp_path / "cache")
    cfg.tokenizers = [str(models["vq"]), str(models["vae"])]
    record = run_comparison(cfg, conf_dir=CONF_DIR)
    assert evaluations == []  # not the image loop
    rows = {row["model"]: row for row in record["rows"]}
    assert rows["tiny"]["tokens"] == 8 * 4 and rows["tiny"]["bits_per_image"] == 8 * 4 * 6  # 4 frames of 8 ids
    assert rows["titok_vae"]["bits_per_image"] == "continuous"
    assert record["meta"]["unit"] == "clip" and record["meta"]["num_videos"] == 3
    for label, directory in (("tiny", models["vq"]), ("titok_vae", models["vae"])):
        alone = run_video_evaluation(compose_eval([f"tokenizer={directory}", f"data_source={videos}", "frames=4",
                                                   "fid=false", "lpips=false", "batch_size=3"],
                                                  tmp_path / f"alone_{label}"), conf_dir=CONF_DIR)
        compared = json.loads((tmp_path / "out" / "models" / label / "metrics.json").read_text())
        assert compared.pop("seconds") >= 0 and alone.pop("seconds") >= 0
        assert compared == alone
        assert rows[label]["temporal_error"] == alone["temporal_error"] > 0
        assert rows[label]["psnr"] == alone["psnr"] and alone["num_videos"] == 3
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "bits / clip" in md and "temporal error" in md and "3 clips of 4 frames" in md
    with Image.open(tmp_path / "out" / RATE_DISTORTION_FILE) as image:  # PSNR, SSIM, temporal error
        assert image.size == rd_layout(num_panels=3, num_models=2)
    assert not (tmp_path / "out" / COMPARE_GRID_FILE).exists()
