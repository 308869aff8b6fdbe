"""SEED training: caption data (demo shards, make_shards sidecars), the stage-2 objective learning on
demo data, and seed_demo's stage 1 then stage 2 through the training entry point."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO_ROOT, compose_train
from PIL import Image

from tokenizers_vis import load_tokenizer
from tokenizers_vis.data import make_eval_loader, make_train_loader
from tokenizers_vis.data.demo import CAPTIONS, VOCAB_NAME
from tokenizers_vis.losses.seed import SEEDObjective, recon_cosine_loss
from tokenizers_vis.models import SEED
from tokenizers_vis.training.run import run_training

TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "image_size": 32, "patch_size": 8, "projection_dim": 24}


def test_demo_batches_carry_their_captions(demo_data):
    demo = demo_data / "demo"
    assert (demo / VOCAB_NAME).read_text().split("\n")[:3] == ["[PAD]", "[UNK]", "[CLS]"]
    classes = json.loads((demo / "classes.json").read_text())
    batch = next(iter(make_eval_loader(str(demo / "val-*.tar"), 32, batch_size=8)))
    assert len(batch["text"]) == 8
    for label, text in zip(batch["label"].tolist(), batch["text"]):
        assert text == CAPTIONS[classes[label]]
    train = next(iter(make_train_loader(str(demo / "train-*.tar"), 32, batch_size=4, num_workers=0)))
    assert len(train["text"]) == 4 and all(isinstance(t, str) and t for t in train["text"])


@pytest.mark.parametrize("sidecar", ["json", "folder"])
def test_make_shards_takes_captions_from_a_sidecar(tmp_path, sidecar, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name, colour in (("red.png", (255, 0, 0)), ("sub/blue.png", (0, 0, 255)), ("green.png", (0, 255, 0))):
        Image.new("RGB", (40, 40), colour).save(src / name)
    captions = {"red.png": "a red square", "sub/blue.png": "a blue square"}  # green has none
    if sidecar == "json":
        source = tmp_path / "captions.json"
        source.write_text(json.dumps(captions))
    else:
        source = tmp_path / "captions"
        for rel, text in captions.items():
            (source / rel).with_suffix(".txt").parent.mkdir(parents=True, exist_ok=True)
            (source / rel).with_suffix(".txt").write_text(text + "\n")
    spec = importlib.util.spec_from_file_location("seed_make_shards", REPO_ROOT / "data" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main([str(src), str(tmp_path / "out"), "--workers", "1", "--flat", "--no-shuffle",
                        "--captions", str(source)])
    assert code == 0
    assert "no caption for green" in capsys.readouterr().err
    batch = next(iter(make_eval_loader(str(tmp_path / "out"), 32, batch_size=8)))
    assert sorted(batch["text"]) == ["a blue square", "a red square"]
    pixels = {text: batch["image"][i, :, 16, 16].tolist() for i, text in enumerate(batch["text"])}
    assert pixels["a red square"][0] > 0.9 and pixels["a blue square"][2] > 0.9


def _tiny_stage2(seed=0):
    torch.manual_seed(seed)
    return SEED(image_size=64, vit={"patch_size": 8, "width": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0},
                qformer_width=32, qformer_depth=2, qformer_heads=2, qformer_mlp_dim=64, qformer_dropout=0.0,
                codebook_size=64, code_dim=8, decode_depth=1, decode_heads=2, image_embed_dim=24, stage=2)


def test_stage2_objective_is_the_weighted_sum_of_its_three_losses():
    tok = _tiny_stage2().train()
    objective = SEEDObjective(clip_target={"config": TINY_CLIP, "seed": 1})
    objective.prepare(tok)
    images = torch.rand(3, 3, 64, 64)
    torch.manual_seed(5)
    loss, logs, output = objective(tok, {"image": images}, 0)
    extras = output.encoded.extras
    target = objective.frozen["clip_target"](images)
    l_img = torch.nn.functional.mse_loss(extras["image_embedding"], target)
    l_rec = recon_cosine_loss(extras["recon_qformer"], extras["query_output"])
    torch.testing.assert_close(loss, 5 * output.aux_loss + 2 * l_rec + 0.5 * l_img)
    torch.testing.assert_close(logs["loss/img"], l_img.detach())
    assert set(logs) >= {"loss/vq", "loss/rec", "loss/img", "loss/total", "img/cosine"}
    with pytest.raises(ValueError, match="image_embed_dim=16"):
        SEEDObjective(clip_target={"config": {**TINY_CLIP, "projection_dim": 16}}).prepare(tok)
    with pytest.raises(ValueError, match="needs objective.clip_target"):
        SEEDObjective(clip_target=None)


def test_tiny_seed_stage2_losses_fall_on_demo_data(demo_data):
    tok = _tiny_stage2(seed=2).train()
    objective = SEEDObjective(clip_target={"config": TINY_CLIP, "seed": 3})
    objective.prepare(tok)
    loader = make_train_loader(str(demo_data / "demo" / "train-*.tar"), 64, batch_size=16, num_workers=0, seed=1)
    opt = torch.optim.Adam([p for p in tok.parameters() if p.requires_grad], lr=2e-3)
    history = []
    for step, batch in zip(range(60), loader):
        loss, logs, _ = objective(tok, batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: float(logs[k]) for k in ("loss/total", "loss/rec", "loss/img")})
    for key in ("loss/total", "loss/rec", "loss/img"):
        first = sum(h[key] for h in history[:5]) / 5
        last = sum(h[key] for h in history[-5:]) / 5
        assert last < 0.7 * first, (key, first, last)


@pytest.mark.slow
def test_seed_demo_trains_stage1_then_stage2(demo_data, tmp_path):
    """Stage 1 (ITC) through the training entry point, then stage 2 from its checkpoint (strict)."""
    stage1 = tmp_path / "stage1"
    run_training(compose_train(["experiment=seed_demo", "debug=smoke", "validate_before_fit=false"], stage1,
                               data_dir=demo_data))
    first = load_tokenizer(stage1 / "checkpoints" / "last.ckpt")
    assert first.stage == 1
    stage2 = tmp_path / "stage2"
    summary = run_training(compose_train(["experiment=seed_demo", "debug=smoke", "model.stage=2",
                                          f"model.init_from={stage1 / 'checkpoints' / 'last.ckpt'}",
                                          "validate_before_fit=false"], stage2, data_dir=demo_data))
    assert summary["steps"] == 3 and "val/psnr" in summary["val_after"]
    second = load_tokenizer(stage2 / "checkpoints" / "last.ckpt")
    assert second.stage == 2
    # The Q-Former (frozen in stage 2) is stage 1's; the bottleneck trained.
    assert torch.equal(second.qformer.queries.weight, first.qformer.queries.weight)
    assert torch.equal(second.temp, first.temp)
    assert not torch.equal(second.encode_task_layer[0].weight, first.encode_task_layer[0].weight)
    metrics = (stage2 / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"loss/vq", "loss/rec", "loss/img"} <= set(metrics)
    # Export (the frozen unCLIP and CLIP target recorded by source) reads back bit for bit ...
    from tokenizers_vis.export import export_checkpoint

    exported = export_checkpoint(stage2, tmp_path / "export")
    reloaded = load_tokenizer(tmp_path / "export")
    assert reloaded.config["unclip"] == second.config["unclip"] and reloaded.config["clip_target"]
    pairs = zip(reloaded.state_dict().values(), exported.tokenizer.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    # ... and eval/reconstruct.py writes metrics.json (with the embedding cosine) and a grid.
    result = subprocess.run([sys.executable, "eval/reconstruct.py", f"tokenizer={tmp_path / 'export'}", "data=demo",
                             f"paths.data_dir={demo_data}", f"hydra.run.dir={tmp_path / 'eval'}", "fid=false",
                             "lpips=false", "progress=false", "max_images=8"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert record["num_images"] == 8 and -1 <= record["embedding_cosine"] <= 1
    assert (tmp_path / "eval" / "grid.png").is_file()
