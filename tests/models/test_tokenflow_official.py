"""Our TokenFlow against the official one: shared/reference/tokenflow (random weights, official outputs).

Tolerances are the fixture README's: ids exact, pixel reconstructions atol 1e-4, the rest 2e-5.
"""

import functools
import json
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import reference_path
from safetensors.torch import load_file

from tokenizers_vis import load_tokenizer
from tokenizers_vis.models.tokenflow import TokenFlow
from tokenizers_vis.models.tokenflow_official import (
    ARGS_NAME,
    WEIGHTS_NAME,
    official_state_dict,
    save_official_tokenflow,
    tokenflow_config,
)

CASES = ("tiny_clipb", "tiny_clipb_enhanced", "tiny_siglip")
PIXEL_ATOL, ATOL = 1e-4, 2e-5


@pytest.fixture
def fixture_dir(shared_dir):
    return reference_path(shared_dir, "tokenflow", "tiny_clipb.safetensors").parent


@functools.cache
def _case(fixture_dir: Path, case: str):
    """(folder in the official layout, official state, io tensors, fixture json, our loaded model)."""
    tensors = load_file(str(fixture_dir / f"{case}.safetensors"))
    state = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    io = {k[len("io."):]: v for k, v in tensors.items() if k.startswith("io.")}
    meta = json.loads((fixture_dir / f"{case}.json").read_text())
    folder = Path(tempfile.mkdtemp(prefix=f"tokenflow_{case}_"))
    (folder / ARGS_NAME).write_text(json.dumps({**meta["model_args"], "overrides": meta["tiny_overrides"]}))
    torch.save({"model": state}, folder / WEIGHTS_NAME)  # the official checkpoints keep it under "model"
    return folder, state, io, meta, load_tokenizer(folder)


@pytest.fixture(params=CASES)
def case(request, fixture_dir):
    return _case(fixture_dir, request.param)


def _images01(io):
    return (io["input.images"] + 1) / 2  # the fixtures feed [-1, 1]; our API takes [0, 1]


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def test_load_tokenizer_recognises_the_folder_and_loads_strictly(case):
    folder, state, _, meta, tok = case
    assert isinstance(tok, TokenFlow) and not tok.training
    assert tok.num_tokens == meta["checks"]["num_ids"]
    assert tok.scales == meta["tiny_overrides"]["scale_rq_layers"]
    # The inverse mapping gives back exactly the official state dict: every name, shape and value.
    back = official_state_dict(tok)
    assert sorted(back) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


@torch.no_grad()
def test_encode_matches_the_official_features_and_ids(case):
    _, _, io, meta, tok = case
    images = _images01(io)
    if "encode.sem_input" in io:  # SigLIP: its scaling layer amounts to a clamp
        assert _max_diff(tok.semantic_input(images), io["encode.sem_input"]) < ATOL
        assert _max_diff(tok.pixel_input(images), io["encode.pix_input"]) < ATOL
    tokens = tok.semantic_encoder(tok.semantic_input(images), grid=tok.grid)
    assert _max_diff(tokens, io["encode.sem_tokens"]) < ATOL
    assert _max_diff(tok.encoder(tok.pixel_input(images)), io["encode.pix_encoder_out"]) < ATOL
    assert _max_diff(tok.features(images), io["encode.h"]) < ATOL
    encoded = tok.encode(images)
    assert torch.equal(encoded.ids, io["encode.ids"])
    quant = tok.quantized_from(encoded)
    assert _max_diff(quant, io["encode.quant"]) < ATOL
    for k, (s, start, count) in enumerate(tok.id_layout()):
        assert torch.equal(encoded.ids[:, start:start + count], io[f"quant.scale{k}.ids"]), (k, s)


@torch.no_grad()
def test_decode_matches_the_official_semantic_and_pixel_outputs(case):
    _, _, io, _, tok = case
    quant = io["encode.quant"]
    assert _max_diff(tok.semantic_decoder(quant[:, :32]), io["decode.sem_tokens"]) < ATOL
    assert _max_diff(tok.decode_semantic(quant), io["decode.sem"]) < ATOL
    assert _max_diff(tok.post_quant_conv(quant[:, 32:]), io["decode.pix_post_quant"]) < ATOL
    assert _max_diff(tok.decode_pixels(quant), io["decode.pix"]) < PIXEL_ATOL
    # forward = decode(encode(x)), on our [0, 1] scale
    output = tok(_images01(io))
    assert _max_diff(output.reconstruction * 2 - 1, io["decode.pix"]) < PIXEL_ATOL


@torch.no_grad()
def test_decode_from_ids_and_from_a_prefix_of_whole_scales(case):
    _, _, io, _, tok = case
    ids = io["encode.ids"]
    assert _max_diff(tok.quantized_from(ids), io["decode_code.quant"]) < ATOL
    assert _max_diff(tok.semantic_features(ids), io["decode_code.sem"]) < ATOL
    assert _max_diff(tok.decode(ids) * 2 - 1, io["decode_code.pix"]) < PIXEL_ATOL
    prefix = ids[:, :5]  # the first two scales (1 + 4 ids)
    quant = tok.quantized_from(prefix)
    assert _max_diff(quant, io["decode_code_prefix.quant"]) < ATOL
    assert _max_diff(tok.semantic_features(prefix), io["decode_code_prefix.sem"]) < ATOL
    if "decode_code_prefix.pix" in io:
        assert _max_diff(tok.decode(prefix) * 2 - 1, io["decode_code_prefix.pix"]) < PIXEL_ATOL
    else:  # SigLIP: only the decoder output before the official 384 px resize is stored
        before_resize = tok.decoder(tok.post_quant_conv(quant[:, 32:]))
        assert _max_diff(before_resize, io["decode_code_prefix.pix_decoder_out"]) < PIXEL_ATOL
    with pytest.raises(ValueError, match="prefix of whole scales"):
        tok.decode(ids[:, :-1])


@pytest.mark.parametrize("case_name", CASES)
def test_fresh_random_official_models_of_other_sizes_round_trip(fixture_dir, tmp_path, case_name):
    """Other sizes and seeds: a random model written in the official layout loads back with every
    output equal (the same conversion the fixtures pin down)."""
    meta = json.loads((fixture_dir / f"{case_name}.json").read_text())
    overrides = json.loads(json.dumps(meta["tiny_overrides"]))
    overrides["pixel_cnn"] = {k: v * 2 if k != "enhanced_decoder_ch" else v for k, v in overrides["pixel_cnn"].items()}
    args = {**meta["model_args"], "codebook_size": 96, "z_channels": 16}
    torch.manual_seed(7)
    model = TokenFlow(**tokenflow_config(args, overrides)).eval()
    with torch.no_grad():  # non-trivial values everywhere, as the fixtures have
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
        for block in model.semantic_decoder.transformer.blocks:
            block.attn.qkv.bias.chunk(3)[1].zero_()  # no k bias in the official layout (training keeps it 0)
    save_official_tokenflow(model, tmp_path, args, overrides)
    loaded = load_tokenizer(tmp_path)
    images = torch.rand(2, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model.encode(images), loaded.encode(images)
        assert torch.equal(a.ids, b.ids)
        assert torch.equal(model.decode(a.ids), loaded.decode(b.ids))
        assert torch.equal(model.semantic_features(a.ids), loaded.semantic_features(b.ids))


@pytest.mark.parametrize("name,case_name", [("tokenflow_clipb_32k_enhanced", "tiny_clipb_enhanced"),
                                            ("tokenflow_siglip_32k", "tiny_siglip"),
                                            ("tokenflow_clipb_32k_stage1", "tiny_clipb")])
def test_full_size_models_have_the_released_names_and_shapes(fixture_dir, name, case_name):
    """Built on the meta device (no memory): our full-size models written in the official layout
    have exactly the official state-dict names and shapes."""
    from tokenizers_vis.models.tokenflow_official import RELEASED

    expected = json.loads((fixture_dir / "full_size_keys.json").read_text())[name]
    meta = json.loads((fixture_dir / f"{case_name}.json").read_text())
    args = dict(RELEASED.get(name + ".pt", {**meta["model_args"], "codebook_size": 32768,
                                             "encoder_ch_mult": [1, 1, 2, 2, 4], "decoder_ch_mult": [1, 1, 2, 2, 4],
                                             "z_channels": 256}))
    with torch.device("meta"):
        model = TokenFlow(**tokenflow_config(args))
    ours = {k: list(v.shape) for k, v in official_state_dict(model).items()}
    missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    wrong = {k: (ours[k], expected[k]) for k in expected if ours[k] != list(expected[k])}
    assert not wrong, list(wrong.items())[:5]


def test_released_names_fail_clearly_offline(tmp_path, monkeypatch):
    """`load_tokenizer("tokenflow_siglip_32k")` fetches the released file when online; offline (as in
    tests) it fails at once, saying how to provide the file."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("tokenflow_siglip_32k", "ByteFlow-AI/TokenFlow/tokenflow_clipb_32k_enhanced.pt"):
        with pytest.raises(OSError, match="could not download ByteFlow-AI/TokenFlow/tokenflow_.*hf download"):
            load_tokenizer(name)


def test_official_folder_errors_are_clear(tmp_path):
    (tmp_path / ARGS_NAME).write_text(json.dumps({"teacher": "eva_clip"}))
    torch.save({"model": {}}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="unsupported official TokenFlow teacher 'eva_clip'"):
        load_tokenizer(tmp_path)
    (tmp_path / ARGS_NAME).write_text(json.dumps({"teacher": "clipb_224"}))
    torch.save({"optimizer": {"lr": 1}}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="holds no TokenFlow state dict"):
        load_tokenizer(tmp_path)


def test_checkpoints_that_also_hold_the_training_args_load(fixture_dir, tmp_path):
    import argparse
    import shutil

    folder, state, io, _, _ = _case(fixture_dir, "tiny_clipb")
    shutil.copy(folder / ARGS_NAME, tmp_path / ARGS_NAME)
    torch.save({"ema": state, "args": argparse.Namespace(lr=1e-4)}, tmp_path / WEIGHTS_NAME)
    tok = load_tokenizer(tmp_path)
    with torch.no_grad():
        assert torch.equal(tok.encode(_images01(io)).ids, io["encode.ids"])
