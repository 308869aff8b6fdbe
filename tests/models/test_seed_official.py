"""Our SEED against the official SEED-2 tokenizer: shared/reference/seed (random weights, official outputs),
and fresh random official-layout models of other sizes drawn here, checked against a plain functional
implementation of the official computation (written from the fixture README's conventions: separate
BERT q/k/v, the additive -10000 causal mask, the legacy VQ), not from our modules.

Tolerances are the fixture README's: floats atol = rtol = 1e-4 (2e-4 on codebook distances), ids exact,
causal probe rows before j equal to float32 rounding.
"""

import functools
import json
import math
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import reference_path
from safetensors.torch import load_file

from tokenizers_vis import load_tokenizer
from tokenizers_vis.models.official import find_official_format
from tokenizers_vis.models.seed import SEED
from tokenizers_vis.models.seed_official import (
    ARGS_NAME,
    QUANTIZER_NAME,
    RELEASED_ARGS,
    VIT_NAME,
    build_from_args,
    convert_official_state,
    load_converted,
    official_state_dict,
    save_official_seed,
)

CASES = ("tiny", "tiny_reverse_qformer")
ATOL = RTOL = 1e-4
DIST_ATOL = 2e-4


@pytest.fixture(scope="module")
def fixture_dir():
    from helpers import SHARED

    return reference_path(SHARED, "seed", "tiny.safetensors").parent


def _split(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@functools.cache
def _case(fixture_dir: Path, case: str):
    """(official-layout folder, state, vit state, stage-1 state, io, json, our loaded model)."""
    tensors = load_file(str(fixture_dir / f"{case}.safetensors"))
    meta = json.loads((fixture_dir / f"{case}.json").read_text())
    state, vit = _split(tensors, "state_dict."), _split(tensors, "vit_state_dict.visual_encoder.")
    stage1, io = _split(tensors, "stage1_state_dict."), _split(tensors, "io.")
    folder = Path(tempfile.mkdtemp(prefix=f"seed_{case}_"))
    args = {k: meta[k] for k in ("constructor_kwargs", "qformer_bert_config", "reverse_qformer_bert_config",
                                 "eva_vit_config")}
    (folder / ARGS_NAME).write_text(json.dumps(args))
    torch.save(state, folder / QUANTIZER_NAME)
    torch.save(vit, folder / VIT_NAME)
    return folder, state, vit, stage1, io, meta, load_tokenizer(folder)


@pytest.fixture(scope="module", params=CASES)
def case(request, fixture_dir):
    return _case(fixture_dir, request.param)


def _close(ours, ref, atol=ATOL, rtol=RTOL):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    torch.testing.assert_close(ours.float(), ref.float(), atol=atol, rtol=rtol)


def test_the_folder_is_recognised_and_loads_strictly_and_writes_back_bit_for_bit(case):
    folder, state, vit, _, _, meta, tok = case
    assert find_official_format(folder).name == "seed"
    assert isinstance(tok, SEED) and not tok.training
    assert tok.image_head == ("reverse_qformer" if meta["constructor_kwargs"]["use_qformer_image"] else "mlp")
    assert tok.dropped_official_keys == ()
    args = json.loads((folder / ARGS_NAME).read_text())
    back, back_vit = official_state_dict(tok, args["qformer_bert_config"]["max_position_embeddings"],
                                         (args["reverse_qformer_bert_config"] or {}).get("max_position_embeddings"))
    for ours, official in ((back, state), (back_vit, vit)):
        assert sorted(ours) == sorted(official)
        for name, tensor in official.items():
            assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def test_saving_to_the_official_layout_round_trips(case, tmp_path):
    folder, state, vit, *_ = case
    args = json.loads((folder / ARGS_NAME).read_text())
    save_official_seed(case[-1], tmp_path, args)
    saved = torch.load(tmp_path / QUANTIZER_NAME, weights_only=True)
    saved_vit = torch.load(tmp_path / VIT_NAME, weights_only=True)
    assert sorted(saved) == sorted(state) and all(torch.equal(saved[k], state[k]) for k in state)
    assert sorted(saved_vit) == sorted(vit) and all(torch.equal(saved_vit[k], vit[k]) for k in vit)
    reloaded = load_tokenizer(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), case[-1].state_dict().values()))


@torch.no_grad()
def test_every_saved_output_is_reproduced(case):
    *_, io, meta, tok = case
    x = io["image"]  # already normalised: the model's internal input
    vit = tok.vit_features(x)
    _close(vit, io["vit_features"])
    _close(tok.ln_vision(vit), io["qformer_image_embeds"])
    query_output = tok.query_output(x)
    _close(query_output, io["query_output"])
    z, quantized, ids, aux = tok.quantize_queries(query_output)
    _close(z, io["codebook_input"])
    _close(tok.codebook_distances(z), io["codebook_distances"], atol=DIST_ATOL, rtol=DIST_ATOL)
    assert torch.equal(ids, io["token_ids"])
    _close(quantized, io["quantized"])
    _close(aux["loss"], io["vq_loss"])
    up = tok.quantized_up(quantized)
    _close(up, io["quantized_up"])
    recon = tok.reconstruct_queries(up)
    _close(recon, io["recon_qformer"])
    _close((1 - F.cosine_similarity(recon, query_output, dim=-1)).mean(), io["recon_loss"])
    trunk = tok.image_blocks(up)
    _close(trunk, io["image_blocks_output"])
    head = "image_down_output" if "image_down_output" in io else "reverse_qformer_output"
    _close(tok.image_head_output(trunk), io[head])
    _close(tok.embedding_from_trunk(trunk), io["image_embedding"])
    # The decode path SEED-LLaMA uses: ids only.
    _close(tok.quantize.embed(io["token_ids"]), io["quantized_from_ids"])
    _close(tok.image_blocks(tok.quantized_up(io["token_ids"])), io["image_blocks_output_from_ids"])
    _close(tok.image_embedding(io["token_ids"]), io["image_embedding_from_ids"])
    _close(tok.image_embedding(io["random_ids"]), io["random_ids_image_embedding"])


@torch.no_grad()
def test_the_causal_probe(case):
    *_, io, _, tok = case
    j = int(io["causal_probe_index"])
    queries = tok.qformer.queries(2).clone()
    queries[:, j] += io["causal_probe_delta"]
    probed = tok.query_output(io["image"], queries=queries)
    _close(probed, io["causal_probe_query_output"])
    reference = tok.query_output(io["image"])
    torch.testing.assert_close(probed[:, :j], io["query_output"][:, :j], atol=1e-5, rtol=0)
    assert torch.equal(probed[:, :j], reference[:, :j])  # ours: exactly unchanged
    assert (probed[:, j:] - reference[:, j:]).abs().amax(-1).min() > 1e-3  # every later row moves


@torch.no_grad()
def test_stage1_text_encoding_and_itc(fixture_dir):
    folder, state, vit, stage1, io, meta, _ = _case(fixture_dir, "tiny")
    itc = meta["stage1_itc"]
    tok = build_from_args(json.loads((folder / ARGS_NAME).read_text()), text_branch=True, stage=1,
                          vocab_size=itc["vocab_size_after_resize"], itc_dim=itc["embed_dim"]).eval()
    converted, dropped = convert_official_state({**state, **stage1}, vit)
    assert load_converted(tok, converted, "stage 1") == []
    assert dropped and all(name.startswith("cls.") for name in dropped)  # only the unused LM head
    tokens = {"input_ids": io["text_input_ids"], "attention_mask": io["text_attention_mask"]}
    _close(tok.text_hidden_states(**tokens), io["text_last_hidden_state"])
    query_output = tok.query_output(io["image"])
    _close(F.normalize(tok.vision_proj(query_output), dim=-1), io["itc_image_feats_all_queries"])
    image_feat, text_feat = tok.image_text_features(query_output), tok.text_features(tokens)
    _close(image_feat, io["itc_image_feat"])
    _close(text_feat, io["itc_text_feat"])
    assert tok.temperature().item() == pytest.approx(itc["temp"])
    sim = image_feat @ text_feat.t() / tok.temperature()
    _close(sim, io["itc_sim_i2t"])
    _close(sim.t(), io["itc_sim_t2i"])
    from tokenizers_vis.losses.contrastive import itc_loss

    _close(itc_loss(image_feat, text_feat, tok.temperature(), label_smoothing=itc["label_smoothing"]),
           io["itc_loss"])


def test_full_size_model_has_the_released_names_and_shapes(fixture_dir):
    """Built on the meta device: our full-size released SEED, written in the official layout, has
    exactly the 370 + 511 official names and shapes; the reverse variants' changes as listed."""
    keys = json.loads((fixture_dir / "full_size_keys.json").read_text())
    with torch.device("meta"):
        tok = build_from_args(RELEASED_ARGS)
    assert tok.config["unclip"] == {"pretrained": "stabilityai/stable-diffusion-2-1-unclip"}  # built on decode
    quantizer, vit = official_state_dict(tok)
    expected = {name: shape for name, shape, _ in keys["released_seed_quantizer"]}
    assert {k: list(v.shape) for k, v in quantizer.items()} == expected
    assert {f"visual_encoder.{k}": list(v.shape) for k, v in vit.items()} == \
        {name: shape for name, shape, _ in keys["eva_vit_g"]}
    assert quantizer["Qformer.bert.embeddings.position_ids"].dtype == torch.int64
    for variant, depth in (("reverse_qformer_variant_12_layers", 12), ("reverse_qformer_variant_4_layers", 4)):
        change = keys[variant]
        args = json.loads(json.dumps(RELEASED_ARGS))
        args["constructor_kwargs"]["use_qformer_image"] = True
        args["reverse_qformer_bert_config"] = {**args["qformer_bert_config"], "num_hidden_layers": depth,
                                               "encoder_width": 768, "query_length": 1}
        with torch.device("meta"):
            rev, _ = official_state_dict(build_from_args(args))
        shapes = {k: list(v.shape) for k, v in rev.items()}
        assert set(expected) - set(shapes) == set(change["removed"])
        assert {k: shapes[k] for k in set(shapes) - set(expected)} == {n: s for n, s, _ in change["added"]}
        for name, _, new in change["shape_changed"]:
            assert shapes[name] == new


def test_the_real_file_drops_unknown_entries_but_needs_every_known_one(case, tmp_path):
    folder, state, vit, *_ = case
    import shutil

    shutil.copy(folder / ARGS_NAME, tmp_path / ARGS_NAME)
    torch.save({**vit, "blocks.99.attn.qkv.weight": torch.zeros(1)}, tmp_path / VIT_NAME)
    torch.save({"model": {**state, "ignored.by.official": torch.zeros(3)}}, tmp_path / QUANTIZER_NAME)
    with pytest.warns(UserWarning, match="dropped 2 entries"):
        tok = load_tokenizer(tmp_path)
    assert set(tok.dropped_official_keys) == {"ignored.by.official", "visual_encoder.blocks.99.attn.qkv.weight"}
    torch.save({k: v for k, v in state.items() if k != "quantize.embedding.weight"}, tmp_path / QUANTIZER_NAME)
    with pytest.raises(ValueError, match="lacks 1 entries.*quantize.embedding.weight"):
        load_tokenizer(tmp_path)
    wrong = dict(state)
    wrong["quantize.embedding.weight"] = torch.zeros(5, 5)
    torch.save(wrong, tmp_path / QUANTIZER_NAME)
    with pytest.raises(ValueError, match="does not match the SEED"):
        load_tokenizer(tmp_path)


def test_released_preset_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(OSError, match="could not fetch the released SEED tokenizer"):
        load_tokenizer("seed-tokenizer-2")


# -- fresh random official-layout models of other sizes ----------------------------------------------
def _bert_keys(prefix: str, cfg: dict, text: bool) -> dict:
    """Official names and shapes of a (pruned or full) Q-Former BERT."""
    h, inter, enc = cfg["hidden_size"], cfg["intermediate_size"], cfg["encoder_width"]
    keys = {f"{prefix}bert.embeddings.LayerNorm.weight": (h,), f"{prefix}bert.embeddings.LayerNorm.bias": (h,)}
    if text:
        keys[f"{prefix}bert.embeddings.word_embeddings.weight"] = (cfg["vocab_size"], h)
        keys[f"{prefix}bert.embeddings.position_embeddings.weight"] = (cfg["max_position_embeddings"], h)
    for i in range(cfg["num_hidden_layers"]):
        layer = f"{prefix}bert.encoder.layer.{i}."
        subs = ["attention"] + (["crossattention"] if i % cfg["cross_attention_freq"] == 0 else [])
        for sub in subs:
            width = enc if sub == "crossattention" else h
            for proj in ("query", "key", "value"):
                keys[f"{layer}{sub}.self.{proj}.weight"] = (h, h if proj == "query" else width)
                keys[f"{layer}{sub}.self.{proj}.bias"] = (h,)
            keys[f"{layer}{sub}.output.dense.weight"], keys[f"{layer}{sub}.output.dense.bias"] = (h, h), (h,)
            keys[f"{layer}{sub}.output.LayerNorm.weight"] = keys[f"{layer}{sub}.output.LayerNorm.bias"] = (h,)
        for suffix in (["_query"] + ([""] if text else [])):
            keys[f"{layer}intermediate{suffix}.dense.weight"] = (inter, h)
            keys[f"{layer}intermediate{suffix}.dense.bias"] = (inter,)
            keys[f"{layer}output{suffix}.dense.weight"], keys[f"{layer}output{suffix}.dense.bias"] = (h, inter), (h,)
            keys[f"{layer}output{suffix}.LayerNorm.weight"] = keys[f"{layer}output{suffix}.LayerNorm.bias"] = (h,)
    return keys


def _official_shapes(args: dict) -> tuple[dict, dict]:
    kw, bert, eva = args["constructor_kwargs"], args["qformer_bert_config"], args["eva_vit_config"]
    h, n, w = bert["hidden_size"], kw["num_query_token"], eva["embed_dim"]
    mlp = int(w * eva["mlp_ratio"])
    vit = {"cls_token": (1, 1, w), "pos_embed": (1, (eva["img_size"] // eva["patch_size"]) ** 2 + 1, w),
           "patch_embed.proj.weight": (w, 3, eva["patch_size"], eva["patch_size"]), "patch_embed.proj.bias": (w,)}
    for i in range(eva["depth"]):
        b = f"blocks.{i}."
        vit.update({b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "attn.q_bias": (w,), b + "attn.v_bias": (w,),
                    b + "attn.qkv.weight": (3 * w, w), b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
                    b + "norm2.weight": (w,), b + "norm2.bias": (w,), b + "mlp.fc1.weight": (mlp, w),
                    b + "mlp.fc1.bias": (mlp,), b + "mlp.fc2.weight": (w, mlp), b + "mlp.fc2.bias": (w,)})
    d, k = kw["codebook_embed_dim"], kw["n_embed"]
    q = {"query_tokens": (1, n, h), "pos_embed": (1, n, h), "pos_embed_image": (1, n, h), "ln_vision.weight": (w,),
         "ln_vision.bias": (w,), "quantize.embedding.weight": (k, d), "encode_task_layer.0.weight": (h, h),
         "encode_task_layer.0.bias": (h,), "encode_task_layer.2.weight": (d, h), "encode_task_layer.2.bias": (d,),
         "decode_task_layer.0.weight": (d, d), "decode_task_layer.0.bias": (d,), "decode_task_layer.2.weight": (h, d),
         "decode_task_layer.2.bias": (h,)}
    q.update(_bert_keys("Qformer.", bert, text=False))
    for stack in ("blocks", "blocks_image"):
        for i in range(kw["decode_depth"]):
            b = f"{stack}.{i}."
            q.update({b + "norm1.weight": (h,), b + "norm1.bias": (h,), b + "attn.qkv.weight": (3 * h, h),
                      b + "attn.qkv.bias": (3 * h,), b + "attn.proj.weight": (h, h), b + "attn.proj.bias": (h,),
                      b + "norm2.weight": (h,), b + "norm2.bias": (h,), b + "mlp.fc1.weight": (4 * h, h),
                      b + "mlp.fc1.bias": (4 * h,), b + "mlp.fc2.weight": (h, 4 * h), b + "mlp.fc2.bias": (h,)})
    e = kw["image_features_dim"]
    if kw["use_qformer_image"]:
        q.update(_bert_keys("Reverse_Qformer.", args["reverse_qformer_bert_config"], text=False))
        q.update({"reverse_tokens": (1, 1, h), "distill_image_proj.weight": (e, h), "distill_image_proj.bias": (e,)})
    else:
        q.update({"image_down.0.weight": (256, h), "image_down.2.weight": (128, 256), "image_down.4.weight": (32, 128),
                  "distill_image_proj.weight": (e, 1024), "distill_image_proj.bias": (e,)})
    return q, vit


def _draw(shapes: dict, generator: torch.Generator) -> dict:
    """Non-trivial random values, as the fixtures draw them (norm weights near 1, biases ~0.1)."""
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=generator)
        if "LayerNorm.weight" in name or "norm" in name and name.endswith("weight") and len(shape) == 1:
            t = 1 + 0.15 * t
        elif name.endswith("bias") or name.endswith("_bias"):
            t = 0.1 * t
        elif name in ("query_tokens", "reverse_tokens"):
            pass
        elif name.endswith(("pos_embed", "pos_embed_image", "cls_token")):
            t = 0.5 * t
        else:
            t = t / math.sqrt(max(1, math.prod(shape[1:])))
        out[name] = t
    return out


def _ln(x, sd, key, eps):
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)


def _lin(x, sd, key, bias=True):
    return F.linear(x, sd[key + ".weight"], sd.get(key + ".bias") if bias else None)


def _softmax_attention(q, k, v, heads, additive=None):
    b, lq, c = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if additive is not None:
        scores = scores + additive
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, c)


def _ref_vit(x, sd, cfg):
    w = cfg["embed_dim"]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=cfg["patch_size"])
    t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t.flatten(2).transpose(1, 2)], 1) + sd["pos_embed"]
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        h = _ln(t, sd, b + "norm1", 1e-6)
        bias = torch.cat([sd[b + "attn.q_bias"], torch.zeros(w), sd[b + "attn.v_bias"]])
        q, k, v = F.linear(h, sd[b + "attn.qkv.weight"], bias).chunk(3, dim=-1)
        t = t + _lin(_softmax_attention(q, k, v, cfg["num_heads"]), sd, b + "attn.proj")
        t = t + _lin(F.gelu(_lin(_ln(t, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    return t


def _ref_bert(query, enc, sd, prefix, cfg, causal):
    eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    x = _ln(query, sd, prefix + "bert.embeddings.LayerNorm", eps)
    n = x.shape[1]
    additive = (1 - torch.ones(n, n).tril()) * -10000.0 if causal else None
    for i in range(cfg["num_hidden_layers"]):
        layer = f"{prefix}bert.encoder.layer.{i}."

        def attention(h, ctx, sub, mask):
            s = f"{layer}{sub}.self."
            out = _softmax_attention(_lin(h, sd, s + "query"), _lin(ctx, sd, s + "key"), _lin(ctx, sd, s + "value"),
                                     heads, mask)
            return _ln(_lin(out, sd, f"{layer}{sub}.output.dense") + h, sd, f"{layer}{sub}.output.LayerNorm", eps)

        x = attention(x, x, "attention", additive)
        if i % cfg["cross_attention_freq"] == 0:
            x = attention(x, enc, "crossattention", None)
        ffn = F.gelu(_lin(x, sd, layer + "intermediate_query.dense"))
        x = _ln(_lin(ffn, sd, layer + "output_query.dense") + x, sd, layer + "output_query.LayerNorm", eps)
    return x


def _ref_blocks(x, sd, stack, depth):
    for i in range(depth):
        b = f"{stack}.{i}."
        q, k, v = _lin(_ln(x, sd, b + "norm1", 1e-6), sd, b + "attn.qkv").chunk(3, dim=-1)
        x = x + _lin(_softmax_attention(q, k, v, 12), sd, b + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    return x


def _ref_tokenizer(images, sd, vit_sd, args):
    """The official SEED-2 computation on official names: ids and the image embedding."""
    kw, bert = args["constructor_kwargs"], args["qformer_bert_config"]
    feats = F.layer_norm(_ref_vit(images, vit_sd, args["eva_vit_config"]), (args["eva_vit_config"]["embed_dim"],),
                         sd["ln_vision.weight"], sd["ln_vision.bias"], 1e-5)
    n = kw["num_query_token"]
    query = _ref_bert(sd["query_tokens"].expand(images.shape[0], -1, -1), feats, sd, "Qformer.", bert, causal=n == 32)
    z = _lin(torch.tanh(_lin(query, sd, "encode_task_layer.0")), sd, "encode_task_layer.2")
    z = z.reshape(-1, kw["codebook_embed_dim"])
    codes = sd["quantize.embedding.weight"]
    dist = z.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * z @ codes.t()
    ids = dist.argmin(1).reshape(images.shape[0], n)
    up = _lin(torch.tanh(_lin(codes[ids], sd, "decode_task_layer.0")), sd, "decode_task_layer.2")
    recon = _ref_blocks(up + sd["pos_embed"], sd, "blocks", kw["decode_depth"])
    trunk = _ref_blocks(up + sd["pos_embed_image"], sd, "blocks_image", kw["decode_depth"])
    if kw["use_qformer_image"]:
        out = _ref_bert(sd["reverse_tokens"].expand(images.shape[0], -1, -1), trunk, sd, "Reverse_Qformer.",
                        args["reverse_qformer_bert_config"], causal=False)
    else:
        h = F.relu(F.linear(trunk, sd["image_down.0.weight"]))
        out = F.linear(F.relu(F.linear(h, sd["image_down.2.weight"])), sd["image_down.4.weight"])
    embedding = F.linear(out.flatten(1), sd["distill_image_proj.weight"], sd["distill_image_proj.bias"])
    margin = dist.sort(1).values
    return {"query_output": query, "ids": ids, "recon": recon, "embedding": embedding,
            "margin": (margin[:, 1] - margin[:, 0]).min()}


SIZES = [
    # (image, patch, vit width/depth/heads, hidden/layers/heads/ffn, cross freq, queries, codebook, code dim,
    #  decode depth, embed dim, reverse depth or None)
    (42, 14, 24, 1, 2, 36, 2, 3, 96, 1, 32, 64, 8, 1, 20, None),
    (28, 14, 32, 3, 4, 24, 4, 2, 64, 2, 32, 200, 12, 3, 16, 3),
    (28, 7, 16, 2, 2, 24, 2, 2, 48, 1, 8, 50, 4, 1, 12, 2),  # 8 queries: bidirectional (reverse head:
    # the released head's flatten is hard-wired to 32 x 32)
]


def _random_args(size) -> dict:
    img, patch, vw, vd, vh, h, layers, heads, ffn, freq, n, k, d, depth, e, rev = size
    bert = {"vocab_size": 50, "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": ffn, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "max_position_embeddings": 24,
            "encoder_width": vw, "cross_attention_freq": freq, "query_length": n}
    return {
        "constructor_kwargs": {"img_size": img, "num_query_token": n, "cross_attention_freq": freq, "embed_dim": 8,
                               "codebook_embed_dim": d, "n_embed": k, "recon_s": True, "blocks_for_image": True,
                               "decode_depth": depth, "use_recon_s_for_image": False,
                               "use_qformer_image": rev is not None, "image_features_dim": e},
        "qformer_bert_config": bert,
        "reverse_qformer_bert_config": ({**bert, "num_hidden_layers": rev, "encoder_width": h, "query_length": 1}
                                        if rev else None),
        "eva_vit_config": {"img_size": img, "patch_size": patch, "embed_dim": vw, "depth": vd, "num_heads": vh,
                           "mlp_ratio": 4.3637},
    }


@pytest.mark.parametrize("size", SIZES, ids=["vq64_mlp", "reverse3_cb200", "8_queries"])
@torch.no_grad()
def test_fresh_random_official_models_of_other_sizes(size, tmp_path):
    args = _random_args(size)
    quantizer_shapes, vit_shapes = _official_shapes(args)
    gen = torch.Generator().manual_seed(sum(size[:-1]))
    state, vit = _draw(quantizer_shapes, gen), _draw(vit_shapes, gen)
    # The codebook near the codebook inputs, so ids are diverse (as the fixtures draw it).
    images = torch.randn(3, 3, args["eva_vit_config"]["img_size"], args["eva_vit_config"]["img_size"], generator=gen)
    state["quantize.embedding.weight"] *= 0.5
    reference = _ref_tokenizer(images, state, vit, args)
    assert reference["margin"] > 1e-4  # no near-ties: ids are well defined in float32
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(24)[None]
    if size[-1]:
        state["Reverse_Qformer.bert.embeddings.position_ids"] = torch.arange(24)[None]
    (tmp_path / ARGS_NAME).write_text(json.dumps(args))
    torch.save(state, tmp_path / QUANTIZER_NAME)
    torch.save(vit, tmp_path / VIT_NAME)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped
        tok = load_tokenizer(tmp_path)
    assert tok.qformer.causal_queries == (size[10] == 32)
    query_output = tok.query_output(images)
    _close(query_output, reference["query_output"])
    _, quantized, ids, _ = tok.quantize_queries(query_output)
    assert torch.equal(ids, reference["ids"])
    assert ids.shape == (3, size[10]) and int(ids.min()) >= 0 and int(ids.max()) < size[11]
    _close(tok.reconstruct_queries(tok.quantized_up(ids)), reference["recon"])
    _close(tok.image_embedding(ids), reference["embedding"])
    back, back_vit = official_state_dict(tok, 24, 24)
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert sorted(back_vit) == sorted(vit) and all(torch.equal(back_vit[k], vit[k]) for k in vit)


@torch.no_grad()
def test_stage1_starts_from_a_blip2_checkpoint_in_lavis_layout(fixture_dir, tmp_path):
    """A LAVIS-layout BLIP-2 file (under "model", with the ViT, an ITM head and the LM head) supplies
    the Q-Former, text branch, projections and temperature through the ITC objective's hook."""
    from tokenizers_vis.losses.contrastive import ITCObjective

    folder, state, vit, stage1, io, meta, _ = _case(fixture_dir, "tiny")
    itc = meta["stage1_itc"]
    lavis = {**stage1, "ln_vision.weight": state["ln_vision.weight"], "ln_vision.bias": state["ln_vision.bias"],
             **{f"visual_encoder.{k}": v for k, v in vit.items()}, "itm_head.weight": torch.zeros(2, 48)}
    torch.save({"model": lavis}, tmp_path / "blip2_pretrained.pth")
    tok = build_from_args(json.loads((folder / ARGS_NAME).read_text()), text_branch=True, stage=1,
                          vocab_size=itc["vocab_size_after_resize"], itc_dim=itc["embed_dim"])
    weights = ITCObjective(qformer_init=str(tmp_path / "blip2_pretrained.pth")).initial_weights(tok)
    assert "itm_head.weight" not in weights and not any(k.startswith("cls.") for k in weights)
    assert tok.load_state_dict(weights, strict=False).unexpected_keys == []
    tok.eval()
    tokens = {"input_ids": io["text_input_ids"], "attention_mask": io["text_attention_mask"]}
    _close(tok.text_hidden_states(**tokens), io["text_last_hidden_state"])
    _close(tok.query_output(io["image"]), io["query_output"])
    assert ITCObjective().initial_weights(tok) == {}
    torch.save({"model": {k: v for k, v in lavis.items() if "layer.1." not in k}}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lacks .* Q-Former entries"):
        ITCObjective(qformer_init=str(tmp_path / "partial.pth")).initial_weights(tok)
