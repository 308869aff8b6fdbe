"""The batch contract, the Objective base and its hooks, the one way to freeze parts, and grids."""

import lightning as L
import pytest
import torch

from tokenizers_vis.losses.base import Objective
from tokenizers_vis.losses.objective import ReconstructionObjective
from tokenizers_vis.metrics.grids import reconstruction_grid
from tokenizers_vis.models.base import as_batch, batch_pixels
from tokenizers_vis.models.titok import TiTok
from tokenizers_vis.training.module import TokenizerModule


def tiny_titok(**kwargs) -> TiTok:
    return TiTok(image_size=32, patch_size=8, num_latent_tokens=4, encoder_width=32, encoder_depth=1,
                 encoder_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2, codebook_size=16,
                 token_dim=4, **kwargs)


# -- the batch contract ---------------------------------------------------------------------------
def test_a_bare_tensor_becomes_an_image_or_video_batch():
    images, video = torch.rand(2, 3, 8, 8), torch.rand(2, 4, 3, 8, 8)
    assert as_batch(images)["image"] is images and as_batch(video)["video"] is video
    batch = {"video": video, "text": ["a", "b"]}
    assert as_batch(batch) is batch and batch_pixels(batch) is video
    assert batch_pixels({"image": images, "video": video}) is images


@pytest.mark.parametrize("bad", [{"text": ["a"]}, ["not", "a", "batch"]])
def test_a_batch_without_pixels_is_refused_naming_the_keys(bad):
    with pytest.raises(ValueError, match="'image'"):
        as_batch(bad)


def test_video_checks_name_the_expected_layout():
    tok = tiny_titok()
    tok.check_video(torch.rand(1, 2, 3, 32, 32), num_frames=2)
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        tok.check_video(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="clips of 16 frames"):
        tok.check_video(torch.rand(1, 2, 3, 32, 32), num_frames=16)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        tok.check_video(torch.rand(1, 2, 1, 32, 32))


# -- grids -----------------------------------------------------------------------------------------
def test_image_grid_has_originals_above_reconstructions():
    originals, recon = torch.zeros(3, 3, 8, 8), torch.ones(3, 3, 8, 8)
    grid = reconstruction_grid(originals, recon)
    assert grid.shape == (3, 2 * 8 + 3 * 2, 3 * 8 + 4 * 2)
    assert grid[:, 2:10, 2:10].max() == 0 and grid[:, 12:20, 2:10].min() == 1


def test_video_grid_has_two_rows_per_clip_one_frame_per_column():
    originals = torch.zeros(2, 5, 3, 8, 8)
    recon = torch.ones(2, 5, 3, 8, 8)
    grid = reconstruction_grid(originals, recon)
    assert grid.shape == (3, 4 * 8 + 5 * 2, 5 * 8 + 6 * 2)
    # Rows: clip 0 original, clip 0 reconstruction, clip 1 original, clip 1 reconstruction.
    row_means = [grid[:, 2 + r * 10: 10 + r * 10, 2:10].mean().item() for r in range(4)]
    assert row_means == [0.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_grid(originals, recon[:, :4])


# -- freezing parts ----------------------------------------------------------------------------------
def test_frozen_and_trainable_are_one_mechanism():
    frozen = tiny_titok(frozen=["encoder", "quantize", "latent_tokens"])
    trained = {n.split(".")[0] for n, p in frozen.named_parameters() if p.requires_grad}
    assert trained == {"decoder"}
    frozen.train()
    assert not frozen.encoder.training and frozen.decoder.training
    other = tiny_titok()
    other.freeze_parts(trainable=["decoder"])
    assert other.frozen_parts == tuple(p for p in other.freezable_parts() if p != "decoder")
    assert {n.split(".")[0] for n, p in other.named_parameters() if p.requires_grad} == {"decoder"}
    with pytest.raises(ValueError, match="not both"):
        other.freeze_parts(frozen=["encoder"], trainable=["decoder"])
    with pytest.raises(ValueError, match="cannot train only \\['nothing'\\]"):
        other.freeze_parts(trainable=["nothing"])
    with pytest.raises(ValueError, match="frozen once"):
        other.freeze_parts(frozen=["encoder"])


# -- the Objective base and the hooks the module calls ---------------------------------------------------
class RecordingObjective(Objective):
    """Reconstruction L2 that records what the module hands it."""

    def __init__(self):
        super().__init__()
        self.batches = []
        self.prepared = []
        self.add_frozen("probe", torch.nn.Linear(2, 2))

    def prepare(self, tokenizer):
        self.prepared.append(type(tokenizer).__name__)

    def forward(self, tokenizer, batch, step):
        self.batches.append(batch)
        output = tokenizer(batch_pixels(batch))
        loss = (output.reconstruction - batch_pixels(batch)).pow(2).mean()
        return loss, {"loss/total": loss.detach()}, output


def test_objective_defaults():
    objective = RecordingObjective()
    assert objective.discriminator is None and not objective.discriminator_active(10)
    assert objective.initial_weights(tiny_titok()) == {}
    assert objective.unsaved_prefixes() == ("frozen.",)
    with pytest.raises(RuntimeError, match="no discriminator"):
        objective.discriminator_loss(torch.rand(1), torch.rand(1), 0)
    objective.train()
    assert objective.training and not objective.frozen.training
    assert not any(p.requires_grad for p in objective.frozen.parameters())
    assert ReconstructionObjective(lpips_weight=0.0, gan_weight=0.0).discriminator is None


class Batches(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return {"image": torch.rand(3, 32, 32), "text": f"caption {index}"}


def test_the_module_calls_the_hooks_and_hands_over_the_whole_batch(tmp_path):
    objective = RecordingObjective()
    module = TokenizerModule(tiny_titok(), objective, optimizer=torch.optim.AdamW, ema_decay=0.9)
    assert objective.prepared == ["TiTok"]
    loader = torch.utils.data.DataLoader(Batches(), batch_size=2)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, loader)
    assert len(objective.batches) == 2
    assert objective.batches[0]["text"] == ["caption 0", "caption 1"]
    # The objective's frozen nets never reach checkpoints.
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("objective.frozen.") for k in checkpoint["state_dict"])
