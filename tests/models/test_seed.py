"""SEED built from scratch (tiny random towers): the API, causality, stages, text branch, save/load."""

import pytest
import torch

from tokenizers_vis import load_tokenizer, save_pretrained
from tokenizers_vis.models import SEED, build_tokenizer
from tokenizers_vis.models.seed import STAGES, build_eva_vit
from tokenizers_vis.nn.vision_towers import CLIP_MEAN, CLIP_STD
from tokenizers_vis.nn.weights import MissingWeightsError

TINY_VIT = {"patch_size": 8, "width": 24, "depth": 1, "heads": 2, "mlp_ratio": 2.0}
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red", "blue", "the",
         "##s", "on", "grass"]


def tiny_kwargs(**overrides):
    kwargs = dict(image_size=32, vit=TINY_VIT, qformer_width=24, qformer_depth=2, qformer_heads=2,
                  qformer_mlp_dim=48, qformer_dropout=0.0, num_queries=32, codebook_size=64, code_dim=8,
                  decode_depth=1, image_embed_dim=20, text_branch=True, vocab_size=len(VOCAB) + 1,
                  max_text_positions=16, max_text_len=8, itc_dim=12)
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return path


@pytest.fixture(scope="module")
def tok(vocab_file):
    torch.manual_seed(0)
    return SEED(**tiny_kwargs(text_tokenizer=str(vocab_file))).eval()


def test_encode_gives_32_ids_in_the_codebook_and_the_embedding(tok):
    images = torch.rand(3, 3, 48, 48)
    with torch.no_grad():
        enc = tok.encode(images)
        assert enc.ids.shape == (3, 32) and enc.ids.dtype == torch.long
        assert int(enc.ids.min()) >= 0 and int(enc.ids.max()) < 64
        emb = tok.image_embedding(enc.ids)
        assert emb.shape == (3, 20)
        torch.testing.assert_close(tok.image_embedding(enc), emb, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="token ids must lie in"):
        tok.image_embedding(torch.full((1, 32), 64))
    with pytest.raises(ValueError, match="expected 32 tokens"):
        tok.image_embedding(torch.zeros(1, 31, dtype=torch.long))


def test_the_released_codebook_gives_32_ids_in_0_8192():
    tok = SEED(**tiny_kwargs(codebook_size=8192, code_dim=32, text_branch=False)).eval()
    with torch.no_grad():
        ids = tok.encode(torch.rand(4, 3, 32, 32)).ids
    assert ids.shape == (4, 32) and int(ids.min()) >= 0 and int(ids.max()) < 8192
    assert ids.unique().numel() > 1


def test_inputs_at_the_model_size_are_only_normalised(tok):
    images = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(tok.pixel_values(images), (images - mean) / std)
    big = torch.rand(2, 3, 64, 64)
    resized = torch.nn.functional.interpolate(big, size=(32, 32), mode="bicubic", antialias=True)
    torch.testing.assert_close(tok.pixel_values(big), (resized - mean) / std)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tok.encode(torch.rand(2, 1, 32, 32))


@pytest.mark.parametrize("k", [0, 7, 31])
def test_changing_a_later_query_never_changes_earlier_outputs(tok, k):
    pixels = tok.pixel_values(torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        base = tok.query_output(pixels)
        queries = tok.qformer.queries(2).clone()
        queries[:, k] += torch.randn(24) * 3
        probed = tok.query_output(pixels, queries=queries)
    assert torch.equal(probed[:, :k], base[:, :k])
    assert (probed[:, k:] - base[:, k:]).abs().amax(-1).min() > 1e-4
    # And through the ids: the first k tokens do not depend on later queries either.
    _, _, ids_base, _ = tok.quantize_queries(base)
    _, _, ids_probe, _ = tok.quantize_queries(probed)
    assert torch.equal(ids_base[:, :k], ids_probe[:, :k])


def test_text_features_from_a_local_vocab(tok, vocab_file):
    tokens = tok.tokenize(["a photo of a cat", "the red dogs on grass"])
    assert tokens["input_ids"].shape == (2, 8)
    assert tokens["input_ids"][:, 0].tolist() == [VOCAB.index("[CLS]")] * 2
    assert tokens["attention_mask"][0].tolist() == [1] * 7 + [0]  # [CLS] 5 words [SEP] [PAD]
    with torch.no_grad():
        feats = tok.text_features(["a photo of a cat", "the red dogs on grass"])
        assert feats.shape == (2, 12)
        torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2))
        # Padding is masked: the same caption alone or beside a longer one encodes the same.
        alone = tok.text_features(["a photo of a cat"])
    torch.testing.assert_close(alone[0], feats[0], atol=1e-6, rtol=1e-6)
    # The [DEC] token BLIP-2 adds is the extra id of vocab_size.
    from tokenizers_vis.models.seed import load_bert_tokenizer

    assert load_bert_tokenizer(str(vocab_file)).bos_token_id == len(VOCAB)


def test_text_tokenizer_from_a_folder_and_clear_errors(tmp_path, vocab_file):
    from transformers import BertTokenizer

    BertTokenizer(str(vocab_file)).save_pretrained(tmp_path / "bert")
    tok = SEED(**tiny_kwargs(text_tokenizer=str(tmp_path / "bert"))).eval()
    assert tok.tokenize(["a cat"])["input_ids"][0, :4].tolist() == [2, 5, 8, 3]
    bad = SEED(**tiny_kwargs(text_tokenizer=str(tmp_path / "absent")))
    with pytest.raises(MissingWeightsError, match="text_tokenizer"):
        bad.tokenize(["a cat"])
    released = SEED(**tiny_kwargs(text_branch=False))
    with pytest.raises(ValueError, match="no text branch"):
        released.text_features(["a cat"])


def test_stages_say_what_trains():
    stage1 = SEED(**tiny_kwargs(stage=1))
    trainable = {name.split(".")[0] for name, p in stage1.named_parameters() if p.requires_grad}
    assert trainable == set(STAGES[1])
    stage2 = SEED(**tiny_kwargs(stage=2, image_head="reverse_qformer", reverse_qformer_depth=1))
    trainable = {name.split(".")[0] for name, p in stage2.named_parameters() if p.requires_grad}
    assert trainable == set(STAGES[2]) - {"image_down"}
    assert not any(p.requires_grad for p in stage2.visual_encoder.parameters())
    stage2.train()
    assert not stage2.qformer.training and not stage2.visual_encoder.training and stage2.blocks.training
    with pytest.raises(ValueError, match="needs text_branch=True"):
        SEED(**tiny_kwargs(stage=1, text_branch=False))


def test_stage2_forward_gives_the_training_targets():
    tok = SEED(**tiny_kwargs(stage=2)).train()
    out = tok(torch.rand(2, 3, 32, 32))
    extras = out.encoded.extras
    assert extras["recon_qformer"].shape == extras["query_output"].shape == (2, 32, 24)
    assert extras["image_embedding"].shape == (2, 20)
    z, q = extras["codebook_input"], out.encoded.latents
    # The legacy loss: mse(sg(z_q), z) + 0.25 mse(z_q, sg(z)) = 1.25 mse.
    torch.testing.assert_close(out.aux_loss, 1.25 * torch.nn.functional.mse_loss(q.detach(), z.detach()))
    assert out.reconstruction is None  # SEED trains no pixel path; no fake image for a pixel loss
    (out.aux_loss + extras["image_embedding"].sum() + extras["recon_qformer"].sum()).backward()
    assert tok.encode_task_layer[0].weight.grad is not None and tok.quantize.embedding.weight.grad is not None
    assert all(p.grad is None for p in tok.qformer.parameters())


def test_save_and_load_round_trip_bit_for_bit(tmp_path, tok):
    folder = save_pretrained(tok, tmp_path / "seed")
    loaded = load_tokenizer(folder)
    assert isinstance(loaded, SEED) and loaded.config == tok.config
    for (name, a), b in zip(tok.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    rebuilt = build_tokenizer(tok.config)
    assert tok.config["text_tokenizer"] == VOCAB  # a local vocab file is recorded by its entries
    captions = ["the red dogs on grass", "a photo of a cat"]
    assert torch.equal(rebuilt.tokenize(captions)["input_ids"], tok.tokenize(captions)["input_ids"])
    with torch.no_grad():
        assert torch.equal(loaded.text_features(captions), tok.text_features(captions))


def test_vit_weights_from_a_local_file_and_missing_ones(tmp_path):
    torch.manual_seed(3)
    eva = build_eva_vit(32, **TINY_VIT)
    # BLIP-2's file: bare names, plus a 40th block the 39-block tower drops.
    state = {**eva.state_dict(), "blocks.1.norm1.weight": torch.ones(24)}
    torch.save(state, tmp_path / "eva_vit_g.pth")
    tok = SEED(**tiny_kwargs(vit={**TINY_VIT, "pretrained": str(tmp_path / "eva_vit_g.pth")}))
    for name, tensor in eva.state_dict().items():
        assert torch.equal(tok.visual_encoder.state_dict()[name], tensor), name
    assert tok.config["vit"]["pretrained"] is None  # the weights travel in the state dict
    with pytest.raises(MissingWeightsError, match="model.tokenizer.vit.pretrained"):
        SEED(**tiny_kwargs(vit={**TINY_VIT, "pretrained": str(tmp_path / "absent.pth")}))
    torch.save({"cls_token": torch.zeros(1, 1, 24)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lacks .* entries of the EVA ViT"):
        SEED(**tiny_kwargs(vit={**TINY_VIT, "pretrained": str(tmp_path / "partial.pth")}))
