"""Image-text contrastive learning (ITC): SEED's stage 1 (BLIP-2's ITC on a causal Q-Former).

The loss is symmetric cross-entropy over the similarity matrix image_feat . text_feat^T / temp with
label smoothing (SEED: 0.1). Under DDP the features of every rank are gathered, each rank's own
slice keeping its gradient (the others are constants), and every rank computes the loss over the
whole global batch: its value equals the single-process loss on the concatenated batch, and each
rank back-propagates into its own samples only (DDP then averages, which scales the gradient by
1 / world size; Adam, the recipe's optimizer, is invariant to that). The temperature is the
exception: it scales the whole gathered matrix, so every rank computes its full gradient and, after
DDP's average, it is world size times larger relative to the other parameters (Adam is invariant
to that per parameter, but a global-norm clip sees it). Batches must have the same size on every
rank (the loaders drop the last uneven batch).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.losses.base import Batch, Objective, batch_pixels

__all__ = ["ITCObjective", "gather_with_local_grad", "itc_loss"]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """(world * B, ...) concatenation over ranks (rank order); this rank's slice is `x` itself, with
    its gradient, the other slices are detached copies. The identity in a single process."""
    rank, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor | float,
             label_smoothing: float = 0.1, gather: bool = True) -> torch.Tensor:
    """(CE(sim_i2t, diag) + CE(sim_t2i, diag)) / 2 over the global batch, sim = image . text^T / temp.

    image_feat, text_feat: (B, D), l2-normalised, pair i matching pair i. gather: across DDP ranks."""
    if image_feat.shape != text_feat.shape:
        raise ValueError(f"image and text features differ in shape: {tuple(image_feat.shape)} vs "
                         f"{tuple(text_feat.shape)}")
    if gather:
        image_feat, text_feat = gather_with_local_grad(image_feat), gather_with_local_grad(text_feat)
    sim_i2t = image_feat.float() @ text_feat.float().t() / temp
    targets = torch.arange(sim_i2t.shape[0], device=sim_i2t.device)
    return (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_i2t.t(), targets, label_smoothing=label_smoothing)) / 2


class ITCObjective(Objective):
    """Stage 1 of SEED: ITC between the LAST causal query's projected, l2-normalised output and the
    text [CLS] projection of the same Q-Former, with the model's learnable temperature (clamped to
    [0.001, 0.5] as the official code does before each use).

    The batch must hold "text" (one caption per image). The tokenizer provides `forward(images)`
    with `encoded.extras["itc_image"]`, `text_features(texts)` and `temperature()`.
    label_smoothing: 0.1 (SEED). gather: negatives from every DDP rank.
    qformer_init: a BLIP-2 checkpoint in LAVIS layout (`blip2_pretrained.pth`) whose Q-Former,
        query tokens, ln_vision, projections and temperature the training starts from (SEED's
        stage 1 does); None: the tokenizer's own initial weights.
    """

    def __init__(self, label_smoothing: float = 0.1, gather: bool = True, qformer_init: str | None = None):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.gather = gather
        self.qformer_init = qformer_init

    def initial_weights(self, tokenizer: nn.Module) -> dict[str, torch.Tensor]:
        if not self.qformer_init:
            return {}
        from tokenizers_vis.models.seed_official import blip2_initial_state

        return blip2_initial_state(self.qformer_init, tokenizer)

    def forward(self, tokenizer: nn.Module, batch: Batch | torch.Tensor, step: int):
        if not isinstance(batch, dict) or "text" not in batch:
            raise ValueError("the ITC objective needs captions: a batch with 'text' (image + caption data, "
                             "webdataset `txt`)")
        images = batch_pixels(batch)
        texts = list(batch["text"])
        if len(texts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(texts)} captions in the batch")
        output = tokenizer(images)
        image_feat = output.encoded.extras["itc_image"]
        text_feat = tokenizer.text_features(texts)
        temp = tokenizer.temperature()
        loss = itc_loss(image_feat, text_feat, temp, self.label_smoothing, self.gather) + output.aux_loss
        logs = {"loss/itc": loss.detach(), "loss/total": loss.detach(), "itc/temp": temp.detach().clone()}
        return loss, logs, output

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, gather={self.gather}"
