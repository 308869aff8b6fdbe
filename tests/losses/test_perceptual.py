import pytest
import torch
import torchvision

from tokenizers_vis.losses import ConvNeXtPerceptualLoss, LPIPSLoss
from tokenizers_vis.losses.perceptual import VGG16_CACHE_FILE


@pytest.fixture
def empty_hub_dir(tmp_path, monkeypatch):
    """Point the torch hub cache at an empty folder, so a real cached file cannot mask a test."""
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    return hub


@pytest.fixture(scope="module")
def lpips_loss():
    return LPIPSLoss(random_backbone=True)


@pytest.fixture(scope="module")
def convnext_loss():
    return ConvNeXtPerceptualLoss(random_backbone=True)


def _vgg16_features_state(path):
    """A random torchvision-layout VGG16 state dict (features only: the classifier is not used)."""
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    torch.save(state, path)
    return state


def _assert_loaded(loss, state):
    for slice_name, block in loss.lpips.net.named_children():
        for key, value in block.state_dict().items():
            assert torch.equal(value, state[f"features.{key}"]), f"{slice_name}.{key}"


def test_lpips_zero_on_identical_positive_otherwise(lpips_loss):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    assert lpips_loss(images, images).item() == pytest.approx(0.0, abs=1e-7)
    loss = lpips_loss(torch.rand(2, 3, 32, 32), images)
    assert loss.dim() == 0 and loss.item() > 0


def test_lpips_gradient_reaches_input_not_weights(lpips_loss):
    torch.manual_seed(0)
    reconstruction = torch.rand(2, 3, 32, 32, requires_grad=True)
    lpips_loss(reconstruction, torch.rand(2, 3, 32, 32)).backward()
    assert reconstruction.grad is not None and reconstruction.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in lpips_loss.parameters())


def test_lpips_stays_in_eval_mode(lpips_loss):
    parent = torch.nn.ModuleDict({"lpips": lpips_loss})
    parent.train()
    assert not any(m.training for m in lpips_loss.modules())


def test_lpips_loads_vgg_weights_from_path(tmp_path, empty_hub_dir):
    path = tmp_path / "vgg16.pth"
    state = _vgg16_features_state(path)
    _assert_loaded(LPIPSLoss(vgg_weights=str(path)), state)


def test_lpips_loads_vgg_weights_from_hub_cache(empty_hub_dir):
    state = _vgg16_features_state(empty_hub_dir / "checkpoints" / VGG16_CACHE_FILE)
    _assert_loaded(LPIPSLoss(), state)


def test_lpips_missing_weights_error_names_the_config_key(empty_hub_dir):
    with pytest.raises(FileNotFoundError) as error:
        LPIPSLoss()
    message = str(error.value)
    assert "model.objective.lpips_weights" in message
    assert VGG16_CACHE_FILE in message
    assert str(empty_hub_dir / "checkpoints") in message
    assert "model.objective.random_perceptual_weights=true" in message

    with pytest.raises(FileNotFoundError, match="model.objective.lpips_weights=/no/such/vgg.pth"):
        LPIPSLoss(vgg_weights="/no/such/vgg.pth")


def test_convnext_missing_weights_error_names_the_config_key(empty_hub_dir):
    with pytest.raises(FileNotFoundError, match=r"convnext_small-0c510722\.pth.*model\.objective\.convnext_weights"):
        ConvNeXtPerceptualLoss()


def test_convnext_zero_on_identical_and_gradient_flows(convnext_loss):
    torch.manual_seed(0)
    target = torch.rand(2, 3, 32, 32)
    assert convnext_loss(target, target).item() == 0.0

    reconstruction = torch.rand(2, 3, 32, 32, requires_grad=True)
    loss = convnext_loss(reconstruction, target)
    assert loss.item() > 0
    loss.backward()
    assert reconstruction.grad is not None and reconstruction.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in convnext_loss.parameters())


def test_convnext_stays_in_eval_mode(convnext_loss):
    convnext_loss.train()
    assert not any(m.training for m in convnext_loss.modules())
