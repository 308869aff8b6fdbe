"""A frozen CLIP image encoder with its projection: [0, 1] images -> CLIP image embeddings.

The target of image-embedding heads (SEED's head (b): the 1024-d ViT-H/14 embedding Stable
Diffusion 2.1 unCLIP is conditioned on) and the measure of how close predicted embeddings come.
transformers' `CLIPVisionModelWithProjection`:

pretrained: a folder or Hub id (`subfolder` inside it: "image_encoder" of
    `stabilityai/stable-diffusion-2-1-unclip`; or `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` itself);
    None builds `config` (CLIPVisionConfig arguments) with random weights drawn from `seed` without
    touching the global random state (tests, and a model whose target must be rebuilt identically).
Images are resized to the encoder's image_size (bicubic, antialiased; square inputs need no crop)
and normalised with CLIP's mean/std, as `CLIPImageProcessor` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from tokenizers_vis.nn.pretrained import FrozenModule, _from_pretrained
from tokenizers_vis.nn.vision_towers import CLIP_MEAN, CLIP_STD

__all__ = ["FrozenCLIPImageEmbedder"]


class FrozenCLIPImageEmbedder(FrozenModule):
    def __init__(self, pretrained: str | None = None, subfolder: str | None = None,
                 config: Mapping[str, Any] | None = None, seed: int = 0,
                 config_key: str = "objective.clip_target.pretrained"):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        if pretrained:
            kwargs = {"subfolder": subfolder} if subfolder else {}
            self.model = _from_pretrained(CLIPVisionModelWithProjection, pretrained, config_key, **kwargs)
        elif config is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = CLIPVisionModelWithProjection(CLIPVisionConfig(**dict(config)))
        else:
            raise ValueError(f"a CLIP image encoder needs {config_key} (a folder or Hub id) or a config (random)")
        self.image_size = int(self.model.config.image_size)
        self.embed_dim = int(self.model.config.projection_dim)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, projection_dim) image embeddings (not normalised) of [0, 1] images, float32."""
        dtype = next(self.model.parameters()).dtype
        return self.model(pixel_values=self.pixel_values(images).to(dtype)).image_embeds.float()
