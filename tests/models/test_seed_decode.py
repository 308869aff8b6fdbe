"""SEED's decode through a tiny random StableUnCLIPImg2ImgPipeline (built from config, and loaded from
a local folder: the real recipe's path), the CLIP target, and evaluation's embedding cosine."""

import pytest
import torch

from tokenizers_vis import load_tokenizer, save_pretrained
from tokenizers_vis.evaluation import evaluate_reconstruction
from tokenizers_vis.metrics import ReconstructionMetrics
from tokenizers_vis.models import SEED
from tokenizers_vis.models.seed_unclip import UnCLIPDecoder
from tokenizers_vis.nn.clip_embedder import FrozenCLIPImageEmbedder

UNCLIP = {"embed_dim": 12, "sample_size": 8, "unet_channels": [16, 32], "vae_channels": [8, 8], "text_width": 16,
          "text_layers": 1, "vision_width": 16, "vision_layers": 1, "vision_image_size": 32}
CLIP = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "image_size": 32, "patch_size": 8, "projection_dim": 12}


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    return SEED(image_size=32, vit={"patch_size": 8, "width": 16, "depth": 1, "heads": 2, "mlp_ratio": 2.0},
                qformer_width=16, qformer_depth=2, qformer_heads=2, qformer_mlp_dim=32, codebook_size=32, code_dim=4,
                decode_depth=1, decode_heads=2, image_embed_dim=12, unclip={"config": UNCLIP, "seed": 1},
                clip_target={"config": CLIP, "seed": 2}).eval()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_decode_is_seeded_and_conditioned_on_the_ids(tok):
    ids = tok.encode(torch.rand(2, 3, 32, 32)).ids
    a = tok.decode(ids, steps=3, generator=_gen(0))
    assert a.shape == (2, 3, 16, 16) and a.dtype == torch.float32  # unCLIP's own size for bare ids
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, tok.decode(ids, steps=3, generator=_gen(0)))
    assert not torch.equal(a, tok.decode(ids, steps=3, generator=_gen(1)))
    # The embedding steers the image (same noise, other ids), and guidance changes it.
    other = torch.randint(0, 32, ids.shape, generator=_gen(5))
    assert not torch.allclose(a, tok.decode(other, steps=3, generator=_gen(0)), atol=1e-4)
    assert not torch.allclose(a, tok.decode(ids, steps=3, guidance=1.0, generator=_gen(0)), atol=1e-4)


def test_decode_of_an_encoding_returns_the_input_size_and_reconstruct_works(tok):
    images = torch.rand(2, 3, 48, 48)
    out = tok.reconstruct(images, steps=2, generator=_gen(0))
    assert out.shape == images.shape
    assert tok.decode(tok.encode(images), steps=2, size=24, generator=_gen(0)).shape == (2, 3, 24, 24)


def test_the_frozen_decoder_and_target_are_never_saved(tok, tmp_path):
    tok.decode(tok.encode(torch.rand(1, 3, 32, 32)).ids, steps=1, generator=_gen(0))
    tok.extra_metrics(torch.rand(1, 3, 32, 32), tok.encode(torch.rand(1, 3, 32, 32)))
    names = list(tok.state_dict())
    assert not any("unclip" in n or "clip_target" in n or "unet" in n for n in names)
    assert all(not p.requires_grad for p in tok.unclip_decoder().pipeline.unet.parameters())
    loaded = load_tokenizer(save_pretrained(tok, tmp_path / "seed"))
    assert loaded.config["unclip"] == {"config": UNCLIP, "seed": 1}  # recorded by source
    ids = tok.encode(torch.rand(1, 3, 32, 32)).ids
    assert torch.equal(loaded.decode(ids, steps=2, generator=_gen(3)), tok.decode(ids, steps=2, generator=_gen(3)))


def test_pretrained_pipeline_and_clip_target_load_from_local_folders(tmp_path):
    built = UnCLIPDecoder(config=UNCLIP, seed=4)
    built.pipeline.save_pretrained(tmp_path / "unclip")
    loaded = UnCLIPDecoder(pretrained=str(tmp_path / "unclip"))
    emb = torch.randn(2, 12, generator=_gen(0))
    assert torch.equal(built.generate(emb, steps=2, generator=_gen(1)),
                       loaded.generate(emb, steps=2, generator=_gen(1)))
    with pytest.raises(ValueError, match=r"shape \(B, 12\)"):
        built.generate(torch.randn(2, 5))
    target = FrozenCLIPImageEmbedder(config=CLIP, seed=3)
    target.model.save_pretrained(tmp_path / "sd" / "image_encoder")
    again = FrozenCLIPImageEmbedder(pretrained=str(tmp_path / "sd"), subfolder="image_encoder")
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(target(images), again(images)) and target(images).shape == (2, 12)
    from tokenizers_vis.nn.weights import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="unclip.pretrained"):
        UnCLIPDecoder(pretrained=str(tmp_path / "absent"))


def test_evaluation_reports_the_embedding_cosine(tok):
    images = torch.rand(4, 3, 32, 32, generator=_gen(7))
    loader = [{"image": images[:2]}, {"image": images[2:]}]
    result = evaluate_reconstruction(tok, loader, ReconstructionMetrics(codebook_size=32, fid=False, lpips=False),
                                     progress=False)
    with torch.no_grad():
        expected = torch.nn.functional.cosine_similarity(tok.image_embedding(tok.encode(images).ids),
                                                         tok.clip_target()(images), dim=-1).mean()
    assert result["embedding_cosine"] == pytest.approx(float(expected), abs=1e-6)
    assert result["psnr"] is not None and result["num_images"] == 4


def test_comparison_measures_seed_as_the_evaluator_does(tok):
    """eval/compare.py's probe keeps SEED's embedding cosine, and its parameter trace (one extra
    encode + decode) draws nothing from the global RNG the unCLIP sampler uses."""
    from tokenizers_vis.comparison import _Probe

    images = torch.rand(4, 3, 32, 32, generator=_gen(8))
    loader = [{"image": images[:2]}, {"image": images[2:]}]

    def measure(model):
        torch.manual_seed(11)
        return evaluate_reconstruction(model, loader, ReconstructionMetrics(codebook_size=32, fid=False, lpips=False),
                                       progress=False)

    alone = measure(tok)
    probed = measure(_Probe(tok, {}, keep=0, device=torch.device("cpu")))
    assert probed["embedding_cosine"] == alone["embedding_cosine"]
    assert probed["psnr"] == alone["psnr"] and probed["ssim"] == alone["ssim"]
