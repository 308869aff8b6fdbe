"""ReconstructionLogger on video clips: an image tokenizer frame by frame, a frame strip and an mp4."""

from types import SimpleNamespace

import torch

from tokenizers_vis.data.video import probe_video
from tokenizers_vis.training.callbacks import ReconstructionLogger


class HalfTokenizer(torch.nn.Module):
    """An image tokenizer (4-D input only) whose reconstruction is half the image."""

    input_kind = "image"

    def encode(self, images):
        assert images.dim() == 4
        return images

    def decode(self, encoded):
        return encoded * 0.5


def test_video_clips_give_a_frame_strip_and_an_mp4(tmp_path):
    clips = torch.rand(2, 5, 3, 16, 16)
    datamodule = SimpleNamespace(val_dataloader=lambda: [{"video": clips, "key": ["a", "b"]}], fps=5.0)
    trainer = SimpleNamespace(datamodule=datamodule, default_root_dir=str(tmp_path), loggers=[], global_step=3)
    module = SimpleNamespace(eval_tokenizer=HalfTokenizer(), step=3, host_step=3, device=torch.device("cpu"))
    logger = ReconstructionLogger(num_images=2)
    logger.log_grid(trainer, module)
    assert logger.last_path.name == "step_0000003.png" and logger.last_path.is_file()
    mp4 = tmp_path / "reconstructions" / "step_0000003.mp4"
    assert probe_video(mp4.read_bytes()) == (5.0, 5)  # one video frame per clip frame, at the data's rate
