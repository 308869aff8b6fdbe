"""LPIPS-VGG metric: random backbone for tests, offline VGG loading, missing-weights error."""

from __future__ import annotations

import pytest
import torch
import torchvision

from tokenizers_vis.metrics import VGG16_WEIGHTS_FILE, LPIPSMetric, MissingWeightsError, build_lpips_vgg


@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    return LPIPSMetric(random_backbone=True)


@pytest.fixture(scope="module")
def vgg_features_file(tmp_path_factory):
    """Random VGG16 conv weights saved under torchvision's key names (the classifier is unused)."""
    torch.manual_seed(1)
    layers = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    path = tmp_path_factory.mktemp("vgg") / VGG16_WEIGHTS_FILE
    torch.save({f"features.{key}": value for key, value in layers.state_dict().items()}, path)
    return path


def test_identical_images_score_zero_and_different_ones_do_not(random_lpips):
    x = torch.rand(3, 3, 32, 32)
    same = random_lpips(x, x)
    assert same.shape == (3,)
    torch.testing.assert_close(same, torch.zeros(3))
    assert (random_lpips(x, torch.rand(3, 3, 32, 32)) > 0).all()


def test_metric_stays_in_eval_mode(random_lpips):
    assert not random_lpips.train().training
    assert not any(p.requires_grad for p in random_lpips.parameters())


def test_loads_vgg_trunk_from_the_hub_cache(vgg_features_file, empty_hub_dir):
    (empty_hub_dir / "checkpoints" / VGG16_WEIGHTS_FILE).symlink_to(vgg_features_file)
    expected = torch.load(vgg_features_file)
    model = build_lpips_vgg()
    for name, value in model.net.state_dict().items():
        assert torch.equal(value, expected[f"features.{name.split('.', 1)[1]}"]), name


def test_missing_vgg_weights_error_names_file_and_option(empty_hub_dir):
    with pytest.raises(MissingWeightsError) as err:
        LPIPSMetric()
    assert VGG16_WEIGHTS_FILE in str(err.value) and "lpips_weights=PATH" in str(err.value)
