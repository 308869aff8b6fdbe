"""TiTok: "An Image is Worth 32 Tokens for Reconstruction and Generation" (Yu et al., 2024).

A ViT encoder reads [class, patches] followed by K learned latent tokens and keeps the K latent
outputs; they are quantized (VQ, optionally l2) or sampled from a diagonal Gaussian (VAE); a ViT
decoder reads [class, grid of mask tokens] followed by the K tokens and predicts pixels from the
mask-token outputs. TiTok works on [0, 1] pixels directly, as the official model does.

Two decoder heads: "pixel" (the one-stage variants predict RGB patches) and "proxy_codes" (the
released S-128/B-64/L-32: logits over the 1024 codes of a MaskGIT-VQGAN, whose softmax mixes the
1024 x 256 `pixel_quantize` codebook into the input of the MaskGIT conv `pixel_decoder`).

Two-stage training (the released S/B/L recipe): `frozen` names the parts a stage keeps fixed
(stage 1: the pixel decoder and its codebook, which come from the teacher VQGAN; stage 2: encoder,
quantizer and latent tokens), `forward(images, pixels=False)` gives the proxy-code logits without
running the pixel decoder, and `pixel_weights_from(vqgan)` takes a MaskGIT-VQGAN's decoder and
codebook as `pixel_decoder` / `pixel_quantize`.

Parameter names follow the official layout (`encoder.*`, `decoder.*`, `latent_tokens`,
`quantize.*`, `pixel_quantize.*`, `pixel_decoder.*`) so that the released checkpoints map onto this
module with the short key mapping of `tokenizers_vis.models.titok_official`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops.layers.torch import Rearrange
from torch import nn

from tokenizers_vis.models.base import Encoded, ModelOutput, Tokenizer, register_tokenizer
from tokenizers_vis.nn.cnn import ConvDecoder
from tokenizers_vis.nn.quantizers import VectorQuantizer, build_quantizer
from tokenizers_vis.nn.transformer import PatchEmbed, Transformer, embedding_parameter, init_vit_weights

# Named widths of the released models: width, depth, heads.
MODEL_SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}
# The top-level parts `frozen` may name; the last two exist with the proxy-code head only.
FREEZABLE_PARTS = ("latent_tokens", "encoder", "quantize", "decoder", "pixel_quantize", "pixel_decoder")
# With all of these frozen, nothing before the decoder trains, so encoding needs no graph.
ENCODING_PARTS = frozenset({"latent_tokens", "encoder", "quantize"})


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
        p = patch_size
        self.ffn = nn.Sequential(
            nn.Conv2d(width, p * p * 3, kernel_size=1),
            Rearrange("b (p1 p2 c) h w -> b c (h p1) (w p2)", p1=p, p2=p),
        )
        self.conv_out = nn.Conv2d(3, 3, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.ffn(x))


class ProxyCodeHead(nn.Module):
    """1x1 conv W -> 2W, Tanh, 1x1 conv 2W -> logits over the proxy (MaskGIT-VQGAN) codes."""

    def __init__(self, width: int, num_codes: int):
        super().__init__()
        self.ffn = nn.Sequential(
            nn.Conv2d(width, 2 * width, kernel_size=1),
            nn.Tanh(),
            nn.Conv2d(2 * width, num_codes, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x)


@register_tokenizer
class TiTok(Tokenizer):
    """TiTok 1-D tokenizer.

    quantizer: "vq" (codebook_size x token_dim, `use_l2_norm` for cosine lookup) or "vae"
        (a diagonal Gaussian with `token_dim` channels, no ids).
    head: "pixel" (one-stage variants: the decoder predicts RGB directly) or "proxy_codes" (the
        released S/B/L: `proxy_codebook_size` logits per grid cell; their softmax mixes the
        `pixel_quantize` codebook (proxy_codebook_size x pixel_decoder_z_channels) into the input
        of `pixel_decoder`, a MaskGIT-VQGAN conv decoder with `pixel_decoder_channels` base
        channels (128 released), `pixel_decoder_channel_mult` and `pixel_decoder_res_blocks`).
    legacy_reshape: the released S/B/L encoder-output reshape quirk.
    frozen: parts (of `FREEZABLE_PARTS`) that do not train: their parameters get requires_grad=False
        and their modules stay in eval mode; with encoder, quantize and latent_tokens all frozen,
        `forward` encodes without building a graph. The two-stage recipe sets it per stage.
    linear_init: "trunc_normal" (std 0.02, as the official TiTok) or "xavier" (MAE style; escapes
        the mean-image plateau much sooner at small scale, which the CPU demo relies on).
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
        proxy_codebook_size: int = 1024,
        pixel_decoder_channels: int = 128,
        pixel_decoder_channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
        pixel_decoder_res_blocks: int = 2,
        pixel_decoder_z_channels: int = 256,
        frozen: Sequence[str] = (),
        linear_init: str = "trunc_normal",
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be divisible by patch_size {patch_size}")
        if head not in ("pixel", "proxy_codes"):
            raise ValueError(f"unknown TiTok head {head!r}; expected 'pixel' or 'proxy_codes'")
        if head == "proxy_codes" and 2 ** (len(pixel_decoder_channel_mult) - 1) != patch_size:
            raise ValueError(f"the pixel decoder upsamples the grid by 2**(len(pixel_decoder_channel_mult) - 1) = "
                             f"{2 ** (len(pixel_decoder_channel_mult) - 1)}, which must equal patch_size {patch_size}")
        enc_w, enc_d, enc_h = resolve_size(encoder_size, encoder_width, encoder_depth, encoder_heads)
        dec_w, dec_d, dec_h = resolve_size(decoder_size, decoder_width, decoder_depth, decoder_heads)
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_tokens = num_latent_tokens
        self.quantizer_kind = quantizer
        self.token_dim = token_dim
        self.head_kind = head

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
        if head == "pixel":
            decoder_head = PixelHead(dec_w, patch_size)
        else:
            decoder_head = ProxyCodeHead(dec_w, proxy_codebook_size)
        self.decoder = TiTokDecoder(image_size, patch_size, num_latent_tokens, dec_w, dec_d, dec_h, token_dim,
                                    mlp_ratio, decoder_head)
        init_vit_weights(self.encoder, linear_init=linear_init)
        init_vit_weights(self.decoder, linear_init=linear_init)
        if head == "proxy_codes":
            # The MaskGIT-VQGAN codebook and decoder; `maskgit_shortcut` because the released
            # pixel decoders were trained with that residual.
            self.pixel_quantize = VectorQuantizer(proxy_codebook_size, pixel_decoder_z_channels)
            self.pixel_decoder = ConvDecoder(
                z_channels=pixel_decoder_z_channels, out_channels=3, base_channels=pixel_decoder_channels,
                channel_mult=tuple(pixel_decoder_channel_mult), num_res_blocks=pixel_decoder_res_blocks,
                maskgit_shortcut=True,
            )
        self.freeze_parts(frozen=tuple(frozen))

    def freezable_parts(self) -> list[str]:
        return [p for p in FREEZABLE_PARTS if hasattr(self, p)]

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
        out = self.decoder(self._decoder_input(encoded))
        return self.logits_to_pixels(out) if self.head_kind == "proxy_codes" else out

    def decode_logits(self, encoded: Encoded | torch.Tensor) -> torch.Tensor:
        """Proxy-code head: logits (B, proxy_codebook_size, grid, grid) over the MaskGIT-VQGAN codes."""
        if self.head_kind != "proxy_codes":
            raise ValueError(f"decode_logits needs head='proxy_codes'; this TiTok has head={self.head_kind!r}")
        return self.decoder(self._decoder_input(encoded))

    def soft_proxy_codes(self, logits: torch.Tensor) -> torch.Tensor:
        """The pixel-decoder input: softmax(logits) over the codes mixes the `pixel_quantize` rows."""
        weight = self.pixel_quantize.embedding.weight
        return torch.einsum("nchw,cd->ndhw", logits.softmax(dim=1), weight.to(logits.dtype))

    def logits_to_pixels(self, logits: torch.Tensor) -> torch.Tensor:
        return self.pixel_decoder(self.soft_proxy_codes(logits))

    def _decoder_input(self, encoded: Encoded | torch.Tensor) -> torch.Tensor:
        if isinstance(encoded, Encoded):
            tokens = encoded.latents if encoded.latents is not None else self._embed_ids(encoded.ids)
        elif not encoded.is_floating_point():
            tokens = self._embed_ids(encoded)
        else:
            tokens = encoded
        if tokens.dim() != 3 or tokens.shape[1:] != (self.num_tokens, self.token_dim):
            raise ValueError(f"expected latents of shape (B, {self.num_tokens}, {self.token_dim}), "
                             f"got {tuple(tokens.shape)}")
        return tokens.to(self.decoder.decoder_embed.weight.dtype)

    def _embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if self.codebook_size is None:
            raise ValueError("this TiTok has a continuous (VAE) bottleneck: decode latents, not ids")
        self.check_ids(ids, self.num_tokens)
        return self.quantize.embed(ids)

    def pixel_weights_from(self, vqgan: nn.Module) -> dict[str, torch.Tensor]:
        """`pixel_quantize.*` / `pixel_decoder.*` from a MaskGIT-VQGAN's `quantize.*` / `decoder.*`.

        The official stage-2 initialisation ("pixel_" + the teacher's names, encoder left out);
        raises unless the teacher's decoder and codebook have exactly this model's pixel-part shapes.
        """
        if self.head_kind != "proxy_codes":
            raise ValueError(f"only the proxy-code head has a pixel decoder; this TiTok has head={self.head_kind!r}")
        taken = {f"pixel_{k}": v for k, v in vqgan.state_dict().items() if k.startswith(("quantize.", "decoder."))}
        own = {k: v for k, v in self.state_dict().items() if k.startswith(("pixel_quantize.", "pixel_decoder."))}
        missing, unexpected = sorted(own.keys() - taken.keys()), sorted(taken.keys() - own.keys())
        mismatched = sorted(k for k in own.keys() & taken.keys() if own[k].shape != taken[k].shape)
        if missing or unexpected or mismatched:
            raise ValueError(
                "the VQGAN's decoder and codebook do not fit this TiTok's pixel decoder (proxy_codebook_size, "
                f"pixel_decoder_*): missing {missing[:4]}, unexpected {unexpected[:4]}, other shapes {mismatched[:4]}")
        return taken

    def forward(self, images: torch.Tensor, pixels: bool = True) -> ModelOutput:
        """encode + decode. pixels=False (proxy-code head only) stops at the logits, which stage-1
        training needs, and skips the pixel decoder: `reconstruction` is then None."""
        if not pixels and self.head_kind != "proxy_codes":
            raise ValueError("pixels=False skips the pixel decoder of the proxy-code head; this TiTok has "
                             f"head={self.head_kind!r}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not ENCODING_PARTS <= set(self.frozen_parts)):
            encoded = self.encode(images, sample=self.training)
        aux = encoded.extras["aux"]
        if self.head_kind == "proxy_codes":
            # Kept for the proxy-code cross-entropy of the two-stage recipe.
            encoded.extras["proxy_logits"] = self.decode_logits(encoded.latents)
            reconstruction = self.logits_to_pixels(encoded.extras["proxy_logits"]) if pixels else None
        else:
            reconstruction = self.decode(encoded.latents)
        logs = {f"quantizer/{k}": v for k, v in aux.items() if k != "loss"}
        return ModelOutput(reconstruction=reconstruction, aux_loss=aux["loss"], logs=logs, encoded=encoded)

    # -- training hooks ------------------------------------------------------------------------
    def last_layer_weight(self) -> torch.Tensor:
        if self.head_kind == "proxy_codes":
            return self.pixel_decoder.conv_out.weight
        return self.decoder.head.conv_out.weight

    def no_weight_decay_names(self) -> set[str]:
        names = {"latent_tokens", "quantize.embedding.weight"}
        if self.head_kind == "proxy_codes":
            names.add("pixel_quantize.embedding.weight")
        for part in ("encoder", "decoder"):
            for key in ("class_embedding", "positional_embedding", "latent_token_positional_embedding"):
                names.add(f"{part}.{key}")
        names.add("decoder.mask_token")
        return names

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.transformer.gradient_checkpointing = enabled
        self.decoder.transformer.gradient_checkpointing = enabled
