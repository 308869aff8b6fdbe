"""Standard metric / loss weights are fetched into the torch hub cache when the network is allowed,
and never when HF_HUB_OFFLINE=1 or download=false. Nothing is downloaded here: the transfer
(`download_url_to_file`) is replaced by a fake that writes local bytes; the cache folder, the file
names and the sha256 check are the real ones."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
import yaml

from tokenizers_vis.nn import weights
from tokenizers_vis.nn.weights import MissingWeightsError, downloads_allowed, find_weights

CONF = Path(__file__).resolve().parents[2] / "conf"
PAYLOAD = b"weights of a tiny test network" * 100


def _named_like_torch_hub(payload: bytes, stem: str = "tiny") -> str:
    """A file name whose hash part is the sha256 prefix of `payload`, as torch.hub names checkpoints."""
    return f"{stem}-{hashlib.sha256(payload).hexdigest()[:8]}.pth"


class FakeTransfer:
    """Stands in for torch.hub.download_url_to_file: writes `payload` (or raises `error`) to dst."""

    def __init__(self, payload: bytes = PAYLOAD, error: Exception | None = None):
        self.payload, self.error, self.calls = payload, error, []

    def __call__(self, url, dst, hash_prefix=None, progress=True):
        self.calls.append((url, dst))
        if self.error is not None:
            raise self.error
        Path(dst).write_bytes(self.payload)


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _fake(monkeypatch, **kwargs) -> FakeTransfer:
    fake = FakeTransfer(**kwargs)
    monkeypatch.setattr(weights, "download_url_to_file", fake)
    return fake


def test_a_missing_standard_file_is_fetched_into_the_hub_cache_once(online, empty_hub_dir, monkeypatch):
    fake = _fake(monkeypatch)
    name = _named_like_torch_hub(PAYLOAD)
    url = f"https://example.invalid/models/{name}"
    path = find_weights(None, "canonical.pth", "tiny_weights", url=url)
    assert path == empty_hub_dir / "checkpoints" / name and path.read_bytes() == PAYLOAD
    assert len(fake.calls) == 1 and fake.calls[0][0] == url
    assert find_weights(None, "canonical.pth", "tiny_weights", url=url) == path
    assert len(fake.calls) == 1  # cached: not fetched again
    assert sorted(p.name for p in (empty_hub_dir / "checkpoints").iterdir()) == [name]  # no partial file left


def test_a_corrupted_download_is_refused_and_nothing_is_cached(online, empty_hub_dir, monkeypatch):
    fake = _fake(monkeypatch, payload=PAYLOAD + b"!")
    name = _named_like_torch_hub(PAYLOAD)
    with pytest.raises(MissingWeightsError) as err:
        find_weights(None, name, "tiny_weights", url=f"https://example.invalid/{name}")
    message = str(err.value)
    assert "corrupted" in message and hashlib.sha256(PAYLOAD + b"!").hexdigest() in message
    assert "tiny_weights=PATH" in message
    assert len(fake.calls) == 1
    assert list((empty_hub_dir / "checkpoints").iterdir()) == []


def test_a_failed_transfer_is_a_missing_weights_error_naming_url_and_option(online, empty_hub_dir, monkeypatch):
    _fake(monkeypatch, error=URLError("no route to host"))
    name = _named_like_torch_hub(PAYLOAD)
    url = f"https://example.invalid/{name}"
    with pytest.raises(MissingWeightsError, match="no route to host") as err:
        find_weights(None, name, "tiny_weights", url=url)
    assert url in str(err.value) and "tiny_weights=PATH" in str(err.value)
    assert list((empty_hub_dir / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("env,download,reason", [("1", True, "HF_HUB_OFFLINE is set"),
                                                 ("true", True, "HF_HUB_OFFLINE is set"),
                                                 (None, False, "download=false")])
def test_offline_or_download_false_never_fetches(empty_hub_dir, monkeypatch, env, download, reason):
    if env is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", env)
    fake = _fake(monkeypatch)
    name = _named_like_torch_hub(PAYLOAD)
    url = f"https://example.invalid/{name}"
    with pytest.raises(MissingWeightsError) as err:
        find_weights(None, "canonical.pth", "tiny_weights", url=url, download=download)
    assert fake.calls == []
    message = str(err.value)
    assert reason in message and url in message and "canonical.pth" in message and "tiny_weights=PATH" in message
    assert not downloads_allowed(download)


def test_an_explicit_path_is_never_replaced_by_a_fetch(online, tmp_path, empty_hub_dir, monkeypatch):
    fake = _fake(monkeypatch)
    name = _named_like_torch_hub(PAYLOAD)
    with pytest.raises(MissingWeightsError, match="tiny_weights="):
        find_weights(tmp_path / "typo.pth", name, "tiny_weights", url=f"https://example.invalid/{name}")
    assert fake.calls == []


def test_the_urls_are_those_the_libraries_fetch_and_name_their_checksums():
    from torch.hub import HASH_REGEX
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    from tokenizers_vis.losses.perceptual import CONVNEXT_SMALL_CACHE_FILE, VGG16_CACHE_FILE, WEIGHTS_URLS
    from tokenizers_vis.metrics.fid import _INCEPTION_WEIGHTS_FILES, INCEPTION_WEIGHTS_URL
    from tokenizers_vis.metrics.perceptual import VGG16_WEIGHTS_URL

    assert INCEPTION_WEIGHTS_URL == URL_INCEPTION_V3
    assert VGG16_WEIGHTS_URL == WEIGHTS_URLS[VGG16_CACHE_FILE] == torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    assert WEIGHTS_URLS[CONVNEXT_SMALL_CACHE_FILE] == torchvision.models.ConvNeXt_Small_Weights.IMAGENET1K_V1.url
    for url in (INCEPTION_WEIGHTS_URL, *WEIGHTS_URLS.values()):
        assert HASH_REGEX.search(url.rsplit("/", 1)[1]).group(1)  # a checksum to hold the download to
    assert INCEPTION_WEIGHTS_URL.rsplit("/", 1)[1] in _INCEPTION_WEIGHTS_FILES  # found again once fetched


# -- through the metrics, the evaluator and the losses --------------------------------------------------
def test_the_evaluator_fetches_with_the_library_urls_and_reports_a_refused_download(online, empty_hub_dir,
                                                                                    monkeypatch):
    from tokenizers_vis.evaluation import metrics_factory
    from tokenizers_vis.metrics.fid import INCEPTION_WEIGHTS_URL
    from tokenizers_vis.metrics.perceptual import VGG16_WEIGHTS_URL

    fake = _fake(monkeypatch)  # not the real files: their checksums cannot match
    _, notes = metrics_factory(16, fid=True, lpips=True)
    assert [url for url, _ in fake.calls] == [INCEPTION_WEIGHTS_URL, VGG16_WEIGHTS_URL]
    assert "corrupted" in notes["rfid"] and "corrupted" in notes["lpips"]
    assert list((empty_hub_dir / "checkpoints").iterdir()) == []
    with pytest.raises(MissingWeightsError, match="corrupted"):
        metrics_factory(16, fid=True, lpips=False, strict_fid=True)


def test_download_false_keeps_the_evaluator_and_val_metrics_offline(online, empty_hub_dir, monkeypatch):
    from tokenizers_vis.evaluation import metrics_factory
    from tokenizers_vis.metrics import ReconstructionMetrics

    fake = _fake(monkeypatch)
    _, notes = metrics_factory(16, fid=True, lpips=True, download=False)
    assert "download=false" in notes["rfid"] and "pt_inception-2015-12-05-6726825d.pth" in notes["rfid"]
    assert "download=false" in notes["lpips"] and "vgg16-397923af.pth" in notes["lpips"]
    with pytest.raises(MissingWeightsError, match="download=false"):
        metrics_factory(16, fid=True, lpips=False, strict_fid=True, download=False)
    metrics = ReconstructionMetrics(16, fid=True, lpips=True, download=False)
    assert metrics.fid is None and metrics.lpips is None
    assert fake.calls == []


def test_the_perceptual_losses_fetch_unless_download_weights_is_false(online, empty_hub_dir, monkeypatch):
    from tokenizers_vis.losses import ReconstructionObjective
    from tokenizers_vis.losses.perceptual import WEIGHTS_URLS

    fake = _fake(monkeypatch)
    with pytest.raises(MissingWeightsError, match="download_weights=false"):
        ReconstructionObjective(lpips_weight=1.0, convnext_weight=0.1, discriminator=None, download_weights=False)
    assert fake.calls == []
    for lpips_weight, convnext_weight, file in ((1.0, 0.0, "vgg16-397923af.pth"),
                                                (0.0, 0.1, "convnext_small-0c510722.pth")):
        with pytest.raises(MissingWeightsError, match="corrupted"):
            ReconstructionObjective(lpips_weight=lpips_weight, convnext_weight=convnext_weight, discriminator=None)
        assert fake.calls[-1][0] == WEIGHTS_URLS[file]


def test_the_option_is_in_every_config_that_looks_weights_up():
    """`download` (eval, val_metrics) and `download_weights` (objectives) exist, default true, and
    are arguments of what those configs build."""
    from tokenizers_vis.losses import ReconstructionObjective
    from tokenizers_vis.metrics import ReconstructionMetrics

    assert yaml.safe_load((CONF / "eval.yaml").read_text())["download"] is True
    assert yaml.safe_load((CONF / "model/base/runtime.yaml").read_text())["val_metrics"]["download"] is True
    assert "download" in inspect.signature(ReconstructionMetrics).parameters
    for name in ("titok", "tokenflow"):
        assert yaml.safe_load((CONF / f"model/{name}.yaml").read_text())["objective"]["download_weights"] is True
    stage2 = yaml.safe_load((CONF / "model/titok_two_stage.yaml").read_text())
    assert any(stage.get("objective", {}).get("download_weights") is True
               for stage in stage2["stages"].values())
    assert "download_weights" in inspect.signature(ReconstructionObjective).parameters


def test_fetching_follows_the_environment_at_call_time(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not downloads_allowed()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert downloads_allowed() and not downloads_allowed(False)
    assert torch.hub.get_dir()  # the cache folder torch.hub itself uses
