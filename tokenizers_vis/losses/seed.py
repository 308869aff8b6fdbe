"""SEED's stage-2 objective: vq_weight * L_vq + rec_weight * L_rec + img_weight * L_img (5, 2, 0.5).

  L_vq:  the quantizer's legacy loss (the model's `aux_loss`: mse(sg(z_q), z) + 0.25 mse(z_q, sg(z)));
  L_rec: mean over tokens of 1 - cos(head (a) output, the frozen causal Q-Former output);
  L_img: MSE between head (b)'s predicted image embedding and the frozen CLIP image embedding of
         the same image (the ViT-H/14 embedding the unCLIP decoder is conditioned on).

The CLIP target (`clip_target`: `nn.clip_embedder.FrozenCLIPImageEmbedder` arguments) sits in
`frozen`: built by `prepare`, never saved in checkpoints, rebuilt from config on resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.losses.base import Batch, Objective, batch_pixels
from tokenizers_vis.nn.clip_embedder import FrozenCLIPImageEmbedder

__all__ = ["SEEDObjective", "recon_cosine_loss"]


def recon_cosine_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos(predicted, target)) over the tokens (last dim: features)."""
    return (1 - F.cosine_similarity(predicted.float(), target.float(), dim=-1)).mean()


class SEEDObjective(Objective):
    """Stage 2 of SEED. The tokenizer's `forward(images)` gives `aux_loss` (L_vq) and, in
    `encoded.extras`, "query_output", "recon_qformer" and "image_embedding".

    clip_target: FrozenCLIPImageEmbedder arguments ({pretrained, subfolder} or {config, seed});
        None with img_weight 0 only.
    """

    def __init__(self, vq_weight: float = 5.0, rec_weight: float = 2.0, img_weight: float = 0.5,
                 clip_target: Mapping[str, Any] | None = None):
        super().__init__()
        if min(vq_weight, rec_weight, img_weight) < 0:
            raise ValueError(f"loss weights must be >= 0, got vq {vq_weight}, rec {rec_weight}, img {img_weight}")
        if img_weight > 0 and not clip_target:
            raise ValueError("img_weight > 0 needs objective.clip_target (the frozen CLIP image encoder)")
        self.vq_weight, self.rec_weight, self.img_weight = vq_weight, rec_weight, img_weight
        self.clip_target_spec = dict(clip_target or {})

    def prepare(self, tokenizer: nn.Module) -> None:
        if self.img_weight > 0 and "clip_target" not in self.frozen:
            target = self.add_frozen("clip_target", FrozenCLIPImageEmbedder(**self.clip_target_spec))
            expected = getattr(tokenizer, "config", {}).get("image_embed_dim")
            if expected is not None and target.embed_dim != expected:
                raise ValueError(f"the CLIP target gives {target.embed_dim}-d embeddings but the tokenizer predicts "
                                 f"{expected}-d; set model.tokenizer.image_embed_dim={target.embed_dim}")

    def target(self, tokenizer: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if "clip_target" not in self.frozen:
            self.prepare(tokenizer)
            self.frozen.to(images.device)
        return self.frozen["clip_target"](images)

    def forward(self, tokenizer: nn.Module, batch: Batch | torch.Tensor, step: int):
        images = batch_pixels(batch)
        output = tokenizer(images)
        extras = output.encoded.extras
        if "recon_qformer" not in extras:
            raise ValueError("the SEED stage-2 objective needs a stage-2 tokenizer (model.tokenizer.stage=2)")
        l_vq = output.aux_loss
        l_rec = recon_cosine_loss(extras["recon_qformer"], extras["query_output"].detach())
        loss = self.vq_weight * l_vq + self.rec_weight * l_rec
        logs = {"loss/vq": l_vq.detach(), "loss/rec": l_rec.detach(), **output.logs}
        embedding = extras["image_embedding"]
        if self.img_weight > 0:
            target = self.target(tokenizer, images)
            l_img = F.mse_loss(embedding.float(), target)
            loss = loss + self.img_weight * l_img
            logs["loss/img"] = l_img.detach()
            logs["img/cosine"] = F.cosine_similarity(embedding.detach().float(), target, dim=-1).mean()
        else:
            # Keeps head (b) in the graph: DDP expects a gradient for every trainable parameter.
            loss = loss + 0.0 * embedding.float().mean()
        logs["loss/total"] = loss.detach()
        return loss, logs, output

    def extra_repr(self) -> str:
        return f"vq_weight={self.vq_weight}, rec_weight={self.rec_weight}, img_weight={self.img_weight}"
