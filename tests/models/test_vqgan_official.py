"""The stage-1 teacher against the official MaskGIT-VQGAN (../shared/reference/titok/maskgit_vqgan_tiny):
a folder in the released layout loads as our VQGAN, the one the proxy-code objective uses, and
reproduces the official outputs (README's tolerances: ids exact, floats 1e-5)."""

import json

import pytest
import torch
from helpers import reference_path
from safetensors.torch import load_file

from tokenizers_vis import load_tokenizer
from tokenizers_vis.losses.proxy_codes import ProxyCodeObjective
from tokenizers_vis.models.official import find_official_format
from tokenizers_vis.models.vqgan import (
    MASKGIT_ARGS_NAME,
    MASKGIT_FORMAT,
    MASKGIT_RELEASED_NAME,
    VQGAN,
    load_vqgan,
)

ATOL = 1e-5


@pytest.fixture
def fixture(shared_dir):
    path = reference_path(shared_dir, "titok", "maskgit_vqgan_tiny.safetensors")
    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    state = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    io = {k[len("io."):]: v for k, v in tensors.items() if k.startswith("io.")}
    return state, io, meta


def released_folder(directory, state, meta=None):
    """A folder as a user assembles it: the released .bin (a torch state dict) and, for a size
    other than the release's, official_args.json."""
    directory.mkdir()
    torch.save(state, directory / MASKGIT_RELEASED_NAME)
    if meta is not None:
        args = {"config": meta["config"], "num_embeddings": meta["num_embeddings"]}
        (directory / MASKGIT_ARGS_NAME).write_text(json.dumps(args))
    return directory


@pytest.fixture
def teacher_dir(fixture, tmp_path):
    state, _, meta = fixture
    return released_folder(tmp_path / "maskgit", state, meta)


def test_the_folder_is_recognised_and_loads_as_our_vqgan(teacher_dir, fixture):
    _, _, meta = fixture
    assert find_official_format(teacher_dir) is MASKGIT_FORMAT
    vqgan = load_tokenizer(teacher_dir)
    assert isinstance(vqgan, VQGAN) and not vqgan.training
    assert (vqgan.image_size, vqgan.grid_size, vqgan.codebook_size) == (32, 8, meta["num_embeddings"])
    assert vqgan.config["channel_mult"] == meta["config"]["channel_mult"] == [1, 1, 2]


def test_reproduces_the_official_ids_reconstruction_codebook_entries_and_soft_codes(teacher_dir, fixture):
    _, io, _ = fixture
    vqgan = load_tokenizer(teacher_dir)
    image = io["image"]
    with torch.no_grad():
        torch.testing.assert_close(vqgan.encoder(image), io["encoder_out"], atol=ATOL, rtol=0)
        encoded = vqgan.encode(image)
        assert torch.equal(encoded.ids, io["ids"])
        assert len(io["ids"].unique()) > 40  # the fixture's 45 distinct ids: a lookup off by any code shows
        grid = lambda latents: latents.reshape(2, 8, 8, 32).permute(0, 3, 1, 2)  # noqa: E731
        torch.testing.assert_close(grid(encoded.latents), io["quantized"], atol=ATOL, rtol=0)
        torch.testing.assert_close(grid(vqgan.quantize.embed(io["ids"])), io["codebook_entry"], atol=ATOL, rtol=0)
        decoded = vqgan.decode(io["ids"])
        torch.testing.assert_close(decoded, io["decoded_unclamped"], atol=ATOL, rtol=0)
        torch.testing.assert_close(decoded.clamp(0, 1), io["reconstruction"], atol=ATOL, rtol=0)
        torch.testing.assert_close(vqgan.reconstruct(image), io["reconstruction"], atol=ATOL, rtol=0)
        torch.testing.assert_close(vqgan.soft_codes(image, temperature=1.0), io["soft_code_t1"], atol=ATOL, rtol=0)


def test_the_stage1_objective_uses_the_same_teacher(teacher_dir, fixture):
    _, io, _ = fixture
    objective = ProxyCodeObjective(teacher=str(teacher_dir))
    assert isinstance(objective.teacher, VQGAN)
    assert torch.equal(objective.teacher_codes(io["image"]), io["ids"].reshape(2, 8, 8))
    assert torch.equal(load_vqgan(teacher_dir).state_dict()["quantize.embedding.weight"],
                       objective.teacher.state_dict()["quantize.embedding.weight"])


def test_the_single_file_and_the_release_size_folder_still_load(fixture, tmp_path):
    """The single state-dict file needs the image size given; a folder without official_args.json is
    the release (256 px, sizes from the tensors)."""
    state, io, _ = fixture
    torch.save(state, tmp_path / "teacher.bin")
    single = load_vqgan(tmp_path / "teacher.bin", image_size=32)
    assert torch.equal(single.encode(io["image"]).ids, io["ids"])
    bare = released_folder(tmp_path / "bare", state)
    assert find_official_format(bare) is MASKGIT_FORMAT
    assert load_tokenizer(bare).image_size == 256
    with pytest.raises(ValueError, match="describes 32 px images, not 64 px"):
        load_vqgan(released_folder(tmp_path / "sized", state, fixture[2]), image_size=64)


def test_official_args_that_contradict_the_weights_are_refused(fixture, tmp_path):
    state, _, meta = fixture
    wrong = {**meta, "num_embeddings": meta["num_embeddings"] * 2}
    with pytest.raises(ValueError, match="does not match the model"):
        load_tokenizer(released_folder(tmp_path / "wrong", state, wrong))
    bad = {**meta, "config": {**meta["config"], "num_resolutions": 4}}
    with pytest.raises(ValueError, match="num_resolutions 4"):
        load_tokenizer(released_folder(tmp_path / "bad", state, bad))
