"""Test doubles and data for the evaluation tests (a plain module: DDP workers import it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from tokenizers_vis import save_pretrained
from tokenizers_vis.models import Encoded, TiTok

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
NUM_IMAGES = 7  # odd: two ranks get 4 and 3
RESOLUTION = 32
TINY_TITOK = dict(image_size=RESOLUTION, patch_size=8, num_latent_tokens=8, encoder_size=None, decoder_size=None,
                  encoder_width=32, encoder_depth=1, encoder_heads=2, decoder_width=32, decoder_depth=1,
                  decoder_heads=2, token_dim=8, codebook_size=64)


def save_tiny_tokenizer(directory: Path) -> Path:
    torch.manual_seed(0)
    return save_pretrained(TiTok(**TINY_TITOK).eval(), directory)


def make_image_folder(directory: Path, count: int = NUM_IMAGES) -> Path:
    """`count` smooth random RGB PNGs of varied sizes and aspect ratios (the loader resizes and crops)."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = int(rng.integers(32, 60)), int(rng.integers(32, 60))
        coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        noisy = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-20, 21, size=(h, w, 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(directory / f"img_{i:02d}.png")
    return directory


class FeatureNet(nn.Module):
    """Stand-in for Inception: uint8 (B, 3, H, W) -> (B, 4) random but seeded features (fewer
    dimensions than images, so the covariances of 7 images are not singular)."""

    def __init__(self, dim: int = 4):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                      nn.Flatten(), nn.Linear(16, dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8
        return 10.0 * self.body(images.float() / 127.5 - 1.0)


class IdentityTokenizer(nn.Module):
    """Reconstructs exactly: its "latents" are the images."""

    image_size = RESOLUTION
    codebook_size = None
    num_tokens = 1

    def encode(self, images: torch.Tensor) -> Encoded:
        return Encoded(ids=None, latents=images)

    def decode(self, encoded: Encoded) -> torch.Tensor:
        return encoded.latents


class PrefixTokenizer(nn.Module):
    """A variable-length stand-in: 4 ids per image; decoding k tokens keeps less detail."""

    image_size = RESOLUTION
    codebook_size = 16
    num_tokens = 4

    def encode(self, images: torch.Tensor) -> Encoded:
        ids = (images.mean(dim=(1, 2, 3), keepdim=False)[:, None] * 15).round().long().repeat(1, 4)
        ids[:, 1:] = torch.arange(1, 4)  # prefixes of different lengths use different codes
        return Encoded(ids=ids, latents=images)

    def decode(self, encoded: Encoded, num_tokens: int | None = None) -> torch.Tensor:
        k = self.num_tokens if num_tokens is None else num_tokens
        factor = 2 ** (self.num_tokens - k)  # fewer tokens: coarser image
        x = encoded.latents
        if factor == 1:
            return x
        small = nn.functional.avg_pool2d(x, factor)
        return nn.functional.interpolate(small, scale_factor=factor, mode="nearest")


def compose_eval(overrides: list[str], output_dir: Path, data_dir: Path | None = None):
    """conf/eval.yaml as `eval/reconstruct.py` composes it (`data=X` is `data_source=X` there)."""
    from hydra import compose, initialize_config_dir

    base = [f"output_dir={output_dir}", f"paths.root_dir={REPO_ROOT}", "num_workers=0", "progress=false"]
    if data_dir is not None:
        base.append(f"paths.data_dir={data_dir}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="eval.yaml", overrides=base + list(overrides))


def sharded_worker(rank: int, world_size: int, init_file: str, out_dir: str, tokenizer_dir: str, image_dir: str,
                   cfg) -> None:
    """One rank of the 2-process test: the Python API with an injected FID network, then the
    whole command (`run_evaluation`), both under the caller's gloo process group."""
    import torch.distributed as dist

    from tokenizers_vis import load_tokenizer
    from tokenizers_vis.data import make_eval_loader
    from tokenizers_vis.evaluation import evaluate_reconstruction, run_evaluation
    from tokenizers_vis.metrics import ReconstructionMetrics

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
        loader = make_eval_loader(image_dir, RESOLUTION, batch_size=3, rank=rank, world_size=world_size)
        seen: list[str] = []

        def recording(batches):
            for batch in batches:
                seen.extend(batch["key"])
                yield batch

        metrics = ReconstructionMetrics(tokenizer.codebook_size, fid=FeatureNet(), lpips=False)
        api = evaluate_reconstruction(tokenizer, recording(loader), metrics, progress=False)
        record = run_evaluation(cfg, conf_dir=CONF_DIR)
        torch.save({"api": api, "record": record, "keys": seen}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def random_inception_weights(path: Path) -> Path:
    """A random state dict in the layout of the TF-FID Inception file (the real one is not here)."""
    import pytest
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with pytest.MonkeyPatch.context() as patch:
        # Build the network without loading (or downloading) anything, to save its layout.
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)
    return path
