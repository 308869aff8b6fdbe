"""TokenFlow training: a tiny model overfits demo images (pixel and distillation losses both fall), and
the demo experiment runs through the Lightning module, logging codebook usage and d_sem / d_pix."""

import hydra
import torch
from helpers import compose_train

from tokenizers_vis import load_tokenizer
from tokenizers_vis.losses.distillation import DistillationObjective
from tokenizers_vis.models import TokenFlow
from tokenizers_vis.training.run import run_training

TOWER = {"kind": "openai_clip", "pretrained": None, "seed": 1,
         "config": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2, "output_dim": 16}}


def _column(run_dir, name):
    rows = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index(name)
    return [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]


def _demo_images(demo_data, tmp_path, n=8):
    cfg = compose_train(["experiment=tokenflow_demo", "data.num_workers=0", f"data.batch_size={n}",
                         "data.resolution=32"], tmp_path / "unused", data_dir=demo_data)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))["image"][:n]


def test_tiny_tokenflow_overfits_demo_images(demo_data, tmp_path):
    """Pixel L2 and the distillation loss both fall on 8 demo images (the teacher is the tower's
    starting copy, so the semantic branch must keep its codes informative while it is fine-tuned)."""
    images = _demo_images(demo_data, tmp_path)
    torch.manual_seed(0)
    tok = TokenFlow(image_size=32, semantic_encoder=TOWER, semantic_decoder_width=32, semantic_decoder_depth=1,
                    semantic_decoder_heads=2, semantic_out_dim=16, pixel_channels=32,
                    pixel_channel_mult=(1, 1, 1, 1), pixel_num_res_blocks=1, z_channels=32, codebook_size=64,
                    scales=(1, 2, 4), drop_scale_prob=0.1).train()
    objective = DistillationObjective(distill_weight=1.0, lpips_weight=0.0, gan_weight=0.0, discriminator=None)
    objective.prepare(tok)
    optimizer = torch.optim.Adam(tok.parameters(), lr=2e-3, betas=(0.9, 0.95))
    pixel, distill = [], []
    for step in range(80):
        loss, logs, _ = objective(tok, images, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pixel.append(float(logs["loss/pixel"]))
        distill.append(float(logs["loss/distill"]))
    assert sum(pixel[-10:]) / 10 < 0.6 * sum(pixel[:5]) / 5, pixel[::10]
    assert sum(distill[-10:]) / 10 < 0.6 * sum(distill[:5]) / 5, distill[::10]


def test_demo_experiment_trains_logs_codebook_statistics_and_reloads(demo_data, tmp_path):
    overrides = ["experiment=tokenflow_demo", "trainer.max_steps=12", "trainer.val_check_interval=12",
                 "data.num_workers=0", "data.batch_size=4", "data.val_max_images=4",
                 "model.tokenizer.pixel_channels=32", "model.tokenizer.pixel_channel_mult=[1,1,1,1]",
                 "model.codebook_log_every=4", "validate_before_fit=false", "trainer.log_every_n_steps=1",
                 "callbacks.model_checkpoint.every_n_train_steps=12",
                 "callbacks.reconstruction_logger.every_n_steps=12", "logger=csv"]
    summary = run_training(compose_train(overrides, tmp_path, data_dir=demo_data))
    assert summary["steps"] == 12 and summary["nonfinite_steps"] == 0
    assert "val/psnr" in summary["val_after"]
    d_sem, d_pix = _column(tmp_path, "quantizer/d_semantic"), _column(tmp_path, "quantizer/d_pixel")
    assert len(d_sem) == 12 and all(0 <= v <= 4 for v in d_sem + d_pix)  # squared distances of unit vectors
    usage = _column(tmp_path, "codebook/usage")
    assert usage and all(0 < u <= 1 for u in usage)
    assert _column(tmp_path, "loss/distill")
    tok = load_tokenizer(tmp_path / "checkpoints" / "last.ckpt")
    assert isinstance(tok, TokenFlow) and tok.num_tokens == 1 + 4 + 16 + 64
    x = torch.rand(1, 3, 64, 64)
    assert tok.decode(tok.encode(x).ids).shape == x.shape
