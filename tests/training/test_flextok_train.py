"""FlexTok training: the demo experiment through the Lightning module, and a tiny overfit."""

import pytest
import torch
from helpers import compose_train

from tokenizers_vis import load_tokenizer
from tokenizers_vis.export import export_checkpoint
from tokenizers_vis.losses.flow import FlowMatchingObjective
from tokenizers_vis.models import FlexTok
from tokenizers_vis.training.run import run_training


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from tokenizers_vis.data import ensure_demo_shards

    data_dir = tmp_path_factory.mktemp("data")
    ensure_demo_shards(data_dir / "demo", num_train=32, num_val=8, shard_size=16)
    return data_dir


def _flow_losses(run_dir):
    rows = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("loss/flow")
    return [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]


def test_demo_experiment_trains_validates_and_exports(demo_data, tmp_path):
    overrides = ["experiment=flextok_demo", "trainer.max_steps=40", "trainer.val_check_interval=40",
                 "data.num_workers=0", "data.batch_size=4", "data.resolution=32", "data.val_max_images=4",
                 "model.tokenizer.patch_size=4", "model.tokenizer.encoder_width=64",
                 "model.tokenizer.decoder_width=64", "model.tokenizer.decoder_depth=2",
                 "model.tokenizer.sample_steps=2", "model.optimizer.lr=2e-3", "model.schedule.warmup_steps=1",
                 "model.ema_decay=null", "validate_before_fit=false",
                 "callbacks.model_checkpoint.every_n_train_steps=40",
                 "callbacks.reconstruction_logger.every_n_steps=40", "trainer.log_every_n_steps=1", "logger=csv"]
    summary = run_training(compose_train(overrides, tmp_path, data_dir=demo_data))
    assert summary["steps"] == 40 and summary["nonfinite_steps"] == 0
    assert "val/psnr" in summary["val_after"]
    losses = _flow_losses(tmp_path)
    assert sum(losses[-10:]) / 10 < 0.95 * sum(losses[:5]) / 5  # falls; the slow test overfits
    tok = load_tokenizer(tmp_path / "checkpoints" / "last.ckpt")
    assert isinstance(tok, FlexTok) and tok.num_tokens == 16
    x = torch.rand(1, 3, 32, 32)
    assert tok.decode(tok.encode(x), num_tokens=1).shape == x.shape
    # Export the run (what `python -m tokenizers_vis.export RUN OUT` does): the folder rebuilds the
    # same model without Hydra, the card names the experiment, and decoding is the checkpoint's.
    exported = export_checkpoint(tmp_path, tmp_path / "export")
    assert exported.step == 40 and (tmp_path / "export" / "README.md").is_file()
    assert "flextok_demo" in (tmp_path / "export" / "README.md").read_text()
    folder = load_tokenizer(tmp_path / "export")
    assert isinstance(folder, FlexTok) and folder.config == tok.config
    for name, value in tok.state_dict().items():
        assert torch.equal(folder.state_dict()[name], value), name
    noise = tok.initial_noise(1, torch.Generator().manual_seed(0), "cpu")
    with torch.no_grad():
        assert torch.equal(folder.decode(folder.encode(x), num_tokens=4, noise=noise),
                           tok.decode(tok.encode(x), num_tokens=4, noise=noise))


def _psnr(a, b):
    return float((10 * torch.log10(1 / ((a - b) ** 2).flatten(1).mean(1))).mean())


STEPS = 2000


@pytest.mark.slow
def test_tiny_flextok_overfits_demo_images_and_more_tokens_decode_better(tmp_path):
    """Flow loss falls, and decoding all 8 registers beats decoding the first one, on the training
    images (measured: loss 1.17 -> 0.14, PSNR 16.0 dB at k = 1, 18.0 at k = 2, 18.2 at k = 8; ~3 min
    single-threaded on 2 busy cores). FSQ [8, 5] (40 codes): with the released 64,000 codes one
    token names almost each of 64 images and the decoder memorises them from it (k = 1 and k = 8 were
    0.9 dB apart); with 40, the first token names a group and the later ones the image."""
    from tokenizers_vis.data import ensure_demo_shards, make_eval_loader

    ensure_demo_shards(tmp_path / "demo", num_train=64, num_val=16, shard_size=32)
    loader = make_eval_loader(f"{tmp_path}/demo/train-{{000000..000001}}.tar", 16, batch_size=64)
    images = next(iter(loader))["image"]
    assert images.shape == (64, 3, 16, 16)
    torch.manual_seed(0)
    # 4 x 4 patches (48 values) under a 64-wide decoder, which passes the flow noise through.
    tok = FlexTok(image_size=16, vae=None, patch_size=4, num_registers=8, encoder_width=64, encoder_depth=2,
                  encoder_heads=2, decoder_width=64, decoder_depth=2, decoder_heads=2, levels=[8, 5],
                  cond_dropout=0.0, nested_dropout="pow2", sample_steps=10, guidance_scale=1.0)
    objective = FlowMatchingObjective()
    optimizer = torch.optim.AdamW(tok.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for step in range(1, STEPS + 1):
        loss, _, _ = objective(tok, images, step)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.2 * sum(losses[:10]) / 10
    tok.eval()
    with torch.no_grad():
        encoded = tok.encode(images)
        psnr = {k: _psnr(tok.decode(encoded, num_tokens=k).clamp(0, 1), images) for k in (1, 2, 8)}
    assert psnr[8] > psnr[1] + 1.0 and psnr[2] > psnr[1], psnr
    assert psnr[1] > 12.0, psnr  # images, not noise, at every k


TINY_VAE = ("{pretrained: null, scaling_factor: 0.5, config: {block_out_channels: [8, 8], norm_num_groups: 4, "
            "latent_channels: 4, down_block_types: [DownEncoderBlock2D, DownEncoderBlock2D], "
            "up_block_types: [UpDecoderBlock2D, UpDecoderBlock2D], layers_per_block: 1}}")


def test_checkpoint_holds_the_frozen_vae_once_and_resumes_and_loads_with_it(demo_data, tmp_path):
    """With EMA on, the frozen VAE is saved under `tokenizer.vae.*` only (not again as `ema.vae.*`);
    resume and `load_tokenizer` put it back into the EMA copy."""
    from tokenizers_vis.hub import EMA_SHARED_KEY, checkpoint_state

    overrides = ["experiment=flextok_demo", "trainer.max_steps=2", "data.num_workers=0", "data.batch_size=2",
                 "data.val_max_images=2", f"model.tokenizer.vae={TINY_VAE}", "model.tokenizer.patch_size=2",
                 "model.tokenizer.num_registers=4", "model.tokenizer.encoder_width=32",
                 "model.tokenizer.encoder_depth=1", "model.tokenizer.encoder_heads=2",
                 "model.tokenizer.decoder_width=32", "model.tokenizer.decoder_depth=1",
                 "model.tokenizer.decoder_heads=2", "model.tokenizer.sample_steps=1", "model.ema_decay=0.5",
                 "validate_before_fit=false", "validate_after_fit=false",
                 "callbacks.model_checkpoint.every_n_train_steps=1", "logger=csv"]
    run_training(compose_train(overrides, tmp_path, data_dir=demo_data))
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint["state_dict"]
    vae_keys = [k for k in state if k.startswith("tokenizer.vae.")]
    assert vae_keys and not any(k.startswith("ema.vae.") for k in state)
    assert set(checkpoint[EMA_SHARED_KEY]) >= {k[len("tokenizer."):] for k in vae_keys}
    # Trained weights keep their own EMA copy (the output head is the first to move from its zero init).
    head = "decoder.head.proj.weight"
    assert "ema." + head in state and not torch.equal(state["ema." + head], state["tokenizer." + head])
    tok = load_tokenizer(path)
    ema = checkpoint_state(checkpoint)
    assert all(torch.equal(v, ema[k]) for k, v in tok.state_dict().items())
    assert torch.equal(tok.decoder.head.proj.weight, state["ema." + head])
    assert torch.equal(tok.vae.model.encoder.conv_in.weight, state["tokenizer.vae.model.encoder.conv_in.weight"])
    # Resume: the strict load sees every EMA key again, and the next checkpoint drops them again.
    summary = run_training(compose_train([*overrides, "trainer.max_steps=3", "ckpt_path=last"], tmp_path,
                                         data_dir=demo_data))
    assert summary["steps"] == 3
    resumed = torch.load(path, map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 3 and not any(k.startswith("ema.vae.") for k in resumed["state_dict"])
