"""Video decoding, clip sampling and the video loaders, on mp4 files written with PyAV here."""

import io
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizers_vis.data import (
    CorruptSampleWarning,
    SkipCounter,
    make_video_eval_loader,
    make_video_train_loader,
    write_shards,
)
from tokenizers_vis.data.pipeline import StreamResume
from tokenizers_vis.data.video import (
    SEEK_AFTER_FRAMES,
    clip_indices,
    decode_clip,
    decode_sample_clip,
    is_video_source,
    probe_video,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from video_testing import frame_numbers, pattern_frames, pattern_mp4, write_mp4  # noqa: E402

RES = 16
THIRTY_TO_EIGHT = [0, 3, 7, 11, 15, 18, 22, 26, 30, 33, 37, 41, 45, 48, 52, 56]


def video_samples(n: int = 6) -> list[dict]:
    """`n` pattern videos of assorted sizes and lengths at 30 fps; even ones carry a caption."""
    samples = []
    for i in range(n):
        sample = {"__key__": f"vid{i:02d}", "mp4": pattern_mp4(num_frames=20 + 2 * i, fps=30.0,
                                                               height=20 + 2 * i, width=30 - 2 * (i % 3))}
        if i % 2 == 0:
            sample["txt"] = f"clip number {i}"
        samples.append(sample)
    return samples


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("video_shards")
    write_shards(video_samples(), out, "val", 4)  # 2 shards: 4 + 2
    return out


def collect(loader):
    keys, clips, texts = [], [], []
    for batch in loader:
        keys += batch["key"]
        texts += batch["text"]
        clips.append(batch["video"])
    return keys, torch.cat(clips), texts


def test_clip_indices_resample_source_rate():
    assert clip_indices(60, 30.0, 16, 8.0) == THIRTY_TO_EIGHT
    assert clip_indices(10, 8.0, 4, None) == [0, 1, 2, 3]  # fps None: every frame
    assert clip_indices(20, 10.0, 5, 5.0) == [0, 2, 4, 6, 8]  # exact multiples do not drift
    starts = {clip_indices(60, 30.0, 16, 8.0, random.Random(s))[0] for s in range(50)}
    assert starts <= set(range(0, 60 - 57 + 1)) and len(starts) > 1  # span 57 frames: starts 0..3
    with pytest.raises(ValueError, match="too short"):
        clip_indices(56, 30.0, 16, 8.0)


def test_decoded_frames_are_the_expected_source_frames():
    data = pattern_mp4(num_frames=60, fps=30.0)
    assert probe_video(data) == (30.0, 60)
    clip = decode_clip(data, 16, 8.0)
    assert clip.dtype == torch.uint8 and clip.shape == (16, 3, 24, 32)
    assert frame_numbers(clip) == THIRTY_TO_EIGHT
    # The pixels are the written ones (crf 0, no colour): the moving bar is where it was drawn.
    expected = torch.from_numpy(pattern_frames(60)[THIRTY_TO_EIGHT]).permute(0, 3, 1, 2).int()
    assert (clip.int() - expected).abs().max() <= 3
    for seed in range(5):
        rng = random.Random(seed)
        indices = clip_indices(60, 30.0, 16, 8.0, random.Random(seed))
        assert frame_numbers(decode_clip(data, 16, 8.0, rng)) == indices


def test_clips_deep_into_a_long_video_seek_and_match_a_full_decode():
    import av

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:  # a keyframe every 10 frames
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt, stream.gop_size = 32, 24, "yuv420p", 10
        for _ in range(150):
            frame = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    data = buffer.getvalue()
    with av.open(io.BytesIO(data)) as container:
        every = torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1)
                             for f in container.decode(video=0)])
    assert every.shape[0] == 150
    starts = []
    for seed in range(4):
        indices = clip_indices(150, 25.0, 8, 5.0, random.Random(seed))
        starts.append(indices[0])
        assert torch.equal(decode_clip(data, 8, 5.0, random.Random(seed)), every[indices])
    assert sum(start >= SEEK_AFTER_FRAMES for start in starts) >= 2  # these clips were found by seeking


def test_frame_sequence_sample_resamples_with_its_fps():
    frames = pattern_frames(12, bar=False)
    sample = {"__key__": "seq", "json": json.dumps({"fps": 12})}
    for i, frame in enumerate(frames):
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG")
        sample[f"f{i:05d}.png"] = buffer.getvalue()
    clip = decode_sample_clip(sample, 4, 4.0)
    assert frame_numbers(clip) == [0, 3, 6, 9]
    assert torch.equal(clip, torch.from_numpy(frames[[0, 3, 6, 9]]).permute(0, 3, 1, 2))  # PNG is lossless


def test_eval_batches_shapes_range_text_and_determinism(video_shards):
    def load():
        return make_video_eval_loader(str(video_shards), RES, batch_size=4, frames=4, fps=8.0)

    batches = list(load())
    assert [len(b["key"]) for b in batches] == [4, 2]
    for b in batches:
        assert b["video"].shape == (len(b["key"]), 4, 3, RES, RES) and b["video"].dtype == torch.float32
        assert 0.0 <= b["video"].min() and b["video"].max() <= 1.0
    keys, clips, texts = collect(batches)
    assert keys == [f"vid{i:02d}" for i in range(6)]
    assert texts == ["clip number 0", "", "clip number 2", "", "clip number 4", ""]
    # Eval clips start at frame 0: frames 0, 3, 7, 11 (grey 4 * n) and are the same every time.
    grey = clips[:, :, 0].flatten(2).median(dim=2).values * 255.0  # the median pixel is grey, not bar
    assert torch.allclose(grey[0], torch.tensor([0.0, 12.0, 28.0, 44.0]), atol=3.0)
    assert torch.equal(clips, collect(load())[1])


def test_eval_split_over_two_ranks_sees_each_video_once(video_shards):
    parts = [collect(make_video_eval_loader(str(video_shards), RES, 2, frames=4, fps=8.0, rank=r, world_size=2))
             for r in range(2)]
    assert parts[0][0] == ["vid00", "vid02", "vid04"] and parts[1][0] == ["vid01", "vid03", "vid05"]
    whole = collect(make_video_eval_loader(str(video_shards), RES, 2, frames=4, fps=8.0))
    assert torch.equal(parts[1][1], whole[1][1::2])


@pytest.mark.parametrize("num_shards", [1, 3])
def test_train_ranks_never_share_a_video(tmp_path, num_shards):
    write_shards(video_samples(), tmp_path, "train", -(-6 // num_shards))
    seen = []
    for rank in range(2):
        loader = make_video_train_loader(str(tmp_path), RES, 2, frames=3, fps=10.0, num_workers=0, shuffle_buffer=2,
                                         rank=rank, world_size=2)
        it = iter(loader)
        seen.append({key for _ in range(6) for key in next(it)["key"]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"vid{i:02d}" for i in range(6)}


def test_train_clips_are_random_crops_of_random_starts_and_resume_exactly(tmp_path):
    write_shards(video_samples(), tmp_path, "train", 3)

    def loader():
        return make_video_train_loader(str(tmp_path), RES, 2, frames=3, fps=10.0, num_workers=0, shuffle_buffer=3,
                                       seed=1)

    it = iter(loader())
    batches = [next(it) for _ in range(8)]
    for b in batches:
        assert b["video"].shape == (2, 3, 3, RES, RES) and 0.0 <= b["video"].min() and b["video"].max() <= 1.0
        assert set(b) == {"video", "key", "text", "stream"}
    # Frames 3 source frames apart (30 -> 10 fps) from varying starts: grey levels differ by 12.
    firsts = set()
    for b in batches:
        corner = b["video"][:, :, 0].flatten(2).median(dim=2).values * 255.0  # the grey, not the bar
        assert torch.allclose(corner[:, 1] - corner[:, 0], torch.full((2,), 12.0), atol=4.0)
        firsts |= {round(float(v) / 4) for v in corner[:, 0]}
    assert len(firsts) > 1
    marks = [b["stream"] for b in batches]
    resumed = loader()
    resumed.resume_at(marks[0].epoch, StreamResume(4, (marks[3].position,)))
    again = iter(resumed)
    for batch in batches[4:]:
        other = next(again)
        assert other["key"] == batch["key"] and torch.equal(other["video"], batch["video"])


@pytest.mark.filterwarnings("ignore::tokenizers_vis.data.pipeline.CorruptSampleWarning")
def test_corrupt_and_too_short_videos_are_skipped_and_counted(tmp_path):
    samples = video_samples(4)
    samples.insert(1, {"__key__": "garbage", "mp4": b"\x00\x00\x00 ftypisom" + bytes(200)})
    samples.insert(3, {"__key__": "cut", "mp4": pattern_mp4(num_frames=30)[:600]})
    samples.append({"__key__": "short", "mp4": pattern_mp4(num_frames=3)})
    write_shards(samples, tmp_path, "val", 3)
    counter = SkipCounter()
    with pytest.warns(CorruptSampleWarning):
        keys, _, _ = collect(make_video_eval_loader(str(tmp_path), RES, 2, frames=4, fps=8.0, skip_counter=counter))
    assert keys == [f"vid{i:02d}" for i in range(4)]
    assert counter.skipped == 3


def test_folder_of_videos_with_caption_files(tmp_path):
    for i in range(3):
        write_mp4(tmp_path / "clips" / f"sub{i % 2}" / f"v{i}.mp4", num_frames=12, fps=24.0)
    (tmp_path / "clips" / "sub0" / "v0.txt").write_text("a caption\n")
    (tmp_path / "clips" / "notes.md").write_text("not a video")
    assert is_video_source(tmp_path / "clips")
    keys, clips, texts = collect(make_video_eval_loader(tmp_path / "clips", RES, 2, frames=3, fps=8.0))
    assert keys == ["sub0/v0", "sub0/v2", "sub1/v1"] and texts == ["a caption", "", ""]
    assert clips.shape == (3, 3, 3, RES, RES)


def test_is_video_source_tells_video_from_image_shards(tmp_path, video_shards):
    write_shards([{"__key__": "a", "png": b"x"}], tmp_path / "images", "val", 1)
    assert is_video_source(str(video_shards / "val-*.tar"))
    assert not is_video_source(str(tmp_path / "images"))
    assert not is_video_source(str(tmp_path / "nothing-*.tar"))


def test_video_datamodule_batches(video_shards):
    from tokenizers_vis.data import VideoDataModule

    dm = VideoDataModule(str(video_shards / "val-*.tar"), str(video_shards / "val-*.tar"), resolution=RES,
                         batch_size=2, frames=4, fps=8, num_workers=0, shuffle_buffer=2, val_max_videos=3)
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    assert train["video"].shape == (2, 4, 3, RES, RES)
    dm.on_before_batch_transfer(train, 0)
    assert dm.position.consumed == 1 and "stream" not in train
    assert collect(dm.val_dataloader())[0] == ["vid00", "vid01", "vid02"]
    with pytest.raises(ValueError, match="data.frames"):
        VideoDataModule("x", None, RES, 2, frames=0)


DDP_SCRIPT = """
import json, sys
import lightning as L
import torch
from tokenizers_vis.data import VideoDataModule

shards, out = sys.argv[1], sys.argv[2]

class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.train_keys, self.val_keys = [], []

    def training_step(self, batch, batch_idx):
        assert batch["video"].shape[1:] == (3, 3, 16, 16) and len(batch["text"]) == 2
        self.train_keys.append(batch["key"])
        return (batch["video"].mean() - self.weight) ** 2

    def validation_step(self, batch, batch_idx):
        self.val_keys += batch["key"]

    def on_train_end(self):
        with open(f"{out}/rank{self.global_rank}.json", "w") as f:
            json.dump({"train": self.train_keys, "val": self.val_keys}, f)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

if __name__ == "__main__":
    dm = VideoDataModule(f"{shards}/train-*.tar", f"{shards}/val-*.tar", resolution=16, batch_size=2, frames=3,
                         fps=10, num_workers=1, shuffle_buffer=2)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, val_check_interval=3,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Recorder(), datamodule=dm)
    trainer.save_checkpoint(f"{out}/ddp.ckpt")
"""


@pytest.mark.slow
def test_lightning_ddp_two_cpu_processes_split_videos(tmp_path):
    import os
    import subprocess

    write_shards(video_samples(), tmp_path, "train", 3)  # 2 shards: one per rank
    write_shards(video_samples(5), tmp_path, "val", 10)  # one shard, split by sample
    (tmp_path / "run.py").write_text(DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, "run.py", str(tmp_path), str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["val"] == ["vid00", "vid02", "vid04"] and ranks[1]["val"] == ["vid01", "vid03"]
    train = [set(sum(r["train"], [])) for r in ranks]
    assert all(len(r["train"]) == 3 for r in ranks) and not train[0] & train[1]
    state = torch.load(tmp_path / "ddp.ckpt", weights_only=False)["VideoDataModule"]
    assert state["world_size"] == 2 and state["consumed_batches"] == 3 and len(state["positions"]) == 2
