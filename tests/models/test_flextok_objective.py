"""FlowMatchingObjective: flow loss, REPA with a tiny random DINOv2, the objective interface."""

import pytest
import torch

from tokenizers_vis.losses.flow import FlowMatchingObjective
from tokenizers_vis.models import FlexTok
from tokenizers_vis.models.base import ModelOutput

# Tiny models on 8 x 8 patches: too narrow for clean decodes, which these tests do not need.
pytestmark = pytest.mark.filterwarnings("ignore:FlexTok patches hold")

TINY = dict(image_size=32, vae=None, patch_size=8, num_registers=8, encoder_width=32, encoder_depth=1,
            encoder_heads=2, decoder_width=32, decoder_depth=2, decoder_heads=2)
TINY_DINO = dict(name="vit_small_patch14_dinov2", image_size=28, random_weights=True,
                 kwargs={"embed_dim": 16, "depth": 1, "num_heads": 2})


def test_flow_objective_interface():
    model = FlexTok(**TINY).train()
    objective = FlowMatchingObjective()
    assert objective.discriminator is None and not objective.discriminator_active(0)
    assert len(objective.frozen) == 0
    loss, logs, output = objective(model, torch.rand(2, 3, 32, 32), step=0)
    assert isinstance(output, ModelOutput) and output.reconstruction.shape == (2, 3, 32, 32)
    assert loss.requires_grad and torch.equal(logs["loss/total"], loss.detach())
    assert {"loss/flow", "flow/keep_k_mean"} <= set(logs)


def test_repa_aligns_the_chosen_decoder_layer_with_a_frozen_encoder():
    model = FlexTok(**TINY, repa_layer=1, repa_dim=16, repa_hidden=32).train()
    objective = FlowMatchingObjective(repa_weight=0.5, repa_encoder=TINY_DINO)
    assert not any(p.requires_grad for p in objective.frozen.parameters())
    loss, logs, _ = objective(model, torch.rand(2, 3, 32, 32), step=0)
    assert 0.0 <= float(logs["loss/repa"]) <= 2.0
    torch.testing.assert_close(logs["loss/total"], logs["loss/flow"] + 0.5 * logs["loss/repa"])
    loss.backward()
    assert model.repa_projector[0].weight.grad.abs().sum() > 0
    assert model.decoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.decoder.transformer.blocks[0].modulation.weight.grad.abs().sum() > 0


def test_repa_needs_a_repa_layer_and_matching_width():
    objective = FlowMatchingObjective(repa_weight=1.0, repa_encoder=TINY_DINO)
    with pytest.raises(ValueError, match="repa_layer"):
        objective(FlexTok(**TINY), torch.rand(1, 3, 32, 32), 0)
    with pytest.raises(ValueError, match="repa_dim=16"):
        objective(FlexTok(**TINY, repa_layer=0, repa_dim=8, repa_hidden=8), torch.rand(1, 3, 32, 32), 0)
    with pytest.raises(ValueError, match="repa_layer"):
        FlexTok(**TINY, repa_layer=5)
