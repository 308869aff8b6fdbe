"""Divot: a video tokenizer learned by diffusion (TencentARC/Divot).

Encoder (continuous tokens, no codebook), on the 5 sparse frames (clip positions 0, 4, 8, 12, 15 of
16) after the official transform (shorter side to 256, centre crop, [-1, 1]; inside: bicubic 224,
CLIP mean/std):
  frame_vit          frozen OpenCLIP ViT (ViT-H/14 laion2b); patch tokens before `ln_post`
  temporal_encoder   per patch position over the frames: input_proj, + position, pre-LN blocks
                     (LayerNorm eps 1e-6, QuickGELU), ln_final, output_proj
  (pool)             per frame, G x G -> p x p AdaptiveAvgPool2d, tokens frame-major (f h w)
  norm               LayerNorm (eps 1e-6)
  st_transformer     + spatial and temporal position embeddings, ViT blocks (eps 1e-6), LayerNorm
  resampler          Perceiver resampler -> num_tokens x token_dim (64 x 256)
De-tokenizer: `context_resampler` (a second Perceiver resampler, tokens -> 125 x context_dim) feeds the
cross-attention of a DynamiCrafter 3D UNet (`nn.unet3d.VideoUNet`) that denoises the 16 frames'
per-frame KL-f8 VAE latents; v-prediction, zero-terminal-SNR scaled-linear betas, the release's DDIM
(`nn.ddim.RoundedScheduleDDIM`, eta 1), CFG with the context of an all-zero (internal [-1, 1]) video
and guidance rescale. All of it sits behind the shared `DiffusionDecoder` (`self.decoder`).
Weights of the release load through `divot_official.py`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.models.base import Encoded, ModelOutput, Tokenizer, register_tokenizer
from tokenizers_vis.nn.bottleneck import PerceiverResampler
from tokenizers_vis.nn.ddim import RoundedScheduleDDIM
from tokenizers_vis.nn.diffusion_decoder import ConditionAdapter, DiffusionDecoder
from tokenizers_vis.nn.pretrained import FrozenVAE
from tokenizers_vis.nn.transformer import Transformer, TransformerBlock
from tokenizers_vis.nn.unet3d import VideoUNet
from tokenizers_vis.nn.vision_towers import CLIP_MEAN, CLIP_STD
from tokenizers_vis.nn.weights import MissingWeightsError

FRAME_POSITIONS = (0, 4, 8, 12, 15)
RELEASED_FRAME_VIT = "ViT-H-14/laion2b_s32b_b79k"  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K


def sparse_frame_positions(num_frames: int = 16, stride: int = 4) -> list[int]:
    """Every `stride`-th frame plus the last: [0, 4, 8, 12, 15] for 16 frames."""
    positions = list(range(0, num_frames, stride))
    return positions + [num_frames - 1] if positions[-1] != num_frames - 1 else positions


class FrameViT(nn.Module):
    """An OpenCLIP `VisionTransformer` (held as `model`, open_clip names) giving the tokens before
    `ln_post` (class token dropped). pretrained: None (random, from `config`), a local state-dict
    file of the visual tower, or an open_clip "NAME/TAG" (offline: the Hub cache)."""

    def __init__(self, pretrained: str | None = None, config: Mapping[str, Any] | None = None):
        super().__init__()
        from pathlib import Path

        if pretrained is None or Path(str(pretrained)).exists():
            if config is None:
                raise ValueError("frame_vit needs `config` (image_size, patch_size, width, layers, head_width, "
                                 "mlp_ratio, output_dim) to be built from a file or with random weights")
            self.model = self._build(**dict(config))
            if pretrained is not None:
                from tokenizers_vis.nn.weights import read_state_file

                state = read_state_file(Path(pretrained))
                state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
                self.model.load_state_dict(state, strict=True)
        else:
            self.model = self._from_open_clip(str(pretrained))

    @staticmethod
    def _build(image_size: int = 224, patch_size: int = 14, width: int = 1280, layers: int = 32,
               head_width: int = 80, mlp_ratio: float = 4.0, output_dim: int = 1024) -> nn.Module:
        from open_clip.transformer import LayerNorm, VisionTransformer

        # open_clip's non-OpenAI layout (laion ViT-H/14): exact GELU, LayerNorm eps 1e-5.
        return VisionTransformer(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
                                 heads=width // head_width, mlp_ratio=mlp_ratio, output_dim=output_dim,
                                 act_layer=nn.GELU, norm_layer=LayerNorm)

    @staticmethod
    def _from_open_clip(pretrained: str) -> nn.Module:
        import open_clip

        name, _, tag = pretrained.partition("/")
        try:
            return open_clip.create_model(name, pretrained=tag or None).visual
        except Exception as err:
            raise MissingWeightsError(
                f"could not load frame_vit.pretrained={pretrained!r} ({err}). Fetch it where there is network "
                f"(open_clip.create_model({name!r}, pretrained={tag!r}) fills the Hub cache), or point "
                f"frame_vit.pretrained at a local state-dict file of the visual tower with its `config`.") from err

    def architecture(self) -> dict[str, Any]:
        m = self.model
        width = int(m.conv1.out_channels)
        block = m.transformer.resblocks[0]
        return {"image_size": int(m.image_size[0]) if isinstance(m.image_size, tuple) else int(m.image_size),
                "patch_size": int(m.conv1.kernel_size[0]), "width": width, "layers": len(m.transformer.resblocks),
                "head_width": width // int(block.attn.num_heads), "mlp_ratio": block.mlp.c_fc.out_features / width,
                "output_dim": int(m.proj.shape[1])}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised (N, 3, S, S) -> (N, G*G, width)."""
        m = self.model
        x = m.conv1(images).flatten(2).transpose(1, 2)
        cls = m.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = m.ln_pre(torch.cat([cls, x], dim=1) + m.positional_embedding.to(x.dtype))
        x = m.transformer(x) if getattr(m.transformer, "batch_first", False) else \
            m.transformer(x.transpose(0, 1)).transpose(0, 1)
        return x[:, 1:]


class TemporalEncoder(nn.Module):
    """Divot's MotionPredictor over (N, T, input_dim): input_proj, + positional_embedding (T x width),
    pre-LN blocks (eps 1e-6, QuickGELU), ln_final, output_proj."""

    def __init__(self, input_dim: int, width: int, depth: int, heads: int, output_dim: int, num_frames: int):
        super().__init__()
        self.input_proj = nn.Linear(input_dim, width)
        self.positional_embedding = nn.Parameter(torch.zeros(num_frames, width))
        self.transformer = Transformer(width, depth, heads, mlp_kind="quick_gelu", norm_eps=1e-6)
        self.ln_final = nn.LayerNorm(width, eps=1e-6)
        self.output_proj = nn.Linear(width, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x) + self.positional_embedding.to(x.dtype)
        return self.output_proj(self.ln_final(self.transformer(x)))


class SpatialTemporalTransformer(nn.Module):
    """+ pos_embed_spatial[s] + pos_embed_temporal[f] on token f*p*p + s; ViT blocks; LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, num_frames: int, num_positions: int):
        super().__init__()
        self.pos_embed_spatial = nn.Parameter(torch.randn(num_positions, dim) * 0.02)
        self.pos_embed_temporal = nn.Parameter(torch.randn(num_frames, dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, norm_eps=1e-6) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        pos = (self.pos_embed_temporal[:, None, :] + self.pos_embed_spatial[None, :, :]).flatten(0, 1)
        return x + pos.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class DivotCondition(ConditionAdapter):
    """Condition = (context, unconditional context); the UNet takes `context` and the frame stride `fs`."""

    def __init__(self, fs: int = 3):
        super().__init__(key="context", extra={"fs": None})
        self.fs = fs

    def _fs(self, context: torch.Tensor) -> torch.Tensor:
        return torch.full((context.shape[0],), self.fs, dtype=torch.long, device=context.device)

    def __call__(self, condition) -> dict[str, Any]:
        context = condition[0] if isinstance(condition, (tuple, list)) else condition
        return {"context": context, "fs": self._fs(context)}

    def unconditional(self, condition) -> dict[str, Any]:
        context, uncond = condition
        return {"context": uncond.expand_as(context), "fs": self._fs(context)}


def _perceiver(dim: int, depth: int, heads: int, head_dim: int, num_latents: int, input_dim: int,
               output_dim: int) -> PerceiverResampler:
    # Divot's Resampler: proj_in always present, 4x bias-free GELU MLP, biased projections, LN eps 1e-5.
    return PerceiverResampler(dim, depth, heads, num_latents, input_dim=input_dim, output_dim=output_dim,
                              head_dim=head_dim, input_proj=True)


@register_tokenizer
class Divot(Tokenizer):
    """Divot (see the module docstring).

    frame_vit: {"pretrained": None | file | "ViT-H-14/laion2b_s32b_b79k", "config": {...}, "source": where the
        weights came from (recorded in saved configs, never read)}.
    unet: `VideoUNet` arguments; vae: `FrozenVAE` arguments (None: encode-only, no de-tokenizer).
    scheduler: `RoundedScheduleDDIM` arguments. fs: frame-stride condition of the UNet (3).
    condition_dropout: probability of training on the unconditional context (for CFG).
    sample_steps: DDIM steps of `decode` when none are given (50, the release's).
    frozen: parts that do not train (the frame ViT always; the VAE is frozen by construction).
    """

    model_type = "divot"
    input_kind = "video"
    codebook_size = None

    def __init__(
        self,
        frame_vit: Mapping[str, Any] | None = None,
        num_frames: int = 16,
        frame_stride: int = 4,
        image_size: int = 256,
        vit_image_size: int = 224,
        video_size: int = 256,
        temporal_width: int = 768,
        temporal_depth: int = 6,
        temporal_heads: int = 12,
        hidden_size: int = 1024,
        pool_size: int = 5,
        st_depth: int = 4,
        st_heads: int = 8,
        num_tokens: int = 64,
        token_dim: int = 256,
        resampler_depth: int = 6,
        resampler_heads: int = 16,
        resampler_head_dim: int = 64,
        context_tokens: int = 125,
        context_dim: int = 1024,
        context_depth: int = 6,
        context_heads: int = 16,
        context_head_dim: int = 64,
        unet: Mapping[str, Any] | None = None,
        vae: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        fs: int = 3,
        condition_dropout: float = 0.1,
        sample_steps: int = 50,
        frozen: Sequence[str] = ("frame_vit",),
    ):
        super().__init__()
        self.num_frames, self.image_size, self.vit_image_size = num_frames, image_size, vit_image_size
        self.video_size = video_size
        self.frame_positions = sparse_frame_positions(num_frames, frame_stride)
        self.pool_size, self.num_tokens, self.token_dim = pool_size, num_tokens, token_dim
        self.condition_dropout = condition_dropout
        self.sample_steps = sample_steps
        fv = dict(frame_vit or {"pretrained": RELEASED_FRAME_VIT, "config": None})
        self.frame_vit = FrameViT(fv.get("pretrained"), fv.get("config"))  # `source`: recorded only
        n = len(self.frame_positions)
        self.temporal_encoder = TemporalEncoder(self.frame_vit.model.conv1.out_channels, temporal_width,
                                                temporal_depth, temporal_heads, hidden_size, n)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.st_transformer = SpatialTemporalTransformer(hidden_size, st_depth, st_heads, n, pool_size ** 2)
        self.resampler = _perceiver(hidden_size, resampler_depth, resampler_heads, resampler_head_dim, num_tokens,
                                    hidden_size, token_dim)
        self.context_resampler = _perceiver(context_dim, context_depth, context_heads, context_head_dim,
                                            context_tokens, token_dim, context_dim)
        self.decoder = None
        if unet is not None and vae is not None:
            unet_args = {"context_dim": context_dim, **dict(unet)}
            self.decoder = DiffusionDecoder(VideoUNet(**unet_args), RoundedScheduleDDIM(**dict(scheduler or {})),
                                            condition=DivotCondition(fs), vae=FrozenVAE(**dict(vae)))
        self.freeze_parts(frozen=tuple(frozen))

    @property
    def config(self) -> dict[str, Any]:
        """The architecture config with the frame ViT and the VAE recorded by architecture (their
        weights travel in the state dict), so a saved or exported Divot rebuilds offline; the ViT's
        source stays as `frame_vit.source`."""
        from tokenizers_vis.models.base import _plain

        config = super().config
        source = (config.get("frame_vit") or {}).get("pretrained", RELEASED_FRAME_VIT)
        config["frame_vit"] = {"pretrained": None, "config": self.frame_vit.architecture(),
                               "source": config["frame_vit"].get("source", source) if config.get("frame_vit") else source}
        if self.decoder is not None:
            config["vae"] = _plain(self.decoder.vae.rebuild_arguments())
        return config

    # -- encoder ---------------------------------------------------------------------------------
    def official_transform(self, frames: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> the release's [-1, 1] input: shorter side to `size` (default
        `image_size`; antialiased bilinear, as PIL), centre crop, x * 2 - 1."""
        h, w = frames.shape[-2:]
        s = size or self.image_size
        if min(h, w) != s:
            scale = s / min(h, w)
            size = (max(s, int(round(h * scale))), max(s, int(round(w * scale))))
            frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)
            h, w = size
        top, left = (h - s) // 2, (w - s) // 2
        return frames[..., top:top + s, left:left + s] * 2 - 1

    def vit_input(self, frames: torch.Tensor) -> torch.Tensor:
        """[-1, 1] frames -> what the ViT's patch conv sees: bicubic (align_corners) to 224, CLIP mean/std.
        (The release's kornia antialias blur is the identity at 256 -> 224: sigma 0.07.)"""
        s = self.vit_image_size
        if frames.shape[-2:] != (s, s):
            frames = F.interpolate(frames, size=(s, s), mode="bicubic", align_corners=True)
        x = (frames + 1) / 2
        mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def select_frames(self, video: torch.Tensor) -> torch.Tensor:
        return video[:, self.frame_positions]

    def stages(self, video_m11: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every encoder stage from the sparse frames in [-1, 1] (B, T, 3, S, S)."""
        b, t = video_m11.shape[:2]
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad() if "frame_vit" in self.frozen_parts else torch.enable_grad():
            vit = self.frame_vit(self.vit_input(video_m11.flatten(0, 1)))
        out["vit"] = vit = vit.view(b, t, *vit.shape[1:])  # (b, f, n, c)
        n = vit.shape[2]
        temporal = self.temporal_encoder(vit.transpose(1, 2).flatten(0, 1))  # ((b n), f, c)
        out["temporal"] = temporal = temporal.view(b, n, t, -1).transpose(1, 2)  # (b, f, n, c)
        g = math.isqrt(n)
        grid = temporal.flatten(0, 1).transpose(1, 2).reshape(b * t, -1, g, g)
        pooled = F.adaptive_avg_pool2d(grid, self.pool_size).flatten(2).transpose(1, 2)  # ((b f), p*p, c)
        out["pool"] = pooled = pooled.reshape(b, t * self.pool_size ** 2, -1)
        out["normed"] = normed = self.norm(pooled)
        out["st_input"] = self.st_transformer.embed(normed)
        out["st"] = st = self.st_transformer(normed)
        out["tokens"] = self.resampler(st)
        return out

    def tokens_from_frames(self, video_m11: torch.Tensor) -> torch.Tensor:
        return self.stages(video_m11)["tokens"]

    def encode(self, video: torch.Tensor) -> Encoded:
        """video (B, 16, 3, H, W) in [0, 1] -> `Encoded(ids=None, latents=(B, num_tokens, token_dim))`."""
        video = self.as_clip(video)
        frames = self.select_frames(video)
        b, t = frames.shape[:2]
        frames = self.official_transform(frames.flatten(0, 1)).view(b, t, 3, self.image_size, self.image_size)
        return Encoded(ids=None, latents=self.tokens_from_frames(frames))

    def _check_clip(self, video: torch.Tensor) -> None:
        # Any frame size: the official transform resizes and centre-crops non-square clips.
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[2] != 3:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"expected video of shape (B, {self.num_frames}, 3, H, W) in [0, 1], got {shape}")
        if video.shape[1] != self.num_frames:
            raise ValueError(f"Divot takes clips of {self.num_frames} frames, got {video.shape[1]}")
        if not video.is_floating_point():
            raise ValueError(f"expected float video in [0, 1], got dtype {video.dtype}")

    def unconditional_tokens(self, device=None, dtype=None) -> torch.Tensor:
        """Tokens of an all-zero video in the release's [-1, 1] range (its CFG input), (1, K, D)."""
        p = next(self.parameters())
        s = self.image_size
        zeros = torch.zeros(1, len(self.frame_positions), 3, s, s, device=device or p.device, dtype=dtype or p.dtype)
        return self.tokens_from_frames(zeros)

    # -- de-tokenizer ----------------------------------------------------------------------------
    def _require_decoder(self) -> DiffusionDecoder:
        if self.decoder is None:
            raise ValueError("this Divot has no de-tokenizer (built without `unet` and `vae`)")
        return self.decoder

    def contexts(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-attention context of the tokens, that of the unconditional tokens)."""
        uncond = self.unconditional_tokens(tokens.device, tokens.dtype)
        return self.context_resampler(tokens), self.context_resampler(uncond)

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        vae = self._require_decoder().vae
        side = self.video_size // vae.downsample
        return (batch, vae.latent_channels, self.num_frames, side, side)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, T, h, w) scaled latents -> (B, T, 3, H, W) in [-1, 1] (per-frame VAE decode, not clamped)."""
        b, c, t, h, w = latents.shape
        frames = self._require_decoder().vae.decode(latents.transpose(1, 2).reshape(b * t, c, h, w))
        return frames.view(b, t, *frames.shape[1:])

    def encode_latents(self, video_m11: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) in [-1, 1] -> (B, C, T, h, w) scaled posterior-mean latents."""
        b, t = video_m11.shape[:2]
        z = self._require_decoder().vae.encode(video_m11.flatten(0, 1))
        return z.view(b, t, *z.shape[1:]).transpose(1, 2)

    def sample_latents(self, tokens: torch.Tensor, steps: int = 50, guidance: float = 7.5,
                       guidance_rescale: float = 0.7, noise=None, generator: torch.Generator | None = None,
                       eta: float = 1.0) -> torch.Tensor:
        decoder = self._require_decoder()
        cond, uncond = self.contexts(tokens)
        shape = self.latent_shape(tokens.shape[0])
        return decoder.sample((cond, uncond), steps, guidance, noise, generator, shape=shape,
                              guidance_rescale=guidance_rescale, eta=eta)

    def decode(self, encoded: Encoded | torch.Tensor, steps: int | None = None, guidance: float = 7.5,
               guidance_rescale: float = 0.7, noise=None, generator: torch.Generator | None = None,
               eta: float = 1.0) -> torch.Tensor:
        """Tokens (an `Encoded` or (B, K, D)) -> video (B, 16, 3, H, W) in [0, 1] (not clamped); steps
        None: `sample_steps` (50, the release's).

        noise: None, or every draw in order: the initial latent, then each DDIM step's noise, each
        (B, 4, T, h, w) (the release's layout), so a decode replays exactly."""
        tokens = encoded.latents if isinstance(encoded, Encoded) else encoded
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (self.num_tokens, self.token_dim):
            raise ValueError(f"Divot tokens are (B, {self.num_tokens}, {self.token_dim}), got {tuple(tokens.shape)}")
        steps = self.sample_steps if steps is None else steps
        latents = self.sample_latents(tokens, steps, guidance, guidance_rescale, noise, generator, eta)
        video = (self.decode_latents(latents) + 1) / 2
        return video[:, 0] if self.num_frames == 1 else video

    # -- training ----------------------------------------------------------------------------------
    def as_clip(self, pixels: torch.Tensor) -> torch.Tensor:
        """A batch's pixels as clips: video as it is; images (B, 3, H, W) as one-frame clips, which
        only a `num_frames=1` Divot takes (the image pipelines' smoke runs)."""
        if pixels.dim() == 4:
            if self.num_frames != 1:
                raise ValueError(f"this Divot takes clips of {self.num_frames} frames (B, T, 3, H, W), got images "
                                 f"{tuple(pixels.shape)}")
            return pixels.unsqueeze(1)
        self._check_clip(pixels)
        return pixels

    @staticmethod
    def from_clip(video: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Back to the layout of `like`: images for a 4-D batch."""
        return video[:, 0] if like.dim() == 4 else video

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the UNet's layers and the encoder's transformer blocks in the backward pass."""
        self.temporal_encoder.transformer.gradient_checkpointing = enabled
        if self.decoder is not None:
            self.decoder.denoiser.gradient_checkpointing = enabled

    def denoising_step(self, video: torch.Tensor, generator: torch.Generator | None = None):
        """One denoising pass on the dense frames' latents conditioned on the tokens of the sparse
        frames (CFG dropout: a clip's context is the unconditional one with probability
        `condition_dropout` while training). Returns (`DiffusionTrainingStep`, tokens)."""
        decoder = self._require_decoder()
        b, t = video.shape[:2]
        frames = self.select_frames(video)
        sparse = self.official_transform(frames.flatten(0, 1)).view(b, -1, 3, self.image_size, self.image_size)
        dense = self.official_transform(video.flatten(0, 1), self.video_size)
        with torch.no_grad():
            x0 = self.encode_latents(dense.view(b, t, 3, self.video_size, self.video_size))
        tokens = self.tokens_from_frames(sparse)
        cond, uncond = self.contexts(tokens)
        if self.training and self.condition_dropout > 0:
            if generator is None:
                draw = torch.rand(b, device=cond.device)
            else:
                draw = torch.rand(b, generator=generator, device=generator.device).to(cond.device)
            drop = (draw < self.condition_dropout).view(b, 1, 1)
            cond = torch.where(drop, uncond.expand_as(cond), cond)
        return decoder.training_step(x0, cond, generator=generator), tokens

    def denoising_loss(self, video: torch.Tensor, generator: torch.Generator | None = None):
        """(v-prediction MSE of `denoising_step`, logs)."""
        train, tokens = self.denoising_step(video, generator)
        loss = F.mse_loss(train.prediction.float(), train.target.float())
        return loss, {"loss/diffusion": loss.detach(), "tokens/std": tokens.detach().float().std()}

    def forward(self, pixels: torch.Tensor) -> ModelOutput:
        """A training step's view: the denoising loss as `aux_loss`, no reconstruction (a 50-step
        sampling run per step would dominate training; evaluation calls `reconstruct`)."""
        loss, logs = self.denoising_loss(self.as_clip(pixels))
        return ModelOutput(reconstruction=None, aux_loss=loss, logs=logs)
