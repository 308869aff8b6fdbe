"""Model card rendering: the Hub front matter (license, library, tags, metrics, model-index) and
the Markdown body, for discrete and continuous tokenizers."""

import yaml

from tokenizers_vis import build_tokenizer
from tokenizers_vis.card import CardInfo, describe_data, render_model_card

METRICS = {"rfid": 2.2123, "psnr": 20.5, "ssim": 0.55, "lpips": 0.1234, "codebook_usage": 1.0,
           "codebook_entropy": 11.9, "num_images": 50000, "tokenizer": "/runs/b64/checkpoints/last.ckpt",
           "data": "imagenet", "resolution": 256}


def _split(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    header, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def test_front_matter_and_body_with_metrics(tiny_configs):
    tokenizer = build_tokenizer(tiny_configs["titok_vq"])
    card = render_model_card(tokenizer, CardInfo(repo_id="acme/titok-b64", experiment="titok_b", step=650000,
                                                 metrics=[METRICS], license="mit"))
    meta, body = _split(card)
    assert meta["license"] == "mit" and meta["library_name"] == "tokenizers_vis"
    assert {"tokenizers_vis", "titok", "discrete-tokens"} <= set(meta["tags"])
    assert meta["metrics"] == ["rfid", "psnr", "ssim", "lpips", "codebook_usage", "codebook_entropy"]
    (model,) = meta["model-index"]
    assert model["name"] == "titok-b64"
    values = {m["type"]: m["value"] for r in model["results"] for m in r["metrics"]}
    assert values["rfid"] == 2.2123 and values["lpips"] == 0.1234
    assert model["results"][0]["dataset"]["name"] == "imagenet (256 px)"

    params = sum(p.numel() for p in tokenizer.parameters())
    for text in ("# titok-b64", "| model type | `titok` |", "| tokens per image | 8 |", f"({params:,})",
                 "| steps | 650,000 |", "| imagenet | 256 | 50000 | last.ckpt | 2.21 | 20.50 | 0.5500 | 0.1234 |",
                 'load_tokenizer("acme/titok-b64")', "ids = encoded.ids  # (4, 8) token ids in [0, 64)",
                 "torch.rand(4, 3, 32, 32)", '"model_type": "titok"', "released under `mit`"):
        assert text in body, text


def test_card_without_metrics_or_run_has_no_evaluation(tiny_configs):
    tokenizer = build_tokenizer(tiny_configs["titok_vae"])
    meta, body = _split(render_model_card(tokenizer))
    assert "model-index" not in meta and "metrics" not in meta
    assert meta["license"] == "apache-2.0" and "continuous-tokens" in meta["tags"]
    assert "## Evaluation" not in body and "## Training" not in body and "## Sample reconstructions" not in body
    assert "none: continuous tokens, 8 channels per token" in body
    assert "latents = encoded.latents  # (4, 8, C)" in body
    assert 'load_tokenizer("path/to/this/folder")' in body


def test_null_and_non_numeric_metrics_are_left_out(tiny_configs):
    tokenizer = build_tokenizer(tiny_configs["titok_vq"])
    entry = {**METRICS, "rfid": None, "lpips": float("nan")}
    meta, body = _split(render_model_card(tokenizer, CardInfo(metrics=[entry])))
    assert "rfid" not in meta["metrics"] and "lpips" not in meta["metrics"]
    header = next(line for line in body.splitlines() if line.startswith("| data |"))
    assert "rFID" not in header and "LPIPS" not in header and "PSNR (dB)" in header
    assert "| 20.50 |" in body


def test_training_recipe_from_the_run_config():
    config = {"name": "demo", "data": {"_target_": "tokenizers_vis.data.DemoDataModule",
                                       "demo_dir": "/home/me/repo/data/demo", "resolution": 64},
              "model": {"objective": {"pixel_weight": 1.0, "lpips_weight": 0.0, "gan_weight": 0.1,
                                      "gan_start_step": 200000, "lecam_weight": 0.001},
                        "schedule": {"name": "cosine", "warmup_steps": 20}}}
    assert describe_data(config["data"]) == "DemoDataModule: data/demo, 64 px"
    tokenizer = build_tokenizer({"model_type": "titok", "image_size": 32, "patch_size": 8, "num_latent_tokens": 4,
                                 "encoder_size": None, "decoder_size": None, "encoder_width": 16,
                                 "encoder_depth": 1, "encoder_heads": 2, "decoder_width": 16, "decoder_depth": 1,
                                 "decoder_heads": 2, "codebook_size": 16, "token_dim": 4})
    body = render_model_card(tokenizer, CardInfo(experiment="demo", run_config=config))
    assert "| objective | pixel_weight 1.0, gan_weight 0.1 (from step 200000), lecam_weight 0.001 |" in body
    assert "| schedule | cosine, warmup 20 steps |" in body
    assert "/home/me" not in body
