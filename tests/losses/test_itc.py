"""SEED's stage-1 image-text contrastive objective: the loss by hand, the objective on a tiny SEED,
and (slow) the DDP gather: 2 processes give the single-process loss on the concatenated batch."""

import math

import pytest
import torch
import torch.multiprocessing as mp

from tokenizers_vis.losses.contrastive import ITCObjective, gather_with_local_grad, itc_loss
from tokenizers_vis.models import SEED

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red", "car"]
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def _hand_itc(img, txt, temp, eps):
    """Symmetric label-smoothed cross-entropy, written out with Python floats."""
    n = len(img)
    sim = [[sum(a * b for a, b in zip(img[i], txt[j])) / temp for j in range(n)] for i in range(n)]

    def ce(rows):
        total = 0.0
        for i, row in enumerate(rows):
            logz = math.log(sum(math.exp(v) for v in row))
            logp = [v - logz for v in row]
            total += -(1 - eps) * logp[i] - eps / n * sum(logp)
        return total / n

    return (ce(sim) + ce([list(col) for col in zip(*sim)])) / 2


def test_itc_loss_equals_a_hand_computation_on_three_pairs():
    torch.manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(3, 5), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(3, 5), dim=-1)
    for eps in (0.0, 0.1):
        expected = _hand_itc(img.tolist(), txt.tolist(), 0.07, eps)
        assert itc_loss(img, txt, 0.07, label_smoothing=eps).item() == pytest.approx(expected, rel=1e-5)
    # Matching pairs score lower than shuffled ones.
    assert itc_loss(img, img, 0.07) < itc_loss(img, img.roll(1, 0), 0.07)
    with pytest.raises(ValueError, match="differ in shape"):
        itc_loss(img, txt[:2], 0.07)
    assert gather_with_local_grad(img) is img  # single process: nothing to gather


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return path


def tiny_stage1(vocab_file, seed=0):
    torch.manual_seed(seed)
    return SEED(image_size=28, vit={"patch_size": 7, "width": 16, "depth": 1, "heads": 2, "mlp_ratio": 2.0},
                qformer_width=16, qformer_depth=2, qformer_heads=2, qformer_mlp_dim=32, qformer_dropout=0.0,
                text_branch=True, vocab_size=len(VOCAB) + 1, max_text_positions=12, max_text_len=6, itc_dim=8,
                codebook_size=16, code_dim=4, decode_depth=1, decode_heads=2, image_embed_dim=8, stage=1,
                text_tokenizer=str(vocab_file))


def test_objective_trains_the_query_path_the_text_branch_and_the_temperature(vocab_file):
    tok = tiny_stage1(vocab_file).train()
    objective = ITCObjective()
    batch = {"image": torch.rand(3, 3, 28, 28), "text": ["a red car", "a photo of a cat", "a dog"]}
    loss, logs, output = objective(tok, batch, 0)
    assert torch.isfinite(loss) and logs["loss/total"] == loss.detach()
    assert logs["itc/temp"].item() == pytest.approx(0.07)
    # By hand: the last query's features against the captions' [CLS] features.
    img = output.encoded.extras["itc_image"]
    txt = tok.text_features(batch["text"])
    torch.testing.assert_close(loss, itc_loss(img, txt, tok.temp))
    loss.backward()
    for name in ("temp", "vision_proj.weight", "text_proj.weight", "text_embeddings.word.weight",
                 "qformer.queries.weight", "qformer.blocks.0.cross_attn.k.weight",
                 "qformer.text_blocks.1.mlp.fc1.weight",
                 "ln_vision.weight"):
        grad = dict(tok.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert tok.quantize.embedding.weight.grad is None and tok.visual_encoder.cls_token.grad is None
    # The official clamp of the temperature.
    with torch.no_grad():
        tok.temp.fill_(0.9)
    assert tok.temperature().item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="needs captions"):
        objective(tok, {"image": batch["image"]}, 0)
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        objective(tok, {**batch, "text": batch["text"][:2]}, 0)


def test_itc_training_pulls_matching_pairs_together(vocab_file):
    tok = tiny_stage1(vocab_file, seed=1).train()
    objective = ITCObjective()
    gen = torch.Generator().manual_seed(0)
    colours = {"a red car": (1.0, 0.1, 0.1), "a dog": (0.1, 0.1, 1.0), "a photo of a cat": (0.1, 1.0, 0.1)}
    images = torch.stack([torch.tensor(c).view(3, 1, 1).expand(3, 28, 28) for c in colours.values()])
    batch = {"image": (images + 0.05 * torch.rand(images.shape, generator=gen)).clamp(0, 1), "text": list(colours)}
    opt = torch.optim.Adam([p for p in tok.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(25):
        loss, _, _ = objective(tok, batch, 0)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def _ddp_worker(rank, world, init_file, out_dir, vocab_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tok = tiny_stage1(vocab_file, seed=5).eval()
        images, texts = _ddp_batch()
        half = len(texts) // world
        local = slice(rank * half, (rank + 1) * half)
        img = tok.image_text_features(tok.query_output(tok.pixel_values(images[local])))
        txt = tok.text_features(texts[local])
        img.retain_grad()
        txt.retain_grad()
        loss = itc_loss(img, txt, tok.temperature())
        loss.backward()
        torch.save({"loss": loss.detach(), "img_grad": img.grad, "txt_grad": txt.grad}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _ddp_batch():
    gen = torch.Generator().manual_seed(11)
    texts = ["a red car", "a dog", "a photo of a cat", "a red dog"]
    return torch.rand(4, 3, 28, 28, generator=gen), texts


@pytest.mark.slow
def test_itc_under_two_process_ddp_equals_one_process_on_the_concatenated_batch(tmp_path, vocab_file):
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "pg"), str(tmp_path), str(vocab_file)), nprocs=2,
                       start_method=START_METHOD)
    tok = tiny_stage1(vocab_file, seed=5).eval()
    images, texts = _ddp_batch()
    img = tok.image_text_features(tok.query_output(tok.pixel_values(images)))
    txt = tok.text_features(texts)
    img.retain_grad()
    txt.retain_grad()
    single = itc_loss(img, txt, tok.temperature())
    single.backward()
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(saved["loss"], single.detach(), atol=1e-6, rtol=1e-6)
        # Each rank's gradient reaches exactly its own samples, with the global loss's values.
        torch.testing.assert_close(saved["img_grad"], img.grad[2 * rank: 2 * rank + 2], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(saved["txt_grad"], txt.grad[2 * rank: 2 * rank + 2], atol=1e-6, rtol=1e-5)
