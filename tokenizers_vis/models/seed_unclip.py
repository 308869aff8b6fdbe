"""SEED's de-tokenizer: diffusers' `StableUnCLIPImg2ImgPipeline` (Stable Diffusion 2.1 unCLIP)
conditioned on the predicted CLIP image embedding, frozen and never part of a tokenizer's state.

`UnCLIPDecoder(pretrained=..., subfolder=None, dtype=None)` loads the released pipeline from a folder
or Hub id (`stabilityai/stable-diffusion-2-1-unclip`); `UnCLIPDecoder(config={...}, seed=0)` builds a
tiny random one from config (tests, smoke runs), with every component the pipeline needs.
`generate(embeddings, steps, guidance, generator)`: images in [0, 1], conditioned with noise level 0
on an empty prompt, as SEED-LLaMA decodes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tokenizers_vis.nn.weights import MissingWeightsError

# A tiny pipeline's sizes (`config` keys), each small enough for a CPU test.
TINY_DEFAULTS = {"embed_dim": 1024, "sample_size": 16, "unet_channels": [32, 64], "vae_channels": [32, 32],
                 "text_width": 32, "text_layers": 2, "vision_width": 32, "vision_layers": 2, "vision_image_size": 32,
                 "num_train_timesteps": 1000}


def build_tiny_pipeline(config: Mapping[str, Any]):
    """A random `StableUnCLIPImg2ImgPipeline` from a few sizes: the SD 2.1 unCLIP layout (v-prediction
    DDIM, projection class embedding of [noised image embedding, noise-level embedding]), shrunk."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    unknown = sorted(set(config) - set(TINY_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown tiny unCLIP config keys {unknown}; known: {sorted(TINY_DEFAULTS)}")
    c = {**TINY_DEFAULTS, **dict(config)}
    e, text = c["embed_dim"], c["text_width"]
    unet = UNet2DConditionModel(
        sample_size=c["sample_size"], in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(c["unet_channels"]), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=text, attention_head_dim=2,
        norm_num_groups=8, class_embed_type="projection", projection_class_embeddings_input_dim=2 * e,
        use_linear_projection=True)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(c["vae_channels"]),
                        down_block_types=("DownEncoderBlock2D",) * len(c["vae_channels"]),
                        up_block_types=("UpDecoderBlock2D",) * len(c["vae_channels"]), norm_num_groups=8,
                        sample_size=c["sample_size"] * 2 ** (len(c["vae_channels"]) - 1))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=100, hidden_size=text, intermediate_size=2 * text, num_hidden_layers=c["text_layers"],
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=c["vision_width"], intermediate_size=2 * c["vision_width"], num_hidden_layers=c["vision_layers"],
        num_attention_heads=2, image_size=c["vision_image_size"], patch_size=8, projection_dim=e))
    steps = c["num_train_timesteps"]
    return StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=c["vision_image_size"], size=c["vision_image_size"]),
        image_encoder=image_encoder, image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=e),
        image_noising_scheduler=DDPMScheduler(num_train_timesteps=steps, beta_schedule="squaredcos_cap_v2"),
        tokenizer=None, text_encoder=text_encoder, unet=unet,
        scheduler=DDIMScheduler(num_train_timesteps=steps, beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012, prediction_type="v_prediction", set_alpha_to_one=False,
                                steps_offset=1, clip_sample=False),
        vae=vae)


class UnCLIPDecoder:
    """The frozen unCLIP pipeline (a plain object, not an nn.Module: it never enters a state dict,
    an optimizer or an EMA copy).

    pretrained: folder or Hub id of the diffusers pipeline (offline: the Hub cache); or None with
        `config` (the `TINY_DEFAULTS` keys) for a random tiny pipeline drawn from `seed`.
    dtype: "float16" / "bfloat16" / "float32" (None: float32).
    """

    def __init__(self, pretrained: str | None = None, subfolder: str | None = None,
                 config: Mapping[str, Any] | None = None, seed: int = 0, dtype: str | None = None):
        if pretrained:
            from diffusers import StableUnCLIPImg2ImgPipeline

            kwargs = {"subfolder": subfolder} if subfolder else {}
            index = Path(pretrained, subfolder or "", "model_index.json")
            if index.is_file() and json.loads(index.read_text()).get("tokenizer", [None])[0] is None:
                kwargs["tokenizer"] = None  # a saved tiny pipeline has none (the empty prompt needs no tokenizer)
            try:
                self.pipeline = StableUnCLIPImg2ImgPipeline.from_pretrained(pretrained, **kwargs)
            except (OSError, ValueError) as err:
                raise MissingWeightsError(
                    f"could not load model.tokenizer.unclip.pretrained={pretrained!r} ({err}). Download it where "
                    f"there is network (`hf download {pretrained} --local-dir DIR`) and set it to DIR.") from err
        elif config is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.pipeline = build_tiny_pipeline(config)
        else:
            raise ValueError("an unCLIP decoder needs `pretrained` (a folder or Hub id) or a tiny `config`")
        self.pipeline.set_progress_bar_config(disable=True)
        for part in self.pipeline.components.values():
            if isinstance(part, torch.nn.Module):
                part.requires_grad_(False).eval()
        if dtype:
            self.pipeline.to(dtype=getattr(torch, dtype))
        self._empty_prompt: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device

    @property
    def embed_dim(self) -> int:
        return int(self.pipeline.image_normalizer.mean.shape[-1])

    def to(self, device) -> UnCLIPDecoder:
        self.pipeline.to(device)
        self._empty_prompt = None
        return self

    @torch.no_grad()
    def empty_prompt_embeds(self) -> torch.Tensor:
        """(1, L, width) text-encoder states of the empty prompt (what SEED-LLaMA conditions on)."""
        if self._empty_prompt is None:
            pipe = self.pipeline
            if pipe.tokenizer is not None:
                ids = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids
            else:  # a tiny pipeline has no tokenizer: [bos, eos, pad, ...] as CLIP's tokenizer gives
                cfg = pipe.text_encoder.config
                ids = torch.tensor([[cfg.bos_token_id, cfg.eos_token_id]
                                    + [cfg.pad_token_id] * (cfg.max_position_embeddings - 2)])
            self._empty_prompt = pipe.text_encoder(ids.to(self.device))[0]
        return self._empty_prompt

    @torch.no_grad()
    def generate(self, embeddings: torch.Tensor, steps: int = 20, guidance: float = 10.0,
                 generator: torch.Generator | None = None, noise_level: int = 0,
                 size: int | None = None) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] for (B, embed_dim) image embeddings (H = W = `size` or the
        pipeline's native resolution)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"expected image embeddings of shape (B, {self.embed_dim}), got {tuple(embeddings.shape)}")
        pipe = self.pipeline
        dtype = pipe.unet.dtype
        prompt = self.empty_prompt_embeds().to(dtype).expand(embeddings.shape[0], -1, -1)
        side = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
        images = pipe(image_embeds=embeddings.to(self.device, dtype), prompt_embeds=prompt,
                      negative_prompt_embeds=prompt, noise_level=noise_level, num_inference_steps=steps,
                      guidance_scale=guidance, generator=generator, height=side, width=side, output_type="pt").images
        return images.float()
