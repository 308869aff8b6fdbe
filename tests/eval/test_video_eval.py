"""Evaluation on video: an image tokenizer frame by frame, metrics.json with per-video lists and
rFVD (tiny TorchScript I3D), the mp4 grid and the frame strip; the command on a folder of videos."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from eval_testing import CONF_DIR, REPO_ROOT, RESOLUTION, IdentityTokenizer, compose_eval

from tokenizers_vis import load_tokenizer
from tokenizers_vis.data import make_video_eval_loader
from tokenizers_vis.data.video import decode_clip, probe_video
from tokenizers_vis.metrics import ReconstructionMetrics, VideoReconstructionMetrics
from tokenizers_vis.video_evaluation import (
    evaluate_video_reconstruction,
    is_video_config,
    reconstruct_clips,
    run_video_evaluation,
    video_clip_settings,
)

sys.path.insert(0, str(REPO_ROOT / "tests" / "data"))
sys.path.insert(0, str(REPO_ROOT / "tests" / "metrics"))
from fvd_testing import save_tiny_i3d  # noqa: E402
from video_testing import write_mp4  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")
NUM_VIDEOS = 5
FRAMES = 9  # the fewest the I3D takes


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    for i in range(NUM_VIDEOS):
        write_mp4(root / f"v{i}.mp4", num_frames=12, fps=12.0, height=36 + 4 * i, width=40)
    return root


def test_image_tokenizer_runs_frame_by_frame(tiny_tokenizer_dir):
    tokenizer = load_tokenizer(str(tiny_tokenizer_dir)).eval()
    video = torch.rand(2, 3, 3, RESOLUTION, RESOLUTION)
    with torch.no_grad():
        recon, ids = reconstruct_clips(tokenizer, video)
        per_frame = torch.stack([tokenizer.decode(tokenizer.encode(video[:, t])) for t in range(3)], dim=1)
    assert recon.shape == video.shape and ids.shape[0] == 6
    assert torch.allclose(recon, per_frame, atol=1e-5)


def test_identity_reconstruction_has_no_error_and_writes_grid_and_strip(video_folder, tmp_path):
    loader = make_video_eval_loader(video_folder, RESOLUTION, 2, frames=4, fps=None)
    metrics = VideoReconstructionMetrics(ReconstructionMetrics(None, fid=False, lpips=False))
    mp4, png = tmp_path / "grid.mp4", tmp_path / "frames.png"
    result = evaluate_video_reconstruction(IdentityTokenizer(), loader, metrics, grid_path=mp4, strip_path=png,
                                           grid_videos=3, grid_fps=6.0, progress=False)
    assert result["num_videos"] == NUM_VIDEOS and result["num_images"] == 4 * NUM_VIDEOS
    assert result["temporal_error"] == 0.0 and result["psnr"] == float("inf")
    assert result["per_video"]["key"] == [f"v{i}" for i in range(NUM_VIDEOS)]
    # grid.mp4: 4 frames at 6 fps showing 3 clips (originals over reconstructions, 2 px padding).
    assert probe_video(mp4.read_bytes()) == (6.0, 4)
    frame = decode_clip(mp4.read_bytes(), 4, None)
    assert frame.shape[-2:] == (2 * RESOLUTION + 3 * 2, 3 * RESOLUTION + 4 * 2)
    with Image.open(png) as strip:  # two rows per clip, one column per frame
        assert strip.size == (4 * RESOLUTION + 5 * 2, 6 * RESOLUTION + 7 * 2)


def test_video_settings_come_from_config_preset_or_the_data(video_folder, tmp_path):
    folder = compose_eval(["tokenizer=x", f"data_source={video_folder}"], tmp_path)
    assert is_video_config(folder, CONF_DIR) and video_clip_settings(folder, CONF_DIR) == (16, None)
    preset = compose_eval(["tokenizer=x", "data_source=demo_video"], tmp_path)
    assert is_video_config(preset, CONF_DIR) and video_clip_settings(preset, CONF_DIR) == (16, 8.0)
    override = compose_eval(["tokenizer=x", "data_source=demo_video", "frames=12", "fps=4"], tmp_path)
    assert video_clip_settings(override, CONF_DIR) == (12, 4.0)
    assert not is_video_config(compose_eval(["tokenizer=x", "data_source=demo"], tmp_path), CONF_DIR)


def test_run_video_evaluation_writes_metrics_grid_and_strip(video_folder, tiny_tokenizer_dir, tmp_path,
                                                            empty_torch_home):
    i3d = save_tiny_i3d(tmp_path / "i3d")
    out = tmp_path / "out"
    cfg = compose_eval([f"tokenizer={tiny_tokenizer_dir}", f"data_source={video_folder}", f"frames={FRAMES}",
                        "fps=12", f"i3d_weights={i3d}", "batch_size=2", "grid_videos=2"], out)
    record = run_video_evaluation(cfg, conf_dir=CONF_DIR)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["num_videos"] == NUM_VIDEOS and saved["num_images"] == NUM_VIDEOS * FRAMES
    assert saved["frames"] == FRAMES and saved["fps"] == 12.0 and saved["input"] == "frame by frame"
    assert saved["rfvd"] > 0 and 0 < saved["temporal_error"] < 1 and 0 < saved["psnr"] < 60
    assert saved["rfid"] is None and "rfid" in saved["notes"] and saved["lpips"] is None  # no weights here
    lists = saved["per_video"]
    assert lists["key"] == [f"v{i}" for i in range(NUM_VIDEOS)]
    assert all(len(lists[k]) == NUM_VIDEOS for k in ("psnr", "ssim", "lpips", "temporal_error"))
    assert saved["psnr"] == pytest.approx(sum(lists["psnr"]) / NUM_VIDEOS)
    assert saved["codebook_usage"] is not None
    assert probe_video((out / "grid.mp4").read_bytes()) == (12.0, FRAMES)  # decodes back, every frame
    assert (out / "frames.png").is_file()


def test_missing_i3d_weights_give_null_rfvd_with_a_note(video_folder, tiny_tokenizer_dir, tmp_path,
                                                        empty_torch_home):
    out = tmp_path / "out"
    cfg = compose_eval([f"tokenizer={tiny_tokenizer_dir}", f"data_source={video_folder}", f"frames={FRAMES}",
                        "fps=12"], out)
    record = run_video_evaluation(cfg, conf_dir=CONF_DIR)
    assert record["rfvd"] is None and "i3d_torchscript.pt" in record["notes"]["rfvd"]
    assert record["psnr"] > 0
    strict = compose_eval([f"tokenizer={tiny_tokenizer_dir}", f"data_source={video_folder}", f"frames={FRAMES}",
                           "strict_fvd=true"], out)
    with pytest.raises(FileNotFoundError, match="i3d_weights=PATH"):
        run_video_evaluation(strict, conf_dir=CONF_DIR)


@pytest.mark.slow
def test_command_builds_the_demo_video_set_and_evaluates_frame_by_frame(tiny_tokenizer_dir, tmp_path):
    """The README command, on a fresh data folder: builds the demo videos, evaluates, writes the files."""
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "eval/reconstruct.py", f"tokenizer={tiny_tokenizer_dir}", "data=demo_video", "frames=16",
         f"resolution={RESOLUTION}", f"paths.data_dir={tmp_path / 'data'}", f"output_dir={out}", "num_workers=0",
         "progress=false"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["num_videos"] == 16 and record["frames"] == 16 and record["fps"] == 8.0
    assert probe_video((out / "grid.mp4").read_bytes()).num_frames == 16 and (out / "frames.png").is_file()


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_two_processes_see_each_video_once_and_match_one(video_folder, tiny_tokenizer_dir, tmp_path,
                                                         empty_torch_home):
    import torch.multiprocessing as mp
    from video_eval_testing import video_worker

    i3d = save_tiny_i3d(tmp_path / "i3d")
    overrides = [f"tokenizer={tiny_tokenizer_dir}", f"data_source={video_folder}", f"frames={FRAMES}", "fps=12",
                 f"i3d_weights={i3d}", "batch_size=2", "lpips=false"]
    sharded = compose_eval(overrides, tmp_path / "sharded")
    start = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(video_worker, args=(2, str(tmp_path / "pg"), str(tmp_path), sharded, str(CONF_DIR)),
                       nprocs=2, start_method=start)
    single = run_video_evaluation(compose_eval(overrides, tmp_path / "single"), conf_dir=CONF_DIR)
    on_disk = json.loads((tmp_path / "sharded" / "metrics.json").read_text())
    assert on_disk["world_size"] == 2 and on_disk["num_videos"] == NUM_VIDEOS
    # Rank 0 had videos 0, 2, 4 and rank 1 videos 1, 3: the lists are back in the data order.
    assert on_disk["per_video"]["key"] == single["per_video"]["key"] == [f"v{i}" for i in range(NUM_VIDEOS)]
    for name in ("psnr", "ssim", "temporal_error"):
        assert on_disk["per_video"][name] == pytest.approx(single["per_video"][name], rel=1e-6), name
    for key in ("psnr", "ssim", "temporal_error", "rfvd", "codebook_usage", "num_images"):
        assert on_disk[key] == pytest.approx(single[key], rel=1e-6), key
    for rank in range(2):
        record = torch.load(tmp_path / f"video_rank{rank}.pt", weights_only=False)
        assert record["per_video"] == on_disk["per_video"]  # every rank returns the whole record
