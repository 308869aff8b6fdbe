"""Stage 1 of TiTok's two-stage recipe: predict the codes of a frozen MaskGIT-VQGAN ("proxy codes").

A frozen teacher VQGAN maps each image to a grid of codes (16 x 16 of 1024 at 256 px); the TiTok
under training decodes its K tokens into logits over those codes at every grid cell, and learns
by cross-entropy against the teacher's choice. No pixels are decoded during training: the teacher's
own decoder turns (soft) codes back into pixels, which is why the student's frozen `pixel_decoder`
and `pixel_quantize` are initialised from the teacher (`initial_weights`), and stage 2 later
fine-tunes them.

An `Objective` (losses/base.py): `forward(model, batch, step) -> (loss, logs, output)`, the teacher
in `frozen` (kept out of checkpoints and rebuilt from config), no discriminator, and
`initial_weights` supplying the student's pixel decoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.losses.base import Batch, Objective, batch_pixels
from tokenizers_vis.models.base import ModelOutput, Tokenizer
from tokenizers_vis.models.vqgan import VQGAN, load_vqgan
from tokenizers_vis.nn.quantizers import float32

# The Hydra key users set to the teacher weights (named in the missing-teacher error).
TEACHER_KEY = "model.stages.1.objective.teacher"


class ProxyCodeObjective(Objective):
    """loss = CE(proxy-code logits, teacher codes) + aux_weight * the model's quantizer loss.

    teacher: the teacher VQGAN: a MaskGIT-VQGAN state-dict file in the official layout, or one of
        our checkpoints / folders / Hub ids holding a VQGAN (see `models.vqgan.load_vqgan`).
    random_teacher: VQGAN keyword arguments for a teacher with random weights, used when `teacher`
        is None (tests and smoke runs; never a real recipe).
    aux_weight: weight of the model's quantizer loss (1.0 in the released recipe).
    """

    def __init__(self, teacher: str | None = None, random_teacher: Mapping[str, Any] | None = None,
                 aux_weight: float = 1.0):
        super().__init__()
        if aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {aux_weight}")
        if teacher is not None:
            vqgan = load_vqgan(teacher)
        elif random_teacher is not None:
            vqgan = VQGAN(**dict(random_teacher))
        else:
            raise ValueError(f"the proxy-code objective needs a teacher VQGAN: set {TEACHER_KEY}=PATH (the official "
                             "maskgit-vqgan-imagenet-f16-256.bin, or a VQGAN checkpoint / folder of ours)")
        self.aux_weight = aux_weight
        self.add_frozen("teacher", vqgan)

    @property
    def teacher(self) -> VQGAN:
        return self.frozen["teacher"]

    def initial_weights(self, tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
        """The teacher's codebook and decoder as the student's `pixel_quantize` / `pixel_decoder`, so
        that the student's pixels are the teacher's decoding of its predicted codes."""
        if not hasattr(tokenizer, "pixel_weights_from"):
            raise TypeError("the proxy-code objective trains TiTok with head='proxy_codes', "
                            f"got {type(tokenizer).__name__}")
        return tokenizer.pixel_weights_from(self.teacher)

    @torch.no_grad()
    def teacher_codes(self, images: torch.Tensor) -> torch.Tensor:
        """(B, grid, grid) teacher codes, from float32 features: bf16 ones flip nearest-code choices."""
        with float32():
            return self.teacher.code_grid(images.float())

    def forward(
        self, model: nn.Module, batch: Batch | torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], ModelOutput]:
        """Generator objective. Returns (loss, detached logs, the model's output without pixels)."""
        images = batch_pixels(batch)
        codes = self.teacher_codes(images)
        output: ModelOutput = model(images, pixels=False)
        logits = output.encoded.extras["proxy_logits"].float()
        if logits.shape[2:] != codes.shape[1:] or logits.shape[1] != self.teacher.codebook_size:
            raise ValueError(f"the model predicts {logits.shape[1]} codes on a {tuple(logits.shape[2:])} grid, the "
                             f"teacher has {self.teacher.codebook_size} codes on a {tuple(codes.shape[1:])} grid: "
                             "proxy_codebook_size and image_size / patch_size must match the teacher")
        cross_entropy = F.cross_entropy(logits, codes)
        aux = output.aux_loss.float()
        loss = cross_entropy + self.aux_weight * aux
        logs = {
            "loss/proxy_ce": cross_entropy.detach(),
            "loss/aux": aux.detach(),
            "proxy/accuracy": (logits.argmax(dim=1) == codes).float().mean(),
            "loss/total": loss.detach(),
        }
        logs.update({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in output.logs.items()})
        return loss, logs, output

    def extra_repr(self) -> str:
        return f"aux_weight={self.aux_weight}"
