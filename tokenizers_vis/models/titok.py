"""TiTok: "An Image is Worth 32 Tokens for Reconstruction and Generation" (Yu et al., 2024).

A ViT encoder reads [class, patches] followed by K learned latent tokens and keeps the K latent
outputs; they are quantized (VQ, optionally l2) or sampled from a diagonal Gaussian (VAE); a ViT
decoder reads [class, grid of mask tokens] followed by the K tokens and predicts pixels from the
mask-token outputs. TiTok works on [0, 1] pixels directly, as the official model does.

Parameter names follow the official layout (`encoder.*`, `decoder.*`, `latent_tokens`,
`quantize.*`) so that the released checkpoints map onto this module with a short key mapping.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from tokenizers_vis.models.base import Encoded, ModelOutput, Tokenizer, register_tokenizer
from tokenizers_vis.nn.quantizers import build_quantizer
from tokenizers_vis.nn.transformer import PatchEmbed, Transformer, embedding_parameter, init_vit_weights

# Named widths of the released models: width, depth, heads.
MODEL_SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}


def resolve_size(size: str | None, width: int | None, depth: int | None, heads: int | None) -> tuple[int, int, int]:
    """A named size ("small" / "base" / "large") or explicit width, depth, heads (which win)."""
    if size is not None:
        if size not in MODEL_SIZES:
            raise ValueError(f"unknown TiTok size {size!r}; expected one of {sorted(MODEL_SIZES)}")
        named = MODEL_SIZES[size]
        width, depth, heads = width or named[0], depth or named[1], heads or named[2]
    if not (width and depth and heads):
        raise ValueError("give a TiTok size name or all of width, depth and heads")
    return width, depth, heads


class TiTokEncoder(nn.Module):
    def __init__(self, image_size, patch_size, num_latent_tokens, width, depth, heads, out_channels,
                 mlp_ratio, legacy_reshape):
        super().__init__()
        self.grid_size = image_size // patch_size
        self.num_latent_tokens = num_latent_tokens
        self.legacy_reshape = legacy_reshape
        self.patch_embed = PatchEmbed(patch_size, 3, width)
        self.class_embedding = embedding_parameter(1, width, width=width)
        self.positional_embedding = embedding_parameter(self.grid_size**2 + 1, width, width=width)
        self.latent_token_positional_embedding = embedding_parameter(num_latent_tokens, width, width=width)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, depth, heads, mlp_ratio=mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.conv_out = nn.Linear(width, out_channels)  # the official 1x1 conv over (B, W, K, 1)

    def forward(self, images: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        x = self.patch_embed(images)
        x = torch.cat([self.class_embedding.expand(b, -1, -1), x], dim=1) + self.positional_embedding
        latents = latent_tokens + self.latent_token_positional_embedding
        x = torch.cat([x, latents.expand(b, -1, -1)], dim=1)
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(x[:, -self.num_latent_tokens:])
        if self.legacy_reshape:
            # Released S/B/L quirk: (B, K, W) was *reshaped* (not permuted) to (B, W, K); keep it
            # so their weights keep their meaning.
            x = x.reshape(b, x.shape[2], x.shape[1]).transpose(1, 2)
        return self.conv_out(x)  # (B, K, C)


class TiTokDecoder(nn.Module):
    def __init__(self, image_size, patch_size, num_latent_tokens, width, depth, heads, token_channels,
                 mlp_ratio, head: nn.Module):
        super().__init__()
        self.grid_size = image_size // patch_size
        self.decoder_embed = nn.Linear(token_channels, width)
        self.class_embedding = embedding_parameter(1, width, width=width)
        self.positional_embedding = embedding_parameter(self.grid_size**2 + 1, width, width=width)
        self.mask_token = embedding_parameter(1, 1, width, width=width)
        self.latent_token_positional_embedding = embedding_parameter(num_latent_tokens, width, width=width)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, depth, heads, mlp_ratio=mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.head = head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n = tokens.shape[0], self.grid_size**2
        latents = self.decoder_embed(tokens) + self.latent_token_positional_embedding
        grid = torch.cat([self.class_embedding.expand(b, 1, -1), self.mask_token.expand(b, n, -1)], dim=1)
        x = torch.cat([grid + self.positional_embedding, latents], dim=1)
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(x[:, 1 : n + 1])
        x = x.transpose(1, 2).reshape(b, -1, self.grid_size, self.grid_size)
        return self.head(x)


class PixelHead(nn.Module):
    """1x1 conv to patch*patch*3 values per grid cell, rearranged to pixels, then a 3x3 conv."""

    def __init__(self, width: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.ffn = nn.Conv2d(width, patch_size * patch_size * 3, kernel_size=1)
        self.conv_out = nn.Conv2d(3, 3, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        x = rearrange(self.ffn(x), "b (p1 p2 c) h w -> b c (h p1) (w p2)", p1=p, p2=p)
        return self.conv_out(x)


@register_tokenizer
class TiTok(Tokenizer):
    """TiTok 1-D tokenizer.

    quantizer: "vq" (codebook_size x token_dim, `use_l2_norm` for cosine lookup) or "vae"
        (a diagonal Gaussian with `token_dim` channels, no ids).
    head: "pixel" (one-stage variants: the decoder predicts RGB directly).
    legacy_reshape: the released S/B/L encoder-output reshape quirk.
    """

    model_type = "titok"

    def __init__(
        self,
        image_size: int = 256,
        patch_size: int = 16,
        num_latent_tokens: int = 64,
        encoder_size: str | None = "base",
        decoder_size: str | None = "base",
        encoder_width: int | None = None,
        encoder_depth: int | None = None,
        encoder_heads: int | None = None,
        decoder_width: int | None = None,
        decoder_depth: int | None = None,
        decoder_heads: int | None = None,
        mlp_ratio: float = 4.0,
        quantizer: str = "vq",
        token_dim: int = 12,
        codebook_size: int = 4096,
        use_l2_norm: bool = True,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        dead_code_threshold: float = 0.0,
        kl_weight: float = 1e-6,
        head: str = "pixel",
        legacy_reshape: bool = False,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be divisible by patch_size {patch_size}")
        if head != "pixel":
            raise ValueError(f"unknown TiTok head {head!r}; expected 'pixel'")
        enc_w, enc_d, enc_h = resolve_size(encoder_size, encoder_width, encoder_depth, encoder_heads)
        dec_w, dec_d, dec_h = resolve_size(decoder_size, decoder_width, decoder_depth, decoder_heads)
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_tokens = num_latent_tokens
        self.quantizer_kind = quantizer
        self.token_dim = token_dim

        if quantizer == "vq":
            self.quantize = build_quantizer(
                "vq", token_dim, codebook_size=codebook_size, use_l2_norm=use_l2_norm,
                commitment_weight=commitment_weight, codebook_weight=codebook_weight,
                dead_code_threshold=dead_code_threshold,
            )
            self.codebook_size = codebook_size
            encoder_channels = token_dim
        elif quantizer == "vae":
            self.quantize = build_quantizer("vae", token_dim, kl_weight=kl_weight)
            self.codebook_size = None
            encoder_channels = 2 * token_dim
        else:
            raise ValueError(f"unknown TiTok quantizer {quantizer!r}; expected 'vq' or 'vae'")

        self.latent_tokens = embedding_parameter(num_latent_tokens, enc_w, width=enc_w)
        self.encoder = TiTokEncoder(image_size, patch_size, num_latent_tokens, enc_w, enc_d, enc_h,
                                    encoder_channels, mlp_ratio, legacy_reshape)
        self.decoder = TiTokDecoder(image_size, patch_size, num_latent_tokens, dec_w, dec_d, dec_h, token_dim,
                                    mlp_ratio, PixelHead(dec_w, patch_size))
        init_vit_weights(self.encoder)
        init_vit_weights(self.decoder)

    # -- Tokenizer API -------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, sample: bool = False, noise: torch.Tensor | None = None) -> Encoded:
        """ids (B, K) for VQ (None for VAE) and the latents the decoder consumes (B, K, C).

        VAE: the posterior mean unless `sample=True` (or `noise` is given: mean + std * noise).
        """
        self.check_images(images, self.patch_size)
        z = self.encoder(images, self.latent_tokens)
        if self.quantizer_kind == "vae":
            latents, ids, aux = self.quantize(z, sample=sample, noise=noise)
        else:
            latents, ids, aux = self.quantize(z)
        return Encoded(ids=ids, latents=latents, extras={"pre_quant": z, "aux": aux})

    def decode(self, encoded: Encoded | torch.Tensor, **sampling) -> torch.Tensor:
        """Pixels on the [0, 1] scale (unclamped) from an `Encoded`, ids (B, K) or latents (B, K, C)."""
        if sampling:
            raise ValueError(f"TiTok decoding is deterministic and takes no options, got {sorted(sampling)}")
        if isinstance(encoded, Encoded):
            tokens = encoded.latents if encoded.latents is not None else self._embed_ids(encoded.ids)
        elif not encoded.is_floating_point():
            tokens = self._embed_ids(encoded)
        else:
            tokens = encoded
        if tokens.dim() != 3 or tokens.shape[1:] != (self.num_tokens, self.token_dim):
            raise ValueError(f"expected latents of shape (B, {self.num_tokens}, {self.token_dim}), "
                             f"got {tuple(tokens.shape)}")
        return self.decoder(tokens.to(self.decoder.decoder_embed.weight.dtype))

    def _embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if self.codebook_size is None:
            raise ValueError("this TiTok has a continuous (VAE) bottleneck: decode latents, not ids")
        self.check_ids(ids, self.num_tokens)
        return self.quantize.embed(ids)

    def forward(self, images: torch.Tensor) -> ModelOutput:
        encoded = self.encode(images, sample=self.training)
        aux = encoded.extras["aux"]
        reconstruction = self.decode(encoded.latents)
        logs = {f"quantizer/{k}": v for k, v in aux.items() if k != "loss"}
        return ModelOutput(reconstruction=reconstruction, aux_loss=aux["loss"], logs=logs, encoded=encoded)

    # -- training hooks ------------------------------------------------------------------------
    def last_layer_weight(self) -> torch.Tensor:
        return self.decoder.head.conv_out.weight

    def no_weight_decay_names(self) -> set[str]:
        names = {"latent_tokens", "quantize.embedding.weight"}
        for part in ("encoder", "decoder"):
            for key in ("class_embedding", "positional_embedding", "latent_token_positional_embedding"):
                names.add(f"{part}.{key}")
        names.add("decoder.mask_token")
        return names

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.transformer.gradient_checkpointing = enabled
        self.decoder.transformer.gradient_checkpointing = enabled
