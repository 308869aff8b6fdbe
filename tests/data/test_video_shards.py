"""`data/make_video_shards.py` and the demo video set."""

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from tokenizers_vis.data import build_demo_video_shards, ensure_demo_video_shards, make_video_eval_loader
from tokenizers_vis.data.video import decode_clip, frame_entries, probe_video

sys.path.insert(0, str(Path(__file__).resolve().parent))
from video_testing import frame_numbers, pattern_mp4, write_mp4  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "data" / "make_video_shards.py"


def load_script():
    spec = importlib.util.spec_from_file_location("make_video_shards", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_samples(pattern: str) -> list[dict]:
    return list(wds.WebDataset(pattern, shardshuffle=False))


def video_folder(root: Path) -> Path:
    for i in range(3):
        write_mp4(root / f"clip.{i}.mp4", num_frames=30, fps=30.0, height=24, width=32, step=8)
    (root / "clip.0.txt").write_text("moving bar\n")
    (root / "broken.mp4").write_bytes(pattern_mp4(num_frames=30)[:500])  # truncated
    return root


def test_folder_to_shards_keeps_bytes_skips_and_names_corrupt(tmp_path, capsys):
    src = video_folder(tmp_path / "src")
    out = tmp_path / "out"
    assert load_script().main([str(src), str(out), "--shard-size", "2", "--workers", "1", "--no-shuffle"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == f"{out}/train-{{000000..000001}}.tar"
    assert "skipped 1 unreadable" in captured.err and "broken.mp4" in captured.err
    samples = read_samples(f"{out}/train-{{000000..000001}}.tar")
    assert [s["__key__"] for s in samples] == ["clip_0", "clip_1", "clip_2"]  # dots replaced
    assert samples[0]["mp4"] == (src / "clip.0.mp4").read_bytes()  # stored byte for byte
    assert samples[0]["txt"] == b"moving bar" and "txt" not in samples[1]
    assert json.loads(samples[0]["json"])["fps"] == 30.0 and json.loads(samples[0]["json"])["frames"] == 30
    keys = [k for b in make_video_eval_loader(str(out), 16, 4, frames=4, fps=10.0) for k in b["key"]]
    assert keys == ["clip_0", "clip_1", "clip_2"]


def test_reencode_and_frame_sequences_resample_resize_and_trim(tmp_path, capsys):
    src = video_folder(tmp_path / "src")
    script = load_script()
    assert script.main([str(src), str(tmp_path / "mp4"), "--reencode", "--fps", "10", "--size", "16",
                        "--frames", "5", "--crf", "0", "--workers", "1", "--no-shuffle"]) == 0
    sample = read_samples(str(tmp_path / "mp4" / "train-000000.tar"))[0]
    assert probe_video(sample["mp4"]) == (10.0, 5)
    clip = decode_clip(sample["mp4"], 5, None)
    assert clip.shape == (5, 3, 16, 22)  # short side 16, even width
    assert frame_numbers(clip, step=8) == [0, 3, 6, 9, 12]  # every third frame of the 30 fps source
    assert script.main([str(src), str(tmp_path / "frames"), "--format", "frames", "--fps", "15", "--frames", "4",
                        "--workers", "1", "--no-shuffle"]) == 0
    sample = read_samples(str(tmp_path / "frames" / "train-000000.tar"))[0]
    assert frame_entries(sample) == [f"f{i:05d}.png" for i in range(4)]
    assert json.loads(sample["json"])["fps"] == 15.0
    batch = next(iter(make_video_eval_loader(str(tmp_path / "frames"), 16, 3, frames=2, fps=5.0)))
    assert batch["video"].shape == (3, 2, 3, 16, 16)
    assert "--fps change the video" in _error(script, [str(src), str(tmp_path / "x"), "--fps", "8"], capsys)


def _error(script, argv, capsys) -> str:
    try:
        script.main(argv)
    except SystemExit:
        return capsys.readouterr().err
    raise AssertionError("expected a usage error")


def test_demo_video_set_is_real_mp4_with_known_motion(tmp_path):
    info = build_demo_video_shards(tmp_path, num_train=3, num_val=2, size=32, num_frames=12, fps=12.0, shard_size=2)
    assert info["train_pattern"] == f"{tmp_path}/train-{{000000..000001}}.tar" and len(info["val"]) == 1
    samples = read_samples(info["train_pattern"])
    assert len(samples) == 3
    for sample in samples:
        meta = json.loads(sample["json"])
        assert probe_video(sample["mp4"]) == (12.0, 12)
        assert meta["motion"] in ("pan", "zoom_in", "zoom_out") and sample["txt"].decode().startswith("a camera")
        clip = decode_clip(sample["mp4"], 12, None).float()
        assert clip.shape == (12, 3, 32, 32)
        # The camera moves: every frame differs from the one before, the last most from the first.
        steps = (clip[1:] - clip[:-1]).abs().mean(dim=(1, 2, 3))
        assert steps.min() > 0.5 and (clip[-1] - clip[0]).abs().mean() > steps.max()
    again = ensure_demo_video_shards(tmp_path, num_train=3, num_val=2, size=32, num_frames=12, fps=12.0, shard_size=2)
    assert again["train"] == info["train"]
    batch = next(iter(make_video_eval_loader(info["val_pattern"], 16, 2, frames=4, fps=4.0)))
    assert batch["video"].shape == (2, 4, 3, 16, 16) and batch["text"][0].startswith("a camera")
    assert torch.isfinite(batch["video"]).all() and np.isclose(float(batch["video"].max()), 1.0, atol=0.5)


def test_data_throughput_benchmark_measures_video_clips(tmp_path):
    from tokenizers_vis.data import write_shards

    write_shards(({"__key__": f"v{i}", "mp4": pattern_mp4(num_frames=20, fps=20.0)} for i in range(6)),
                 tmp_path / "shards", "train", 3)
    benchmarks = str(Path(__file__).resolve().parents[2] / "benchmarks")
    sys.path.insert(0, benchmarks)
    threads = torch.get_num_threads()
    try:
        script = importlib.import_module("data_throughput")
        out = tmp_path / "video.json"
        script.main(["--video", "--shards", str(tmp_path / "shards"), "--frames", "4", "--fps", "10", "--resolution",
                     "16", "--batch", "2", "--workers", "0", "--batches", "2", "--warmup", "1", "--shuffle-buffer",
                     "2", "--json", str(out)])
    finally:
        sys.path.remove(benchmarks)
        torch.set_num_threads(threads)
    payload = json.loads(out.read_text())
    assert payload["video"] is True and payload["frames"] == 4
    row = payload["results"][0]
    assert row["clips_per_sec"] > 0 and row["frames_per_sec"] == pytest.approx(4 * row["clips_per_sec"], rel=0.01)
