"""The official-format registry (models/official.py), the loading that asks it (models/loading.py), and
the one state-file reader (nn/weights.py)."""

import argparse
import ast
import inspect
import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import reference_path
from safetensors.torch import load_file, save_file

from tokenizers_vis import load_tokenizer, save_pretrained
from tokenizers_vis.models import loading, official
from tokenizers_vis.models.official import (
    OfficialFormat,
    find_official_format,
    find_preset,
    get_official_format,
    official_formats,
    register_official_format,
    unregister_official_format,
)
from tokenizers_vis.models.tokenflow_official import ARGS_NAME, RELEASED, RELEASED_REPO, WEIGHTS_NAME
from tokenizers_vis.models.vqgan import VQGAN
from tokenizers_vis.nn.weights import MissingWeightsError, read_state_file

TINY_VQGAN = dict(image_size=32, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, z_channels=8,
                  codebook_size=16)


def _split(path: Path) -> tuple[dict, dict]:
    """(state_dict.*, io.*) tensors of a reference fixture file."""
    tensors = load_file(str(path))
    state = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    return state, {k[len("io."):]: v for k, v in tensors.items() if k.startswith("io.")}


# -- the released layouts, as the official-format tests build them from shared/reference -------
def titok_folder(shared_dir: Path, tmp_path: Path, weights: str = "model.safetensors") -> Path:
    case = reference_path(shared_dir, "titok", "case2_vq_direct_pixels.yaml")
    config = yaml.safe_load(case.read_text())
    fixture = config.pop("reference_fixture")
    config.update({key: fixture[key] for key in ("model_sizes", "pixel_decoder") if key in fixture})
    state, _ = _split(case.with_suffix(".safetensors"))
    folder = tmp_path / "titok"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if weights.endswith(".safetensors"):
        save_file(state, str(folder / weights))
    else:
        torch.save(state, folder / weights)
    return folder


def tokenflow_folder(shared_dir: Path, tmp_path: Path) -> Path:
    fixture = reference_path(shared_dir, "tokenflow", "tiny_clipb.safetensors")
    meta = json.loads(fixture.with_suffix(".json").read_text())
    state, _ = _split(fixture)
    folder = tmp_path / "tokenflow"
    folder.mkdir()
    (folder / ARGS_NAME).write_text(json.dumps({**meta["model_args"], "overrides": meta["tiny_overrides"]}))
    torch.save({"model": state}, folder / WEIGHTS_NAME)
    return folder


def flextok_folder(shared_dir: Path, tmp_path: Path, config_json: bool = True) -> Path:
    fixture = reference_path(shared_dir, "flextok", "tiny.safetensors")
    config = yaml.safe_load(fixture.with_suffix(".yaml").read_text())
    state, _ = _split(fixture)
    folder = tmp_path / "flextok"
    folder.mkdir()
    metadata = {k: (v if isinstance(v, str) else repr(v)) for k, v in config.items() if k != "reference_fixture"}
    save_file(state, str(folder / "model.safetensors"), metadata=metadata)
    if config_json:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def maskgit_file(shared_dir: Path, tmp_path: Path) -> Path:
    state, _ = _split(reference_path(shared_dir, "titok", "maskgit_vqgan_tiny.safetensors"))
    path = tmp_path / "maskgit-vqgan-tiny.bin"
    torch.save(state, path)
    return path


LAYOUTS = {
    "titok": titok_folder,
    "titok_bin": lambda shared, tmp: titok_folder(shared, tmp, weights="pytorch_model.bin"),
    "tokenflow": tokenflow_folder,
    "flextok": flextok_folder,
    "flextok_metadata_only": lambda shared, tmp: flextok_folder(shared, tmp, config_json=False),
    "maskgit_vqgan": maskgit_file,
}


@pytest.fixture
def registry(monkeypatch):
    """The registry as it is, restored after the test whatever it registers or removes."""
    monkeypatch.setattr(official, "_FORMATS", dict(official._FORMATS))
    return official._FORMATS


def test_every_released_layout_has_a_format():
    assert {"titok", "tokenflow", "flextok", "maskgit_vqgan"} <= {fmt.name for fmt in official_formats()}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_released_layout_is_recognised_by_exactly_one_format(layout, shared_dir, tmp_path):
    path = LAYOUTS[layout](shared_dir, tmp_path)
    expected = layout.split("_")[0] if layout != "maskgit_vqgan" else layout
    assert [fmt.name for fmt in official_formats() if fmt.recognise(path)] == [expected]
    assert find_official_format(path).name == expected


@pytest.mark.parametrize("layout", ["titok", "maskgit_vqgan"])
def test_load_tokenizer_loads_a_recognised_layout_through_its_format(layout, shared_dir, tmp_path):
    tokenizer = load_tokenizer(LAYOUTS[layout](shared_dir, tmp_path))
    assert tokenizer.model_type == {"titok": "titok", "maskgit_vqgan": "vqgan"}[layout]
    assert not tokenizer.training


def test_folders_and_checkpoints_of_ours_are_recognised_by_none(tmp_path):
    folder = save_pretrained(VQGAN(**TINY_VQGAN), tmp_path / "ours")
    assert [fmt.name for fmt in official_formats() if fmt.recognise(folder)] == []
    assert find_official_format(folder) is None
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"tokenizer_config": {}}, checkpoint)
    assert find_official_format(checkpoint) is None
    assert find_official_format(tmp_path / "absent") is None


def test_loading_names_no_model():
    """models/loading.py imports only the registries, never a model module."""
    tree = ast.parse(inspect.getsource(loading))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    ours = {name for name in imported if name.startswith("tokenizers_vis")}
    assert ours == {"tokenizers_vis.models.base", "tokenizers_vis.models.official"}


def _toy_format(tmp_path: Path, presets=None) -> tuple[OfficialFormat, list]:
    """A layout no real format knows: a folder holding `toy.json`, loaded as a tiny VQGAN."""
    loads = []

    def load(path, **options):
        loads.append((Path(path), options))
        return VQGAN(**json.loads((Path(path) / "toy.json").read_text())).eval()

    fmt = OfficialFormat(name="toy", recognise=lambda path: (path / "toy.json").is_file(), load=load,
                         presets=presets or {})
    return fmt, loads


def test_a_registered_format_is_used_by_load_tokenizer_and_unregistering_restores(registry, tmp_path):
    folder = tmp_path / "toy_folder"
    folder.mkdir()
    (folder / "toy.json").write_text(json.dumps(TINY_VQGAN))
    with pytest.raises(FileNotFoundError, match="must hold config.json and model.safetensors"):
        load_tokenizer(folder)
    fmt, loads = _toy_format(tmp_path)
    assert register_official_format(fmt) is fmt and get_official_format("toy") is fmt
    tokenizer = load_tokenizer(folder)
    assert isinstance(tokenizer, VQGAN) and loads == [(folder, {})]
    assert loading.load_folder(folder).image_size == TINY_VQGAN["image_size"]
    assert unregister_official_format("toy") is fmt
    with pytest.raises(FileNotFoundError, match="must hold config.json and model.safetensors"):
        load_tokenizer(folder)


def test_names_must_be_unique_and_layouts_unambiguous(registry, tmp_path):
    fmt, _ = _toy_format(tmp_path, presets={"toy_released": lambda cache: cache})
    register_official_format(fmt)
    with pytest.raises(ValueError, match="already registered"):
        register_official_format(fmt)
    with pytest.raises(ValueError, match=r"preset names \['toy_released'\]"):
        register_official_format(OfficialFormat("other", lambda p: False, fmt.load, presets=fmt.presets))
    register_official_format(OfficialFormat("everything", lambda p: True, fmt.load))
    (tmp_path / "toy.json").write_text("{}")
    with pytest.raises(ValueError, match=r"several official formats: \['toy', 'everything'\]"):
        find_official_format(tmp_path)
    with pytest.raises(KeyError, match="no official format named 'absent'"):
        unregister_official_format("absent")


def test_preset_names_resolve_through_the_registry(registry, tmp_path, monkeypatch):
    released = tmp_path / "downloaded"
    released.mkdir()
    (released / "toy.json").write_text(json.dumps(TINY_VQGAN))
    caches = []

    def resolve(cache_dir):  # stands in for a download
        caches.append(cache_dir)
        return released

    fmt, loads = _toy_format(tmp_path, presets={"toy_released": resolve})
    register_official_format(fmt)
    assert find_preset("toy_released") == (fmt, resolve) and find_preset("toy_unknown") is None
    monkeypatch.chdir(tmp_path)
    assert isinstance(load_tokenizer("toy_released"), VQGAN)
    assert loads == [(released, {})] and caches == [loading.cache_dir()]
    # A local path of the preset's name wins over the preset.
    save_pretrained(VQGAN(**{**TINY_VQGAN, "codebook_size": 8}), tmp_path / "toy_released")
    assert load_tokenizer("toy_released").codebook_size == 8 and len(caches) == 1


@pytest.mark.parametrize("filename", sorted(RELEASED))
def test_released_tokenflow_names_are_presets_of_the_tokenflow_format(filename, tmp_path, monkeypatch):
    import huggingface_hub

    weights = tmp_path / "hub" / filename
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: asked.append((repo, name)) or weights)
    stem = Path(filename).stem
    for name in (stem, filename, f"{RELEASED_REPO}/{stem}", f"{RELEASED_REPO}/{filename}"):
        fmt, resolve = find_preset(name)
        assert fmt is get_official_format("tokenflow")
        folder = resolve(tmp_path / "cache")
        assert json.loads((folder / ARGS_NAME).read_text()) == RELEASED[filename]
        assert (folder / WEIGHTS_NAME).resolve() == weights.resolve()
        assert find_official_format(folder) is fmt
    assert asked == [(RELEASED_REPO, filename)] * 4


def test_load_tokenizer_fetches_a_preset_into_the_cache_and_loads_it_with_its_format(registry, tmp_path,
                                                                                      monkeypatch):
    import dataclasses

    import huggingface_hub

    weights = tmp_path / "tokenflow_siglip_32k.pt"
    weights.write_bytes(b"weights")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: weights)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf"))
    loaded = []
    tokenflow = unregister_official_format("tokenflow")
    register_official_format(dataclasses.replace(tokenflow, load=lambda path: loaded.append(path) or "model"))
    assert load_tokenizer("tokenflow_siglip_32k") == "model"
    assert loaded == [tmp_path / "hf" / "tokenizers_vis" / "tokenflow_siglip_32k"]


# -- the one state-file reader ------------------------------------------------------------------
STATE = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.ones(2)}


def _assert_state(state):
    assert sorted(state) == sorted(STATE)
    for key, value in STATE.items():
        assert torch.equal(state[key], value), key


# safetensors holds a flat state dict only; torch files may wrap it.
@pytest.mark.parametrize("suffix, wrapper", [(".safetensors", None)] + [
    (suffix, wrapper) for suffix in (".bin", ".pt", ".pth") for wrapper in (None, "state_dict", "model")])
def test_read_state_file_reads_every_format_bare_or_wrapped(suffix, wrapper, tmp_path):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(STATE, str(path))
    else:
        torch.save(STATE if wrapper is None else {wrapper: STATE, "epoch": 3}, path)
    _assert_state(read_state_file(path))


def test_read_state_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        read_state_file(tmp_path / "absent.bin")
    text = tmp_path / "notes.pt"
    text.write_text("not weights")
    with pytest.raises(ValueError, match="notes.pt is not a readable .safetensors or torch weight file"):
        read_state_file(text)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="broken.safetensors is not a readable"):
        read_state_file(broken)
    listed = tmp_path / "list.bin"
    torch.save([torch.ones(1)], listed)
    with pytest.raises(ValueError, match="list.bin holds no state dict .*got list"):
        read_state_file(listed)
    other = tmp_path / "optimizer.pt"
    torch.save({"optimizer": {"lr": 1.0}}, other)
    with pytest.raises(ValueError, match="optimizer.pt holds no state dict .*under state_dict/model"):
        read_state_file(other)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": STATE}, wrapped)
    with pytest.raises(ValueError, match="wrapped.pt holds no VQGAN weights"):
        read_state_file(wrapped, wrappers=(), what="VQGAN weights")


def test_read_state_file_unpickles_only_the_classes_allowed(tmp_path):
    path = tmp_path / "with_args.pt"
    torch.save({"ema": STATE, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(ValueError, match="with_args.pt is not a readable"):
        read_state_file(path, wrappers=("ema",))
    _assert_state(read_state_file(path, wrappers=("ema",), allowed_classes=[argparse.Namespace]))


# -- one of each --------------------------------------------------------------------------------
def test_one_missing_weights_error_one_frozen_base_one_set_of_image_statistics():
    from tokenizers_vis.losses import perceptual as losses_perceptual
    from tokenizers_vis.metrics import fid, perceptual
    from tokenizers_vis.nn import pretrained

    assert issubclass(MissingWeightsError, FileNotFoundError) and issubclass(MissingWeightsError, OSError)
    assert not hasattr(pretrained, "MissingPretrainedError")
    for frozen in (losses_perceptual.LPIPSLoss, losses_perceptual.ConvNeXtPerceptualLoss, perceptual.LPIPSMetric,
                   fid.InceptionFeatures, pretrained.FrozenVAE, pretrained.FrozenVisionEncoder):
        assert issubclass(frozen, pretrained.FrozenModule), frozen
        assert frozen.train is pretrained.FrozenModule.train, frozen
    assert losses_perceptual.IMAGENET_MEAN is pretrained.IMAGENET_MEAN
    assert losses_perceptual.IMAGENET_STD is pretrained.IMAGENET_STD
