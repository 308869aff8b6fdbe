"""The TF-FID Inception wrapper: offline loading only, and the error when the weights are missing."""

from __future__ import annotations

import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

from tokenizers_vis.metrics import INCEPTION_WEIGHTS_FILE, InceptionFeatures, MissingWeightsError, to_uint8


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
    """A random state dict in the layout of the TF-FID weights (the real file is not available)."""
    with pytest.MonkeyPatch.context() as patch:
        # Build the network without loading anything, to read its state-dict layout.
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


def test_missing_weights_error_names_file_place_and_option(empty_hub_dir):
    with pytest.raises(MissingWeightsError) as err:
        InceptionFeatures()
    message = str(err.value)
    assert INCEPTION_WEIGHTS_FILE in message
    assert str(empty_hub_dir / "checkpoints") in message
    assert "inception_weights=PATH" in message


def test_loads_local_weights_and_gives_pool3_features(random_inception_file, empty_hub_dir):
    features = InceptionFeatures(random_inception_file)
    images = torch.rand(2, 3, 40, 48)
    out = features(images)
    assert out.shape == (2, 2048) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(features(to_uint8(images)), out, rtol=0, atol=0)
    assert not features.train().training  # batch-norm statistics never change


def test_finds_torch_fidelity_cache_name(random_inception_file, empty_hub_dir):
    # torch-fidelity / torchmetrics cache the same file under their own name.
    (empty_hub_dir / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth").symlink_to(random_inception_file)
    assert InceptionFeatures().num_features == 2048


def test_reconstruction_metrics_use_the_inception_weights_they_are_given(random_inception_file, empty_hub_dir):
    from tokenizers_vis.metrics import ReconstructionMetrics

    metrics = ReconstructionMetrics(fid=True, lpips=False, inception_weights=random_inception_file, strict_fid=True)
    assert isinstance(metrics.fid.extractor, InceptionFeatures)
    assert metrics.fid.real.dim == 2048


def test_features_equal_torch_fidelitys_extractor_on_the_same_weights(random_inception_file, empty_hub_dir):
    """The wrapper is torch-fidelity's extractor: same features, bit for bit, from uint8 images and
    from [0, 1] floats (rounded to uint8 first, as a saved PNG would be)."""
    reference = tf_inception.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(random_inception_file)).eval()
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    as_uint8 = (images * 255).round().to(torch.uint8)
    with torch.no_grad():
        expected = reference(as_uint8)[0]
    # The random network tells images apart (its features are small: compare relatively).
    assert (expected[0] - expected[1]).abs().max() > 0.01 * expected.abs().max()
    features = InceptionFeatures(random_inception_file)
    assert torch.equal(features(as_uint8), expected)
    assert torch.equal(features(images), expected)
