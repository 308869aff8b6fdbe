"""`python -m tokenizers_vis.export`: exact round trips for every model type, EMA vs raw weights,
a real training run loaded in a fresh process, and the error cases."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import compose_train

from tokenizers_vis import build_tokenizer, load_tokenizer
from tokenizers_vis.export import export_checkpoint, main
from tokenizers_vis.hub import CheckpointError, checkpoint_state
from tokenizers_vis.models.base import _REGISTRY


def _outputs(tokenizer, x):
    """Everything a caller sees: ids, latents and the reconstruction (seeded for sampling decoders)."""
    with torch.no_grad():
        encoded = tokenizer.encode(x)
        torch.manual_seed(0)
        return encoded.ids, encoded.latents, tokenizer.reconstruct(x)


def _assert_same_outputs(a, b, x):
    for left, right in zip(_outputs(a, x), _outputs(b, x)):
        assert (left is None) == (right is None)
        if left is not None:
            assert torch.equal(left, right)


def _images(tokenizer, n=2):
    return torch.rand(n, 3, tokenizer.image_size, tokenizer.image_size)


def test_every_registered_model_type_has_a_tiny_config(tiny_configs):
    covered = {config["model_type"] for config in tiny_configs.values()}
    missing = sorted(set(_REGISTRY) - covered)
    assert not missing, f"add a tiny config for {missing} to TINY_CONFIGS in tests/export/conftest.py"


def test_round_trip_is_exact_and_uses_the_ema_weights(tiny_config, checkpoint_writer, tmp_path):
    ckpt = checkpoint_writer(tmp_path / "run" / "checkpoints" / "last.ckpt", tiny_config)
    exported = export_checkpoint(ckpt, tmp_path / "out")
    assert exported.weights == "EMA" and exported.step == 7
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "model.safetensors"]

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == tiny_config["model_type"]
    assert config["_weights"] == "ema" and config["_step"] == 7
    rebuilt = build_tokenizer({k: v for k, v in config.items() if not k.startswith("_")})
    assert rebuilt.config == load_tokenizer(ckpt).config

    loaded, reference = load_tokenizer(tmp_path / "out"), load_tokenizer(ckpt)
    assert not loaded.training
    ema = checkpoint_state(torch.load(ckpt, weights_only=False), use_ema=True)
    assert ema.keys() == loaded.state_dict().keys()
    assert all(torch.equal(value, ema[name]) for name, value in loaded.state_dict().items())
    _assert_same_outputs(loaded, reference, _images(loaded))


def test_raw_weights_flag_exports_the_training_weights(tiny_checkpoint, tmp_path, capsys):
    assert main([str(tiny_checkpoint), str(tmp_path / "out"), "--raw-weights"]) == 0
    assert "raw weights" in capsys.readouterr().out
    checkpoint = torch.load(tiny_checkpoint, weights_only=False)
    raw, ema = checkpoint_state(checkpoint, use_ema=False), checkpoint_state(checkpoint, use_ema=True)
    loaded = load_tokenizer(tmp_path / "out")
    assert all(torch.equal(value, raw[name]) for name, value in loaded.state_dict().items())
    assert any(not torch.equal(value, ema[name]) for name, value in loaded.state_dict().items())
    _assert_same_outputs(loaded, load_tokenizer(tiny_checkpoint, use_ema=False), _images(loaded))
    assert "| weights | raw |" in (tmp_path / "out" / "README.md").read_text()


def test_a_run_without_ema_exports_its_raw_weights_and_says_so(tiny_configs, checkpoint_writer, tmp_path):
    ckpt = checkpoint_writer(tmp_path / "last.ckpt", tiny_configs["titok_vq"], ema=False)
    assert export_checkpoint(ckpt, tmp_path / "out").weights == "raw"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["_weights"] == "raw"


def test_card_has_the_run_information_metrics_and_grid(tiny_checkpoint, tmp_path):
    run = tiny_checkpoint.parents[1]
    (run / "config.yaml").write_text(yaml.safe_dump({
        "name": "titok_tiny",
        "data": {"_target_": "tokenizers_vis.data.ImageDataModule", "train_shards": "/d/imagenet/train-{0..9}.tar",
                 "resolution": 32, "batch_size": 4},
        "model": {"ema_decay": 0.999, "optimizer": {"_target_": "torch.optim.AdamW", "lr": 0.0001}},
        "trainer": {"devices": 8, "precision": "bf16-mixed"}}))
    (run / "summary.json").write_text(json.dumps({"name": "titok_tiny", "steps": 7,
                                                  "val_after": {"val/psnr": 21.5, "val/ssim": 0.61}}))
    (run / "reconstructions").mkdir()
    for step in (5, 7):
        (run / "reconstructions" / f"step_{step:07d}.png").write_bytes(f"png {step}".encode())
    (run / "eval_imagenet").mkdir()
    (run / "eval_imagenet" / "metrics.json").write_text(json.dumps({
        "rfid": 1.7043, "psnr": 19.25, "ssim": 0.5012, "lpips": None, "codebook_usage": 0.875,
        "codebook_entropy": 5.91, "num_images": 50000, "tokenizer": str(tiny_checkpoint), "data": "imagenet",
        "resolution": 32}))

    export_checkpoint(run, tmp_path / "out", repo_id="acme/titok-tiny")
    card = (tmp_path / "out" / "README.md").read_text()
    assert (tmp_path / "out" / "reconstructions.png").read_bytes() == b"png 7"
    for text in ("# titok-tiny", "| variant | `titok_tiny` |", "| tokens per image | 8 |", "64 codes x 8",
                 "| steps | 7 |", "ImageDataModule: imagenet/train-{0..9}.tar, 32 px", "| devices | 8 |",
                 "AdamW (lr 0.0001)", "| EMA decay | 0.999 |", "rFID", "| 1.70 | 19.25 | 0.5012 | 87.5% | 5.91 |",
                 "| 21.50 | 0.6100 |", "![reconstructions](reconstructions.png)", "at step 7",
                 'load_tokenizer("acme/titok-tiny")'):
        assert text in card, text
    assert "LPIPS" not in card  # null in metrics.json: no column


def test_cli_run_folder_export_loads_in_a_fresh_process(tmp_path_factory, tmp_path):
    """The issue's "done when": a real training run (tiny demo recipe), exported by the CLI, loads in
    a new Python process with only tokenizers_vis imported, identical to the checkpoint's EMA model,
    and its card shows the run's metrics."""
    from tokenizers_vis.data import ensure_demo_shards
    from tokenizers_vis.training.run import run_training

    data_dir = tmp_path_factory.mktemp("data")
    ensure_demo_shards(data_dir / "demo", num_train=64, num_val=16, shard_size=32)
    run = tmp_path / "run"
    run_training(compose_train(["experiment=demo", "debug=smoke", "validate_before_fit=false"], run,
                               data_dir=data_dir))
    ckpt = run / "checkpoints" / "last.ckpt"
    (run / "metrics.json").write_text(json.dumps({"rfid": 123.4, "psnr": 9.87, "ssim": 0.1, "num_images": 16,
                                                  "tokenizer": str(ckpt), "data": "demo", "resolution": 64}))

    out = tmp_path / "export"
    result = subprocess.run([sys.executable, "-m", "tokenizers_vis.export", str(ckpt), str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "EMA weights of a titok tokenizer" in result.stdout
    card = (out / "README.md").read_text()
    assert "| variant | `demo` |" in card and "| steps | 3 |" in card
    assert "| 123.40 | 9.87 |" in card and "## Validation at the end of training" in card
    assert (out / "reconstructions.png").is_file()

    reference = load_tokenizer(ckpt)
    x = _images(reference)
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch, tokenizers_vis\n"
              "tok = tokenizers_vis.load_tokenizer(sys.argv[1])\n"
              "x = torch.load(sys.argv[2])\n"
              "with torch.no_grad():\n"
              "    enc = tok.encode(x)\n"
              "    torch.save({'ids': enc.ids, 'rec': tok.decode(enc)}, sys.argv[3])\n"
              "assert 'lightning' not in sys.modules and 'hydra' not in sys.modules, 'heavy imports'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = torch.load(tmp_path / "y.pt")
    with torch.no_grad():
        encoded = reference.encode(x)
        assert torch.equal(fresh["ids"], encoded.ids)
        assert torch.equal(fresh["rec"], reference.decode(encoded))


# -- errors ---------------------------------------------------------------------------------------

def test_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        export_checkpoint(tmp_path / "nope.ckpt", tmp_path / "out")
    assert main([str(tmp_path / "nope.ckpt"), str(tmp_path / "out")]) == 1
    assert "error: no checkpoint file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="without checkpoints/last.ckpt"):
        export_checkpoint(tmp_path, tmp_path / "out")


def test_files_that_are_not_checkpoints_of_this_framework(tmp_path, capsys):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a tokenizers_vis training checkpoint"):
        export_checkpoint(text, tmp_path / "out")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.weight": torch.zeros(2)}, "global_step": 3}, other)
    with pytest.raises(CheckpointError, match="no 'tokenizer_config' entry"):
        export_checkpoint(other, tmp_path / "out")
    assert main([str(other), str(tmp_path / "out")]) == 1
    assert "not a tokenizers_vis training checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_the_model_code(tiny_checkpoint, tmp_path):
    checkpoint = torch.load(tiny_checkpoint, weights_only=False)
    checkpoint["tokenizer_config"]["decoder_width"] = 48
    torch.save(checkpoint, tiny_checkpoint)
    with pytest.raises(CheckpointError, match="do not fit the current `titok` model code"):
        export_checkpoint(tiny_checkpoint, tmp_path / "out")


def test_out_dir_with_other_files_is_refused(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    export_checkpoint(tiny_checkpoint, out)
    export_checkpoint(tiny_checkpoint, out)  # re-exporting over an earlier export is fine
    (out / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="notes.txt"):
        export_checkpoint(tiny_checkpoint, out)


def test_hub_id_offline_is_a_clear_error():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(OSError, match="could not download 'acme/no-such-tokenizer'.*--local-dir"):
        load_tokenizer("acme/no-such-tokenizer")


def test_unreadable_run_files_are_skipped_with_a_warning(tiny_checkpoint, tmp_path):
    run = tiny_checkpoint.parents[1]
    (run / "config.yaml").write_text("data: {a: [\n")
    (run / "metrics.json").write_text("{not json")
    with pytest.warns(UserWarning, match="skipping unreadable"):
        export_checkpoint(tiny_checkpoint, tmp_path / "out")
    assert "## Evaluation" not in (tmp_path / "out" / "README.md").read_text()


def test_metrics_option_adds_a_metrics_file_from_elsewhere(tiny_checkpoint, tmp_path, capsys):
    metrics = tmp_path / "elsewhere" / "metrics.json"
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"rfid": 3.21, "psnr": 18.0, "num_images": 100, "data": "/x/coco/val-*.tar",
                                   "resolution": 32}))
    assert main([str(tiny_checkpoint), str(tmp_path / "missing"), "--metrics", str(tmp_path / "nope.json")]) == 1
    assert "no metrics file" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()
    assert main([str(tiny_checkpoint), str(tmp_path / "out"), "--metrics", str(metrics)]) == 0
    assert "| coco/val-*.tar | 32 | 100 | – | 3.21 | 18.00 |" in (tmp_path / "out" / "README.md").read_text()


def test_a_video_tokenizer_exports_its_reconstruction_video_and_says_so(tiny_configs, checkpoint_writer, tmp_path):
    run = tmp_path / "run"
    checkpoint_writer(run / "checkpoints" / "last.ckpt", tiny_configs["divot"])
    (run / "reconstructions").mkdir()
    for step in (5, 7):
        (run / "reconstructions" / f"step_{step:07d}.png").write_bytes(f"png {step}".encode())
        (run / "reconstructions" / f"step_{step:07d}.mp4").write_bytes(f"mp4 {step}".encode())
    export_checkpoint(run, tmp_path / "out")
    assert (tmp_path / "out" / "reconstructions.mp4").read_bytes() == b"mp4 7"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "video-tokenizer" in card and "image-tokenizer" not in card
    assert "a clip of 1 frames of 32 x 32" in card and "torch.rand(4, 1, 3, 32, 32)" in card
    assert "[`reconstructions.mp4`](reconstructions.mp4)" in card
    # An image tokenizer's export carries no video, even when its run folder holds one.
    image_run = tmp_path / "image_run"
    checkpoint_writer(image_run / "checkpoints" / "last.ckpt", tiny_configs["titok_vq"])
    (image_run / "reconstructions").mkdir()
    (image_run / "reconstructions" / "step_0000007.mp4").write_bytes(b"mp4")
    export_checkpoint(image_run, tmp_path / "image_out")
    assert not (tmp_path / "image_out" / "reconstructions.mp4").exists()
    assert "image-tokenizer" in (tmp_path / "image_out" / "README.md").read_text()
