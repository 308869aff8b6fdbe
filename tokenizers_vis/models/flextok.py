"""FlexTok: "Resampling Images into 1D Token Sequences of Flexible Length" (Bachmann et al., 2025).

An image becomes 1 to N ordered discrete tokens:
- a frozen VAE maps it to latents (or, with `vae=None`, the model works on pixel patches);
- the encoder reads [latent patches + 2-D sin-cos position, N learned registers] under the
  prefix-causal mask (patches see patches; register i sees all patches and registers <= i) and
  projects the registers to the FSQ [8, 8, 8, 5, 5, 5] codes;
- nested dropout keeps the first k registers and replaces the rest by one learned mask token, so
  every prefix must describe the image on its own (coarse to fine);
- the decoder is a rectified-flow transformer over [noised latent patches, registers] with
  adaLN-zero time modulation (one set for patches, one for registers) that predicts the velocity;
  the registers are replaced by a learned null condition for classifier-free guidance. Its training
  pass and sampler go through the shared `DiffusionDecoder` (`flow_decoder()`).

Blocks follow the released model: pre-norm without affine, QK-norm, SwiGLU, no biases, attention
scale 8/head_dim (muP). Parameter names are ours; `tokenizers_vis.models.flextok_official` maps
the released checkpoints onto them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from tokenizers_vis.models.base import Encoded, ModelOutput, Tokenizer, _plain, register_tokenizer
from tokenizers_vis.nn.attention import prefix_causal_mask
from tokenizers_vis.nn.diffusion import denoised_estimate
from tokenizers_vis.nn.diffusion_decoder import ConditionAdapter, DiffusionDecoder, RectifiedFlowEuler
from tokenizers_vis.nn.quantizers import build_quantizer
from tokenizers_vis.nn.transformer import PatchEmbed, Transformer, init_vit_weights, sincos_2d_position_embedding

NESTED_DROPOUT_MODES = ("none", "uniform", "pow2", "uniform_pow2")


def flextok_block_kwargs(width: int, heads: int, mlp_ratio: float, attention_scale: float | None,
                         norm_eps: float) -> dict[str, Any]:
    """Options of the shared `TransformerBlock` that give the FlexTok block."""
    head_dim = width // heads
    return {
        "mlp_kind": "swiglu",
        # SwiGLU keeps the parameter count of a GELU MLP of ratio r with hidden width 2/3 * r * D.
        "mlp_hidden_dim": int(2 * int(width * mlp_ratio) / 3),
        "bias": False,
        "qk_norm": True,
        "norm_affine": False,
        "norm_eps": norm_eps,
        "attn_scale": attention_scale if attention_scale is not None else 8.0 / head_dim,
    }


def size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from a side or a pair."""
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2:
        raise ValueError(f"an image size is a side or (height, width), got {size!r}")
    return int(pair[0]), int(pair[1])


class GridPositions(nn.Module):
    """Fixed 2-D sin-cos positions (MAE layout, row-major) for every patch grid up to `max_grid`
    (rows, columns): one table, cropped to each input's grid, as the released FlexTok crops its
    `posembs` of shape `max_sizes`. Position (i, j) has the same vector on every grid."""

    def __init__(self, max_grid: tuple[int, int], width: int):
        super().__init__()
        self.max_grid = (int(max_grid[0]), int(max_grid[1]))
        side = max(self.max_grid)
        table = sincos_2d_position_embedding(side, width).reshape(side, side, width)
        self.register_buffer("table", table[:self.max_grid[0], :self.max_grid[1]].contiguous(), persistent=False)

    def forward(self, rows: int, cols: int) -> torch.Tensor:
        """(rows * cols, width), row-major."""
        if rows > self.max_grid[0] or cols > self.max_grid[1]:
            raise ValueError(f"a {rows}x{cols} patch grid exceeds the largest this FlexTok's position tables "
                             f"cover, {self.max_grid[0]}x{self.max_grid[1]} (max_image_size)")
        return self.table[:rows, :cols].reshape(rows * cols, -1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of t * time_scale -> MLP.

    Frequencies time_scale * max_period**(-k / half), cos first: the released FlexTok's choice
    (time_scale 1000, max_period 256, 256 features).
    """

    def __init__(self, dim: int, frequency_dim: int = 256, max_period: float = 256.0, time_scale: float = 1000.0):
        super().__init__()
        half = frequency_dim // 2
        freqs = time_scale * torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype))


class FlexTokEncoder(nn.Module):
    def __init__(self, in_channels: int, patch_size: int, grid_size: int, num_registers: int, width: int,
                 depth: int, heads: int, token_dim: int, block_kwargs: Mapping[str, Any], register_init_std: float,
                 max_grid: tuple[int, int] | None = None):
        super().__init__()
        self.grid_size = grid_size
        self.num_registers = num_registers
        self.patch_embed = PatchEmbed(patch_size, in_channels, width)
        self.positions = GridPositions(max_grid or (grid_size, grid_size), width)
        self.registers = nn.Parameter(torch.randn(num_registers, width) * register_init_std)
        self.transformer = Transformer(width, depth, heads, **block_kwargs)
        self.norm = nn.LayerNorm(width, eps=block_kwargs["norm_eps"], elementwise_affine=False)
        self.head = nn.Linear(width, token_dim)
        # The mask of the default grid; other grids build theirs on use.
        mask = prefix_causal_mask(grid_size**2, num_registers)
        self.register_buffer("mask", mask, persistent=False)

    @property
    def pos_embed(self) -> torch.Tensor:
        """The positions of the default (image_size) grid."""
        return self.positions(self.grid_size, self.grid_size)

    def attention_mask(self, num_patches: int, device) -> torch.Tensor:
        if num_patches + self.num_registers == self.mask.shape[0]:
            return self.mask
        return prefix_causal_mask(num_patches, self.num_registers, device=device)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        rows, cols = (side // self.patch_embed.patch_size for side in latents.shape[-2:])
        x = self.patch_embed(latents) + self.positions(rows, cols)
        x = torch.cat([x, self.registers.expand(x.shape[0], -1, -1)], dim=1)
        x = self.transformer(x, self.attention_mask(rows * cols, x.device))
        return self.head(self.norm(x[:, -self.num_registers:]))


class ModulatedPatchHead(nn.Module):
    """DiT final layer: LayerNorm, time shift / scale, Linear to patch values, unpatchify."""

    def __init__(self, width: int, patch_size: int, out_channels: int, norm_eps: float):
        super().__init__()
        self.patch_size = patch_size
        self.norm = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.modulation = nn.Linear(width, 2 * width)
        # Output order (p q c) per token, the layout of the released head.
        self.proj = nn.Linear(width, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(cond)).chunk(2, dim=-1)
        x = self.proj(self.norm(x) * (1 + scale[:, None]) + shift[:, None])
        p = self.patch_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=rows, w=cols, p=p, q=p)


class FlexTokDecoder(nn.Module):
    def __init__(self, in_channels: int, patch_size: int, grid_size: int, num_registers: int, width: int,
                 depth: int, heads: int, token_dim: int, block_kwargs: Mapping[str, Any], register_init_std: float,
                 max_grid: tuple[int, int] | None = None):
        super().__init__()
        self.grid_size = grid_size
        self.num_registers = num_registers
        self.token_embed = nn.Linear(token_dim, width)
        self.register_pos_embed = nn.Parameter(torch.randn(num_registers, width) * register_init_std)
        self.mask_token = nn.Parameter(torch.randn(width) * 0.02)
        self.null_condition = nn.Parameter(torch.randn(width) * 0.02)
        self.patch_embed = PatchEmbed(patch_size, in_channels, width)
        self.positions = GridPositions(max_grid or (grid_size, grid_size), width)
        self.time_embed = TimestepEmbedder(width)
        # Two modulation groups: patch tokens (0) and registers (1).
        self.transformer = Transformer(width, depth, heads, modulation_dim=width, modulation_groups=2, **block_kwargs)
        groups = torch.cat([torch.zeros(grid_size**2, dtype=torch.long), torch.ones(num_registers, dtype=torch.long)])
        self.register_buffer("groups", groups, persistent=False)
        self.head = ModulatedPatchHead(width, patch_size, in_channels, block_kwargs["norm_eps"])

    @property
    def pos_embed(self) -> torch.Tensor:
        """The positions of the default (image_size) grid."""
        return self.positions(self.grid_size, self.grid_size)

    def modulation_groups(self, num_patches: int, device) -> torch.Tensor:
        if num_patches + self.num_registers == self.groups.shape[0]:
            return self.groups
        return (torch.arange(num_patches + self.num_registers, device=device) >= num_patches).long()

    def condition(self, codes: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """The register tokens from the codes (B, N, token_dim): embedded, + position, positions >= keep[b]
        replaced by the mask token (nested dropout), all of them by the null condition where drop[b]."""
        x = self.token_embed(codes) + self.register_pos_embed
        positions = torch.arange(self.num_registers, device=x.device)
        x = torch.where((positions[None, :] >= keep[:, None])[..., None], self.mask_token.to(x), x)
        if drop is not None:
            x = torch.where(drop[:, None, None], self.null_condition.to(x), x)
        return x

    def null_registers(self, registers: torch.Tensor) -> torch.Tensor:
        """The unconditional registers of CFG: every token the null condition (what `condition` gives
        with drop set, whatever the codes and keep)."""
        return self.null_condition.to(registers).expand_as(registers)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, registers: torch.Tensor, layer: int | None = None):
        """(velocity, patch-token hidden states after block `layer` or None)."""
        rows, cols = (side // self.patch_embed.patch_size for side in x_t.shape[-2:])
        patches = self.patch_embed(x_t) + self.positions(rows, cols)
        n = patches.shape[1]
        temb = self.time_embed(t)
        x, hidden = self.transformer.forward_with_layer(torch.cat([patches, registers], dim=1), None, temb,
                                                        self.modulation_groups(n, x_t.device), layer)
        velocity = self.head(x[:, :n], temb, rows, cols)
        return velocity, (hidden[:, :n] if hidden is not None else None)


class FlexTokCondition(ConditionAdapter):
    """The register tokens from `FlexTokDecoder.condition` as the decoder's `registers`; unconditional:
    all of them the null condition. `layer`: the block whose patch features the decoder also returns
    (REPA during training)."""

    def __init__(self, decoder: FlexTokDecoder, layer: int | None = None):
        super().__init__("registers", {"layer": layer})
        self.decoder = decoder

    def unconditional(self, condition: torch.Tensor) -> dict[str, Any]:
        return {"registers": self.decoder.null_registers(condition), **self.extra}


@dataclass
class FlowStep:
    """One training pass: the decoder's velocity and everything the objective may need."""

    velocity: torch.Tensor
    target: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    keep: torch.Tensor
    encoded: Encoded
    hidden: torch.Tensor | None = None


@register_tokenizer
class FlexTok(Tokenizer):
    """FlexTok tokenizer; `decode(ids, num_tokens=k)` for any k in 1..num_registers.

    vae: None (pixel patches, images mapped to [-1, 1]) or the arguments of
        `tokenizers_vis.nn.pretrained.FrozenVAE` ({pretrained, config, scaling_factor, subfolder}).
    patch_size: patch side on the VAE latent (2 released) or on pixels when `vae` is None.
    num_registers: tokens per image (256 released); levels: FSQ levels (6 channels released).
    attention_scale: None is the released muP scale 8 / head_dim.
    nested_dropout: how training samples the kept k: "uniform" over 1..N, "pow2" over the powers of
        two up to N (and N), "uniform_pow2" uniform rounded up to a power of two, or "none".
    cond_dropout: probability that training replaces all registers by the null condition (CFG).
    t_mean, t_std: logit-normal training timesteps. sample_posterior: train on VAE samples.
    sample_steps, guidance_scale, apg, sample_seed: `decode` defaults (the seed makes a default
        decode deterministic).
    repa_layer / repa_dim / repa_hidden: REPA (optional): the decoder's patch tokens after block
        `repa_layer` go through an MLP projector to `repa_dim` features; the objective aligns them
        with a frozen vision encoder.
    linear_init: "xavier" (DiT / MAE style: Xavier-uniform linears and patch embeddings) or
        "trunc_normal" (ViT std 0.02). With the ViT std a patch embedding is ~10x smaller than
        the sin-cos position it is added to, so the registers barely depend on the image, every
        image gets the same codes and the decoder learns to ignore them (measured on demo
        crops: 1-5 distinct ids over 8 images at init, 1 after 100 steps; xavier: 8 of 8).
    register_init_std: std of the encoder's learned registers and of the decoder's register
        position embedding. At 0.02 (ViT) the registers are nearly equal after the first block's
        residual and every register learns the same thing (on the demo after 3000 steps: codes of
        registers 1..15 correlated 0.86-0.97 with register 0 across images, k=16 decodes only
        0.3 dB above k=1); at 0.3 they stay apart and that gap was 2.2 dB after 3000 steps.
    max_image_size: the largest image, a side or (height, width), that the sin-cos position tables
        cover (None: image_size). Encode and decode take any size within it that is a multiple of
        VAE downsampling x patch_size: the patch grid follows the input and the tables are cropped
        to it, as in the released FlexTok (whose `max_sizes` are this size in patches).
        `image_size` stays the default size of a decode that is given neither noise nor encoded
        images to follow.
    """

    model_type = "flextok"

    def __init__(
        self,
        image_size: int = 256,
        vae: Mapping[str, Any] | None = None,
        patch_size: int = 2,
        num_registers: int = 256,
        encoder_width: int = 768,
        encoder_depth: int = 12,
        encoder_heads: int = 12,
        decoder_width: int = 768,
        decoder_depth: int = 12,
        decoder_heads: int = 12,
        mlp_ratio: float = 4.0,
        levels: Sequence[int] = (8, 8, 8, 5, 5, 5),
        attention_scale: float | None = None,
        norm_eps: float = 1e-5,
        nested_dropout: str = "pow2",
        cond_dropout: float = 0.1,
        t_mean: float = 0.0,
        t_std: float = 1.0,
        sample_posterior: bool = True,
        sample_steps: int = 20,
        guidance_scale: float = 7.5,
        apg: bool = False,
        sample_seed: int = 0,
        repa_layer: int | None = None,
        repa_dim: int = 1024,
        repa_hidden: int = 2048,
        linear_init: str = "xavier",
        register_init_std: float = 0.02,
        max_image_size: int | Sequence[int] | None = None,
    ):
        super().__init__()
        if nested_dropout not in NESTED_DROPOUT_MODES:
            raise ValueError(f"nested_dropout must be one of {NESTED_DROPOUT_MODES}, got {nested_dropout!r}")
        if repa_layer is not None and not 0 <= repa_layer < decoder_depth:
            raise ValueError(f"repa_layer={repa_layer} is not a decoder block (0..{decoder_depth - 1})")
        self.image_size = image_size
        self.num_tokens = num_registers
        self.nested_dropout = nested_dropout
        self.cond_dropout = cond_dropout
        self.t_mean, self.t_std = t_mean, t_std
        self.sample_posterior = sample_posterior
        self.sample_steps, self.guidance_scale = sample_steps, guidance_scale
        self.apg, self.sample_seed = apg, sample_seed
        self.repa_layer = repa_layer

        if vae is not None:
            from tokenizers_vis.nn.pretrained import FrozenVAE

            self.vae = FrozenVAE(**dict(vae))
            channels, downsample = self.vae.latent_channels, self.vae.downsample
        else:
            self.vae = None
            channels, downsample = 3, 1
        if image_size % (downsample * patch_size):
            raise ValueError(f"image_size {image_size} must be divisible by {downsample * patch_size} "
                             f"(VAE downsampling {downsample} x patch_size {patch_size})")
        self.downsample, self.patch_size = downsample, patch_size
        self.max_image_size = size_pair(image_size if max_image_size is None else max_image_size)
        if any(side % (downsample * patch_size) or side < image_size for side in self.max_image_size):
            raise ValueError(f"max_image_size {self.max_image_size} must be multiples of {downsample * patch_size} "
                             f"and at least image_size {image_size}")
        max_grid = tuple(side // (downsample * patch_size) for side in self.max_image_size)
        patch_values = channels * patch_size**2
        if patch_values > decoder_width:
            # The velocity target eps - x0 carries the input noise, which must pass through the decoder.
            warnings.warn(f"FlexTok patches hold {patch_values} values but decoder_width is {decoder_width}: the "
                          "decoder cannot pass the flow noise through, so every decode keeps noise in it. Use a "
                          "smaller patch_size or a wider decoder.", stacklevel=3)
        self.latent_channels = channels
        self.latent_size = image_size // downsample
        grid = self.latent_size // patch_size

        self.quantize = build_quantizer("fsq", levels=levels)
        self.codebook_size = self.quantize.codebook_size
        token_dim = self.quantize.dim
        enc_kwargs = flextok_block_kwargs(encoder_width, encoder_heads, mlp_ratio, attention_scale, norm_eps)
        dec_kwargs = flextok_block_kwargs(decoder_width, decoder_heads, mlp_ratio, attention_scale, norm_eps)
        if register_init_std <= 0:
            raise ValueError(f"register_init_std must be > 0, got {register_init_std}")
        self.encoder = FlexTokEncoder(channels, patch_size, grid, num_registers, encoder_width, encoder_depth,
                                      encoder_heads, token_dim, enc_kwargs, register_init_std, max_grid)
        self.decoder = FlexTokDecoder(channels, patch_size, grid, num_registers, decoder_width, decoder_depth,
                                      decoder_heads, token_dim, dec_kwargs, register_init_std, max_grid)
        self.repa_projector = None
        if repa_layer is not None:
            self.repa_projector = nn.Sequential(nn.Linear(decoder_width, repa_hidden), nn.SiLU(),
                                                nn.Linear(repa_hidden, repa_hidden), nn.SiLU(),
                                                nn.Linear(repa_hidden, repa_dim))
        self._init_weights(linear_init)

    def _init_weights(self, linear_init: str) -> None:
        for part in (self.encoder, self.decoder, self.repa_projector):
            if part is not None:
                init_vit_weights(part, linear_init=linear_init)
        if linear_init == "xavier":
            # Patch embeddings as the linear maps they are (MAE, DiT): image content on the scale of
            # the position embedding.
            for embed in (self.encoder.patch_embed.proj, self.decoder.patch_embed.proj):
                nn.init.xavier_uniform_(embed.weight.view(embed.weight.shape[0], -1))
        # Zero-init register head (the released model's): the FSQ inputs start at 0, in the linear
        # part of its tanh. A random head (Xavier) put them at |z| ~ 4 within 100 Adam steps, where
        # tanh saturates, the straight-through gradient vanishes and every image gets one code.
        zero = [self.encoder.head]
        # adaLN-zero: modulations and the output head start at zero, so each block starts as the identity.
        zero += [self.decoder.head.modulation, self.decoder.head.proj]
        zero += [block.modulation for block in self.decoder.transformer.blocks]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def config(self) -> dict[str, Any]:
        """The architecture config, with the VAE recorded by its architecture instead of its source
        (a Hub id or folder): its frozen weights are in this model's state_dict, so a saved or
        exported FlexTok rebuilds offline, without the VAE's repo."""
        config = super().config
        if self.vae is not None:
            config["vae"] = _plain(self.vae.rebuild_arguments())  # JSON-ready: diffusers keeps tuples
        return config

    def no_weight_decay_names(self) -> set[str]:
        return {"encoder.registers", "decoder.register_pos_embed"}

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.transformer.gradient_checkpointing = enabled
        self.decoder.transformer.gradient_checkpointing = enabled

    # -- sizes -------------------------------------------------------------------------------------
    def check_images(self, images: torch.Tensor, patch_size: int | None = None) -> None:
        """Any size within max_image_size that is a multiple of VAE downsampling x patch_size."""
        if (isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[1] == 3
                and images.is_floating_point()):
            self.latent_grid(tuple(images.shape[-2:]))
            return
        super().check_images(images, patch_size)  # the shared message for a wrong shape or dtype

    def takes_size(self, height: int, width: int) -> bool:
        unit, (max_h, max_w) = self.downsample * self.patch_size, self.max_image_size
        return not (height % unit or width % unit) and 0 < height <= max_h and 0 < width <= max_w

    def latent_grid(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """The latent (height, width) of an image size; raises unless FlexTok can take that size."""
        height, width = size_pair(image_size)
        if not self.takes_size(height, width):
            unit, (max_h, max_w) = self.downsample * self.patch_size, self.max_image_size
            raise ValueError(f"this FlexTok takes images whose sides are multiples of {unit} (VAE downsampling x "
                             f"patch size) up to {max_h}x{max_w} (max_image_size), got {height}x{width}")
        return height // self.downsample, width // self.downsample

    # -- images <-> latents ------------------------------------------------------------------------
    def to_latents(self, images: torch.Tensor, vae_noise: torch.Tensor | None = None) -> torch.Tensor:
        x = images * 2 - 1
        if self.vae is None:
            if vae_noise is not None:
                raise ValueError("vae_noise given, but this FlexTok has no VAE (vae: null)")
            return x
        with torch.no_grad():
            return self.vae.encode(x, vae_noise)

    def to_images(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents if self.vae is None else self.vae.decode(latents)
        return (x + 1) / 2

    def flow_decoder(self, repa: bool = False) -> DiffusionDecoder:
        """The decoder behind the shared diffusion interface: rectified flow, FlexTok's Euler sampler,
        logit-normal training timesteps. Built on use and kept out of the module tree, so the decoder
        and VAE keep their state-dict names (official conversion and exported checkpoints use them)."""
        return DiffusionDecoder(self.decoder, RectifiedFlowEuler(),
                                FlexTokCondition(self.decoder, self.repa_layer if repa else None), vae=self.vae,
                                prediction_type="flow", logit_mean=self.t_mean, logit_std=self.t_std)

    # -- tokenize / detokenize -------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, vae_noise: torch.Tensor | None = None) -> Encoded:
        """ids (B, N) and their FSQ codes (B, N, 6). The VAE posterior mean, or mean + std * vae_noise."""
        self.check_images(images)
        z = self.encoder(self.to_latents(images, vae_noise))
        codes, ids, _ = self.quantize(z)
        # The size decode returns by default: a reconstruction has its input's size.
        return Encoded(ids=ids, latents=codes, extras={"image_size": tuple(images.shape[-2:])})

    def _ids_and_k(self, encoded: Encoded | torch.Tensor, num_tokens: int | None) -> tuple[torch.Tensor, int]:
        ids = encoded.ids if isinstance(encoded, Encoded) else encoded
        if ids is None:
            raise ValueError("FlexTok decodes token ids; the Encoded holds none")
        self.check_ids(ids)
        given, full = ids.shape[1], self.num_tokens
        k = given if num_tokens is None else int(num_tokens)
        if not 1 <= k <= full:
            raise ValueError(f"num_tokens must lie in 1..{full}, got {k}")
        if given > full or k > given:
            raise ValueError(f"num_tokens={k} needs at least {k} and at most {full} ids per image, got {given}")
        # Ids past k are never read (the mask token replaces them); pad with id 0 as the official code.
        return F.pad(ids[:, :k], (0, full - k)), k

    def initial_noise(self, batch: int, generator: torch.Generator | None, device,
                      image_size: int | Sequence[int] | None = None) -> torch.Tensor:
        """x(t=1) for images of `image_size` (default: image_size): one draw of (1, C, h, w) per image,
        in order (the official order); seeded by `sample_seed` when no generator is given."""
        if generator is None:
            generator = torch.Generator().manual_seed(self.sample_seed)
        shape = (1, self.latent_channels, *self.latent_grid(self.image_size if image_size is None else image_size))
        draws = [torch.randn(shape, generator=generator, device=generator.device) for _ in range(batch)]
        return torch.cat(draws).to(device)

    @torch.no_grad()
    def decode(
        self,
        encoded: Encoded | torch.Tensor,
        num_tokens: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        apg: bool | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        image_size: int | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Images in [0, 1] (not clamped) from the first `num_tokens` ids (default: all given).

        steps / guidance / apg default to the config's sample_steps / guidance_scale / apg; `noise`
        injects x(t=1) (B, C, h, w) and sets the size; otherwise it is drawn from `generator`
        (default: seeded) at `image_size` (a side or (height, width); default: the size of the
        encoded images, else the config's image_size).
        """
        return self.to_images(self.sample_latents(encoded, num_tokens, steps, guidance, apg, noise, generator,
                                                  image_size))

    @torch.no_grad()
    def sample_latents(self, encoded, num_tokens=None, steps=None, guidance=None, apg=None, noise=None,
                       generator=None, image_size=None) -> torch.Tensor:
        """`decode` without the last step: the flow's output x(t=0) (VAE latents, or [-1, 1] pixels)."""
        ids, k = self._ids_and_k(encoded, num_tokens)
        b, device = ids.shape[0], ids.device
        steps = self.sample_steps if steps is None else int(steps)
        guidance = self.guidance_scale if guidance is None else float(guidance)
        apg = self.apg if apg is None else bool(apg)
        if noise is None:
            if image_size is None and isinstance(encoded, Encoded):
                image_size = encoded.extras.get("image_size")
            noise = self.initial_noise(b, generator, device, image_size)
        if (noise.dim() != 4 or tuple(noise.shape[:2]) != (b, self.latent_channels)
                or not self.takes_size(*(side * self.downsample for side in noise.shape[-2:]))):
            raise ValueError(f"noise must have shape ({b}, {self.latent_channels}, h, w), (h, w) the latent size of "
                             f"an image this FlexTok takes (up to {self.max_image_size}), got {tuple(noise.shape)}")
        cond = self.decoder.condition(self.quantize.embed(ids), torch.full((b,), k, device=device))
        return self.flow_decoder().sample(cond, steps, guidance, noise.to(device, cond.dtype), apg=apg)

    # -- training --------------------------------------------------------------------------------------
    def sample_keep(self, batch: int, device=None) -> torch.Tensor:
        """k per example for nested dropout (see `nested_dropout`)."""
        n = self.num_tokens
        if self.nested_dropout == "none":
            return torch.full((batch,), n, device=device)
        if self.nested_dropout == "pow2":
            choices = sorted({2**i for i in range(int(math.log2(n)) + 1)} | {n})
            return torch.tensor(choices, device=device)[torch.randint(len(choices), (batch,), device=device)]
        k = torch.randint(1, n + 1, (batch,), device=device)
        if self.nested_dropout == "uniform_pow2":
            k = (2 ** torch.ceil(torch.log2(k.float()))).long().clamp(max=n)
        return k

    def flow_step(self, images: torch.Tensor) -> FlowStep:
        """One rectified-flow training pass with nested dropout and condition dropout."""
        self.check_images(images)
        b = images.shape[0]
        vae_noise = None
        if self.vae is not None and self.sample_posterior and self.training:
            shape = (b, self.latent_channels, *self.latent_grid(tuple(images.shape[-2:])))
            vae_noise = torch.randn(shape, device=images.device)
        x0 = self.to_latents(images, vae_noise)
        codes, ids, _ = self.quantize(self.encoder(x0))
        keep = self.sample_keep(b, images.device)
        drop = torch.rand(b, device=images.device) < self.cond_dropout if self.training else None
        # Logit-normal t, then the noise, both from the global RNG (the order of the draws before).
        step = self.flow_decoder(repa=True).training_step(x0, self.decoder.condition(codes, keep, drop))
        hidden = step.extras[0] if step.extras else None
        if hidden is not None:
            hidden = self.repa_projector(hidden)
        return FlowStep(velocity=step.prediction, target=step.target, x_t=step.x_t, t=step.timesteps, keep=keep,
                        encoded=Encoded(ids=ids, latents=codes), hidden=hidden)

    def output_from(self, step: FlowStep) -> ModelOutput:
        """ModelOutput of a flow step: aux_loss is the flow MSE; the reconstruction is the cheap
        one-step estimate x_t - t * v (for logging; no gradient)."""
        loss = F.mse_loss(step.velocity.float(), step.target.float())
        with torch.no_grad():
            reconstruction = self.to_images(denoised_estimate(step.x_t, step.velocity.detach(), step.t))
        logs = {"loss/flow": loss.detach(), "flow/keep_k_mean": step.keep.float().mean()}
        return ModelOutput(reconstruction=reconstruction, aux_loss=loss, logs=logs, encoded=step.encoded)

    def forward(self, images: torch.Tensor) -> ModelOutput:
        return self.output_from(self.flow_step(images))
