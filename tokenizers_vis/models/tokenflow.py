"""TokenFlow: one id per position indexes a (semantic, pixel) code pair.

Two branches see the same image:
  semantic: a ViT initialised from a pretrained teacher (CLIP ViT-B/16, SigLIP-so400m, ViTamin-XL)
            -> Linear-Tanh-Linear to `semantic_code_dim` (32) per patch;
  pixel:    a VQGAN CNN encoder (16x down) -> 1x1 conv to `pixel_code_dim` (8).
Their concatenation (40 channels on the G x G feature grid) is quantized by a multi-scale residual
quantizer (VAR style) whose per-scale quantizer is the shared-mapping dual codebook: each entry
pairs a semantic and a pixel code, and the one index minimises d_sem + w * d_pix.
Decoding splits the quantized features again: the semantic half goes through a small ViT (depth 3)
and Linear-Tanh-Linear to the teacher's feature width (distillation targets, `semantic_features`),
the pixel half through a 1x1 conv and the VQGAN CNN decoder to pixels.

Images are [0, 1] at this API; inside, both branches see [-1, 1] as the official code does (the
CLIP tower gets that tensor itself, without CLIP's mean/std; SigLIP's scaling layer amounts to a
clamp to [-1, 1]). Ids are laid out scale by scale (coarse to fine), row-major inside a scale;
`id_layout` / `scales` describe it. See `tokenflow_official.py` for the released checkpoints.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.models.base import Encoded, ModelOutput, Tokenizer, _plain, register_tokenizer
from tokenizers_vis.nn.cnn import VQGANDecoder, VQGANEncoder
from tokenizers_vis.nn.quantizers import MultiScaleResidualQuantizer, SharedMappingQuantizer
from tokenizers_vis.nn.transformer import PatchEmbed, Transformer, embedding_parameter, interpolate_position_table
from tokenizers_vis.nn.vision_towers import build_vision_tower

# What `trainable` may name: every part, or (stage 2) only the pixel decoder.
TRAINABLE = {"all": None, "pixel_decoder": ("post_quant_conv", "decoder")}


def _task_layer(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear -> Tanh -> Linear, the official `encode_task_layer` / `decode_task_layer`."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))


class SemanticDecoder(nn.Module):
    """A small BEiT-v2 style ViT over the code grid: 1x1 patch conv, [cls, tokens] + position table,
    pre-LN blocks (LayerNorm eps 1e-6, exact GELU), `fc_norm` on the patch tokens (cls dropped).

    The official blocks have q and v biases but no k bias. A bias on k adds the same q.b to every
    logit of a query, which softmax ignores, so our shared block's packed qkv bias with a zero k
    part computes exactly the official attention; its gradient on the k part is zero up to
    rounding, and whatever it drifts to changes nothing (the official export drops it).
    The position table covers a `table_grid` square and is interpolated (the official way) when the
    code grid differs.
    """

    def __init__(self, in_dim: int, width: int, depth: int, heads: int, table_grid: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.table_grid = table_grid
        self.patch_embed = PatchEmbed(1, in_dim, width)
        self.cls_token = embedding_parameter(1, 1, width, width=width)
        self.pos_embed = embedding_parameter(1, table_grid * table_grid + 1, width, width=width)
        self.transformer = Transformer(width, depth, heads, mlp_ratio=mlp_ratio, norm_eps=1e-6)
        self.fc_norm = nn.LayerNorm(width, eps=1e-6)
        for block in self.transformer.blocks:
            nn.init.zeros_(block.attn.qkv.bias)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, C, G, G) semantic codes -> (B, G*G, width) patch tokens."""
        tokens = self.patch_embed(codes)
        b, _, grid = tokens.shape[0], tokens.shape[1], codes.shape[-1]
        pos = self.pos_embed[0]
        pos = torch.cat([pos[:1], interpolate_position_table(pos[1:], grid)], dim=0)
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1) + pos.to(tokens.dtype)
        return self.fc_norm(self.transformer(x)[:, 1:])


@register_tokenizer
class TokenFlow(Tokenizer):
    """TokenFlow tokenizer. `encode(x).ids` is (B, sum of s^2) in scale order; `decode(ids)` takes the
    full ids or a prefix of whole scales; `semantic_features(ids)` gives the teacher-space features.

    image_size: input side. The feature grid G is the semantic tower's grid at this size (CLIP-B/16
        at 256: 16, interpolating its 14 x 14 table); the pixel branch sees the image bicubic-resized
        to (pixel downsampling) x G when that differs (SigLIP-384: 27 x 16 = 432 px).
    semantic_encoder: `nn.vision_towers.build_vision_tower` arguments {kind, pretrained, config, ...}.
        `seed` (default 0) draws the random weights when `pretrained` is null, so the training
        objective can rebuild the same tower as its frozen teacher.
    semantic_code_dim / pixel_code_dim: the two halves of a code (32 + 8).
    semantic_decoder_*: the ViT that maps the semantic codes back to `semantic_out_dim` (the
        teacher's feature width: 512 for CLIP-B with its projection, 1152 for SigLIP).
        `semantic_decoder_grid`: side of its position table (None: the feature grid).
    pixel_channels / pixel_channel_mult / pixel_num_res_blocks / z_channels: the VQGAN CNN encoder;
        decoder_* (None: as the encoder) the decoder ("enhanced": 256 channels, 4 res-blocks).
        pixel_norm_groups: GroupNorm groups of both (32 official; fewer lets small demos go narrower).
    codebook_size, pixel_distance_weight (w in d_sem + w * d_pix), commitment_weight, codebook_weight.
    scales: the residual scale schedule, last = G. drop_scale_prob: training drops one non-first scale.
    output_size: side of the returned reconstruction (None: image_size).
    trainable: "all", or "pixel_decoder" (stage 2: only post_quant_conv and the CNN decoder train).
    teacher: where the frozen distillation teacher comes from (None: the semantic_encoder spec). A
        saved model records its tower by architecture (its weights travel in the state_dict, so it
        reloads offline) and keeps the pretrained source here.
    """

    model_type = "tokenflow"

    def __init__(
        self,
        image_size: int = 256,
        semantic_encoder: Mapping[str, Any] | None = None,
        semantic_code_dim: int = 32,
        pixel_code_dim: int = 8,
        semantic_decoder_width: int = 768,
        semantic_decoder_depth: int = 3,
        semantic_decoder_heads: int = 12,
        semantic_decoder_grid: int | None = None,
        semantic_out_dim: int = 512,
        pixel_channels: int = 128,
        pixel_channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
        pixel_num_res_blocks: int = 2,
        z_channels: int = 256,
        pixel_norm_groups: int = 32,
        decoder_channels: int | None = None,
        decoder_channel_mult: Sequence[int] | None = None,
        decoder_num_res_blocks: int | None = None,
        codebook_size: int = 32768,
        pixel_distance_weight: float = 1.0,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        scales: Sequence[int] = (1, 2, 4, 6, 8, 10, 12, 14, 16),
        drop_scale_prob: float = 0.1,
        output_size: int | None = None,
        trainable: str = "all",
        teacher: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {tuple(TRAINABLE)}, got {trainable!r}")
        spec = dict(semantic_encoder or {"kind": "openai_clip", "pretrained": "ViT-B-16/openai"})
        self.semantic_encoder_spec = spec
        self.teacher_spec = dict(teacher or spec)
        self.image_size = image_size
        self.output_size = output_size or image_size
        self.semantic_code_dim, self.pixel_code_dim = semantic_code_dim, pixel_code_dim
        self.codebook_size = codebook_size
        self.trainable = trainable

        self.semantic_encoder = build_seeded_tower(spec, teacher=False)
        self.grid = self.semantic_encoder.grid_for(image_size)
        if scales[-1] != self.grid:
            raise ValueError(f"the last scale must equal the feature grid {self.grid} "
                             f"({image_size} px through the semantic tower), got scales={list(scales)}")
        width = self.semantic_encoder.width
        self.encode_task_layer = _task_layer(width, width, semantic_code_dim)

        self.pixel_downsampling = 2 ** (len(pixel_channel_mult) - 1)
        self.pixel_input_size = self.pixel_downsampling * self.grid
        self.encoder = VQGANEncoder(ch=pixel_channels, ch_mult=tuple(pixel_channel_mult),
                                    num_res_blocks=pixel_num_res_blocks, z_channels=z_channels,
                                    norm_groups=pixel_norm_groups)
        self.quant_conv = nn.Conv2d(z_channels, pixel_code_dim, 1)
        self.quantize = MultiScaleResidualQuantizer(
            SharedMappingQuantizer(codebook_size, semantic_code_dim, pixel_code_dim, pixel_weight=pixel_distance_weight,
                                   commitment_weight=commitment_weight, codebook_weight=codebook_weight),
            scales, drop_scale_prob=drop_scale_prob)
        self.num_tokens = self.quantize.num_ids
        self.post_quant_conv = nn.Conv2d(pixel_code_dim, z_channels, 1)
        self.decoder = VQGANDecoder(ch=decoder_channels or pixel_channels,
                                    ch_mult=tuple(decoder_channel_mult or pixel_channel_mult),
                                    num_res_blocks=decoder_num_res_blocks or pixel_num_res_blocks,
                                    z_channels=z_channels, norm_groups=pixel_norm_groups)
        self.semantic_decoder = SemanticDecoder(semantic_code_dim, semantic_decoder_width, semantic_decoder_depth,
                                                semantic_decoder_heads, semantic_decoder_grid or self.grid)
        self.decode_task_layer = _task_layer(semantic_decoder_width, semantic_decoder_width, semantic_out_dim)
        self.freeze_parts(trainable=TRAINABLE[trainable])

    @property
    def scales(self) -> list[int]:
        return list(self.quantize.scales)

    @property
    def token_prefixes(self) -> list[int]:
        """The id counts `decode` accepts: whole scales from the coarsest (1, 5, 21, ... for 1, 2, 4, ...)."""
        return list(self.quantize.prefix_lengths)

    def id_layout(self) -> list[tuple[int, int, int]]:
        """(scale side s, first id position, count s^2) per scale, in the order ids are laid out."""
        starts = [0, *self.quantize.prefix_lengths[:-1]]
        return [(s, start, s * s) for s, start in zip(self.scales, starts)]

    # -- inputs ----------------------------------------------------------------------------------
    def semantic_input(self, images: torch.Tensor) -> torch.Tensor:
        """What the semantic tower (and the teacher) sees: the image in [-1, 1]."""
        return (images * 2 - 1).clamp(-1, 1)

    def pixel_input(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        if x.shape[-1] != self.pixel_input_size:
            x = F.interpolate(x, size=(self.pixel_input_size, self.pixel_input_size), mode="bicubic",
                              align_corners=False)
        return x

    # -- Tokenizer API -------------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The continuous (B, semantic + pixel dims, G, G) features the quantizer starts from."""
        self.check_images(images)
        tokens = self.semantic_encoder(self.semantic_input(images), grid=self.grid)
        semantic = self.encode_task_layer(tokens)
        b = semantic.shape[0]
        semantic = semantic.transpose(1, 2).reshape(b, self.semantic_code_dim, self.grid, self.grid)
        pixel = self.quant_conv(self.encoder(self.pixel_input(images)))
        return torch.cat([semantic, pixel.to(semantic.dtype)], dim=1)

    def encode(self, images: torch.Tensor) -> Encoded:
        quantized, ids, aux = self.quantize(self.features(images))
        return Encoded(ids=ids, latents=self._tokens(quantized),
                       extras={"aux": aux, "scales": self.scales, "grid": self.grid})

    def _tokens(self, grid: torch.Tensor) -> torch.Tensor:
        return grid.flatten(2).transpose(1, 2)

    def _grid(self, latents: torch.Tensor) -> torch.Tensor:
        b, n, c = latents.shape
        if n != self.grid * self.grid:
            raise ValueError(f"expected {self.grid * self.grid} latents ({self.grid}x{self.grid}), got {n}")
        return latents.transpose(1, 2).reshape(b, c, self.grid, self.grid)

    def quantized_from(self, encoded: Encoded | torch.Tensor) -> torch.Tensor:
        """(B, C, G, G) quantized features from an Encoded, ids (full or a prefix of whole scales)
        or latents (B, G*G, C)."""
        if isinstance(encoded, Encoded):
            if encoded.latents is not None:
                return self._grid(encoded.latents)
            encoded = encoded.ids
        if encoded.is_floating_point():
            return self._grid(encoded)
        if encoded.dim() != 2:
            raise ValueError(f"token ids must have shape (B, K), got {tuple(encoded.shape)}")
        if encoded.shape[1] not in self.quantize.prefix_lengths:
            raise ValueError(f"expected {self.num_tokens} ids (scales {self.scales}) or a prefix of whole scales "
                             f"({self.quantize.prefix_lengths}), got {encoded.shape[1]}")
        try:
            self.check_ids(encoded)
        except ValueError as err:
            if int(encoded.min()) == -1:
                raise ValueError("ids of -1 mark the scale a training-mode encode dropped; encode in eval mode "
                                 "(tok.eval()) to get ids to decode") from err
            raise
        return self.quantize.embed(encoded)

    def decode_pixels(self, quantized: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (unclamped, at output_size) from (B, C, G, G) quantized features."""
        pixel = quantized[:, self.semantic_code_dim:]
        x = self.decoder(self.post_quant_conv(pixel.to(self.post_quant_conv.weight.dtype)))
        if x.shape[-1] != self.output_size:
            x = F.interpolate(x, size=(self.output_size, self.output_size), mode="bicubic", align_corners=False)
        return x

    def decode_semantic(self, quantized: torch.Tensor) -> torch.Tensor:
        """(B, G*G, semantic_out_dim) teacher-space features from quantized features."""
        return self.decode_task_layer(self.semantic_decoder(quantized[:, : self.semantic_code_dim]))

    def decode(self, encoded: Encoded | torch.Tensor, num_tokens: int | None = None, **sampling) -> torch.Tensor:
        """Pixels on the [0, 1] scale (unclamped). `num_tokens` keeps only the first ids (a count in
        `token_prefixes`: whole scales, coarse to fine), so evaluation can measure each prefix."""
        if sampling:
            raise ValueError(f"TokenFlow decoding is deterministic and takes no options, got {sorted(sampling)}")
        if num_tokens is not None:
            ids = encoded.ids if isinstance(encoded, Encoded) else encoded
            if ids is None or ids.is_floating_point():
                raise ValueError("num_tokens needs token ids, not continuous latents")
            if num_tokens not in self.token_prefixes:
                raise ValueError(f"num_tokens={num_tokens} is not a count of whole scales; "
                                 f"choose one of {self.token_prefixes}")
            encoded = ids[:, :num_tokens]
        return (self.decode_pixels(self.quantized_from(encoded)) + 1) / 2

    def semantic_features(self, encoded: Encoded | torch.Tensor) -> torch.Tensor:
        """The features for understanding tasks: the semantic decoder's output, (B, G*G, semantic_out_dim)."""
        return self.decode_semantic(self.quantized_from(encoded))

    def forward(self, images: torch.Tensor) -> ModelOutput:
        encoded = self.encode(images)
        quantized = self._grid(encoded.latents)
        aux = encoded.extras["aux"]
        aux_loss = aux["loss"]
        if self.trainable == "all":  # stage 2 freezes the semantic branch: nothing to predict
            semantic = self.decode_semantic(quantized)
            encoded.extras["semantic"] = semantic
            # Zero, but it keeps the semantic decoder in the graph when the objective has no
            # distillation term: DDP expects a gradient for every trainable parameter.
            aux_loss = aux_loss + 0.0 * semantic.float().mean()
        logs = {f"quantizer/{k}": v.detach() for k, v in aux.items() if k != "loss"}
        reconstruction = (self.decode_pixels(quantized) + 1) / 2
        return ModelOutput(reconstruction=reconstruction, aux_loss=aux_loss, logs=logs, encoded=encoded)

    # -- training hooks ----------------------------------------------------------------------------
    def last_layer_weight(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def no_weight_decay_names(self) -> set[str]:
        return {"quantize.quantizer.semantic_codebook.weight", "quantize.quantizer.pixel_codebook.weight",
                "semantic_decoder.cls_token", "semantic_decoder.pos_embed"}

    def build_teacher(self) -> nn.Module:
        """A fresh copy of the pretrained tower this model started from (random weights: the same
        seed), with its output projection: the frozen source of distillation targets."""
        return build_seeded_tower(self.teacher_spec, teacher=True)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the transformer activations in backward (the pixel CNN keeps its own)."""
        self.semantic_decoder.transformer.gradient_checkpointing = enabled
        tower = self.semantic_encoder.model
        if hasattr(tower, "set_grad_checkpointing"):  # open_clip and timm towers
            tower.set_grad_checkpointing(enabled)
        elif getattr(tower, "supports_gradient_checkpointing", False):  # transformers (SigLIP)
            if enabled:
                tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                tower.gradient_checkpointing_disable()
        elif enabled:
            warnings.warn(f"gradient checkpointing is not available for the {type(tower).__name__} tower; "
                          "only the semantic decoder recomputes its activations", stacklevel=2)

    @property
    def config(self) -> dict[str, Any]:
        """The architecture config, with the semantic tower recorded by architecture instead of its
        pretrained source: a saved or exported TokenFlow rebuilds offline without the teacher's
        weights, and `teacher` keeps the source for distillation."""
        config = super().config
        seed = self.semantic_encoder_spec.get("seed", 0)
        config["semantic_encoder"] = _plain({**self.semantic_encoder.rebuild_arguments(), "seed": seed})
        config["teacher"] = _plain(self.teacher_spec)
        return config


# `tiny: true` in a semantic_encoder spec: a random 64 px tower of the same kind (4 x 4 grid, 16-d
# features), for smoke runs and tests of any experiment without pretrained weights.
TINY_TOWERS: dict[str, dict[str, Any]] = {
    "openai_clip": {"config": {"image_size": 64, "patch_size": 16, "width": 32, "layers": 1, "heads": 2,
                               "output_dim": 16}},
    "siglip": {"config": {"image_size": 64, "patch_size": 16, "hidden_size": 16, "intermediate_size": 32,
                          "num_hidden_layers": 2, "num_attention_heads": 2}},
    "timm": {"name": "vit_tiny_patch16_224", "config": {"img_size": 64, "embed_dim": 16, "depth": 1, "num_heads": 2}},
}


def build_seeded_tower(spec: Mapping[str, Any], teacher: bool) -> nn.Module:
    """`build_vision_tower(**spec)`; random weights are drawn from `spec["seed"]` (default 0) without
    touching the global random state, so the tokenizer's tower and the teacher start identical.
    The trainable tower loses its output projection (the official loader deletes CLIP's `proj`)."""
    spec = dict(spec)
    seed = int(spec.pop("seed", 0))
    if spec.pop("tiny", False):
        kind = spec.get("kind")
        if kind not in TINY_TOWERS:
            raise ValueError(f"no tiny preset for semantic_encoder.kind={kind!r}; known: {sorted(TINY_TOWERS)}")
        spec.update(TINY_TOWERS[kind], pretrained=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = build_vision_tower(**spec)
    if not teacher and hasattr(tower, "drop_projection"):
        tower.drop_projection()
    return tower
