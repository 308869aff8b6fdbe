import pytest
import torch
from torch import nn

from tokenizers_vis.losses import ReconstructionObjective
from tokenizers_vis.models.base import ModelOutput

TINY_DISC = {"base_channels": 16, "num_groups": 4}


class TinyAutoencoder(nn.Module):
    """A 1x1-conv "tokenizer" honouring the forward contract: ModelOutput on the [0, 1] scale."""

    def __init__(self, has_last_layer: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, kernel_size=1)
        self.has_last_layer = has_last_layer

    def forward(self, images):
        reconstruction = self.conv(images)
        aux = self.conv.weight.pow(2).mean()
        return ModelOutput(reconstruction=reconstruction, aux_loss=aux, logs={"quantizer/usage": aux.detach() * 0 + 1})

    def last_layer_weight(self):
        return self.conv.weight if self.has_last_layer else None


def _objective(**overrides):
    config = dict(lpips_weight=0.0, discriminator_kwargs=TINY_DISC, random_perceptual_weights=True)
    config.update(overrides)
    return ReconstructionObjective(**config)


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.rand(2, 3, 32, 32)


def test_full_objective_total_is_weighted_sum_and_gradients_are_routed(images):
    torch.manual_seed(0)
    weights = dict(pixel_weight=1.5, lpips_weight=0.7, convnext_weight=0.1, aux_weight=0.3, gan_weight=0.2)
    objective = _objective(
        pixel_loss="l1", lecam_weight=0.01, adaptive_gan_weight=True, gan_start_step=0, **weights
    )
    model = TinyAutoencoder()

    loss, logs, output = objective(model, images, step=0)
    assert isinstance(output, ModelOutput)
    assert set(logs) == {
        "loss/total", "loss/pixel", "loss/lpips", "loss/convnext", "loss/aux", "loss/gan_g",
        "gan/adaptive_weight", "quantizer/usage",
    }
    assert all(not v.requires_grad and v.dim() == 0 for v in logs.values())
    expected = (
        weights["pixel_weight"] * logs["loss/pixel"]
        + weights["lpips_weight"] * logs["loss/lpips"]
        + weights["convnext_weight"] * logs["loss/convnext"]
        + weights["aux_weight"] * logs["loss/aux"]
        + weights["gan_weight"] * logs["gan/adaptive_weight"] * logs["loss/gan_g"]
    )
    assert torch.allclose(loss.detach(), expected, rtol=1e-5)
    assert torch.allclose(logs["loss/total"], loss.detach())
    assert torch.allclose(logs["loss/pixel"], (output.reconstruction - images).abs().mean().detach())

    # Generator step: gradients reach the model, never the discriminator.
    loss.backward()
    assert model.conv.weight.grad is not None
    assert all(p.grad is None for p in objective.discriminator.parameters())
    assert all(p.requires_grad for p in objective.discriminator.parameters())

    # Discriminator step: gradients reach only the discriminator.
    model.zero_grad(set_to_none=True)
    d_loss, d_logs = objective.discriminator_loss(images, output.reconstruction, step=0)
    assert set(d_logs) == {"loss/disc", "loss/lecam", "disc/logits_real", "disc/logits_fake"}
    assert torch.allclose(d_loss.detach(), d_logs["loss/disc"] + 0.01 * d_logs["loss/lecam"])
    d_loss.backward()
    assert model.conv.weight.grad is None
    assert all(p.grad is not None for p in objective.discriminator.parameters())
    assert int(objective.lecam.num_updates) == 1


def test_gan_term_starts_at_gan_start_step(images):
    objective = _objective(gan_start_step=5)
    model = TinyAutoencoder()
    assert not objective.discriminator_active(4)
    _, logs, _ = objective(model, images, step=4)
    assert "loss/gan_g" not in logs
    with pytest.raises(RuntimeError, match="gan_start_step=5"):
        objective.discriminator_loss(images, images, step=4)

    assert objective.discriminator_active(5)
    loss, logs, _ = objective(model, images, step=5)
    assert "loss/gan_g" in logs
    assert "gan/adaptive_weight" not in logs  # adaptive weighting is off by default
    assert torch.allclose(loss.detach(), logs["loss/pixel"] + logs["loss/aux"] + 0.1 * logs["loss/gan_g"])


def test_discriminator_loss_updates_only_the_discriminator(images):
    torch.manual_seed(0)
    objective = _objective()
    model = TinyAutoencoder()
    optimizer = torch.optim.SGD(objective.discriminator.parameters(), lr=0.1)
    disc_before = [p.detach().clone() for p in objective.discriminator.parameters()]
    model_before = model.conv.weight.detach().clone()

    _, _, output = objective(model, images, step=0)
    d_loss, _ = objective.discriminator_loss(images, output.reconstruction, step=0)
    d_loss.backward()
    optimizer.step()

    assert model.conv.weight.grad is None
    assert torch.equal(model.conv.weight, model_before)
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, objective.discriminator.parameters()))


def test_zero_weight_terms_build_no_network():
    objective = _objective(lpips_weight=0.0, convnext_weight=0.0, gan_weight=0.0, lecam_weight=0.1)
    assert len(objective.frozen) == 0
    assert objective.discriminator is None and objective.lecam is None
    assert sum(p.numel() for p in objective.parameters()) == 0
    assert not objective.discriminator_active(10**6)

    no_disc = _objective(discriminator=None, gan_weight=0.1)
    assert no_disc.discriminator is None
    with pytest.raises(RuntimeError, match="no discriminator"):
        no_disc.discriminator_loss(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), step=0)

    no_lecam = _objective(lecam_weight=0.0)
    assert no_lecam.discriminator is not None and no_lecam.lecam is None


def test_submodule_roles_are_named_for_checkpoint_filtering():
    objective = _objective(lpips_weight=1.0, lecam_weight=0.1)
    top_level = {name.split(".")[0] for name in objective.state_dict()}
    assert top_level == {"frozen", "discriminator", "lecam"}
    objective.train()
    assert not any(m.training for child in objective.frozen.values() for m in child.modules())
    assert objective.discriminator.training


def test_adaptive_weight_needs_a_last_layer_and_is_skipped_without_grad(images):
    objective = _objective(adaptive_gan_weight=True)
    with pytest.raises(ValueError, match="last_layer_weight"):
        objective(TinyAutoencoder(has_last_layer=False), images, step=0)

    with torch.no_grad():
        loss, logs, _ = objective(TinyAutoencoder(), images, step=0)
    assert "gan/adaptive_weight" not in logs
    assert torch.allclose(loss, logs["loss/pixel"] + logs["loss/aux"] + 0.1 * logs["loss/gan_g"])


def test_invalid_configuration_is_rejected():
    with pytest.raises(ValueError, match="pixel_loss"):
        _objective(pixel_loss="huber")
    with pytest.raises(ValueError, match="gan_weight"):
        _objective(gan_weight=-1.0)
    with pytest.raises(ValueError, match="divide"):
        _objective(discriminator_kwargs={"base_channels": 16, "num_groups": 32})


def test_hydra_instantiation_with_nested_config(images):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    config = OmegaConf.create(
        {
            "_target_": "tokenizers_vis.losses.ReconstructionObjective",
            "lpips_weight": 0.0,
            "discriminator": "titok",
            "discriminator_kwargs": {"base_channels": 8, "channel_mults": [1, 2], "num_groups": 4, "pool_size": 4},
        }
    )
    objective = instantiate(config)
    loss, logs, _ = objective(TinyAutoencoder(), images, step=0)
    assert torch.isfinite(loss) and "loss/gan_g" in logs
