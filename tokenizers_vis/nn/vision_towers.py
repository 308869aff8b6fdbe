"""Trainable vision towers initialised from pretrained teachers: ViTs that map images to patch tokens.

Every tower is `forward(images, grid=None) -> (B, N, W)` patch tokens (no class or other prefix
tokens), with images in TokenFlow's internal range [-1, 1]:
  ClipVisionTower    an open_clip `VisionTransformer` in the OpenAI layout (QuickGELU, LayerNorm
                     eps 1e-5), fed the [-1, 1] tensor itself (TokenFlow's clipb uses no CLIP
                     mean/std); position table interpolated the BEiT way when the grid differs.
  SiglipVisionTower  transformers' `SiglipVisionModel`; tokens of a hidden layer (penultimate by
                     default, no post_layernorm), at the native image size only.
  TimmVisionTower    a timm ViT by name (ViTamin-XL: `vitamin_xlarge_256`), `forward_features`.

Weights: `pretrained` null builds the tower from `config` with random weights (tests, and towers
whose weights arrive with a tokenizer's state dict); otherwise a local file / folder or a named
pretrained model. A missing weight raises `MissingWeightsError` naming the config key.

State-dict names: each tower holds its network as `self.model`, so our names are the official
TokenFlow `encoder_vqkd.*` names (tower-relative) with `model.` in front; see `official_key_to_ours`.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenizers_vis.nn.pretrained import _from_pretrained, load_timm_model, weights_file
from tokenizers_vis.nn.transformer import interpolate_position_table
from tokenizers_vis.nn.weights import MissingWeightsError, read_state_file

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "SIGLIP_MEAN", "SIGLIP_STD", "VisionTower", "ClipVisionTower", "SiglipVisionTower",
    "TimmVisionTower", "build_vision_tower", "official_input_scaling", "official_key_to_ours", "ours_key_to_official",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

_PREFIX = "model."
_HF4_PREFIX = "vision_model."  # transformers 4.x SiglipVisionModel nests the tower one level deeper


def official_key_to_ours(name: str) -> str:
    """Tower-relative official name (`encoder_vqkd.` stripped) -> our tower's state-dict name.

    Both CLIP (`conv1.weight`) and SigLIP (`embeddings.patch_embedding.weight`) gain `model.`.
    A SigLIP checkpoint saved under transformers 4.x (the official requirements pin 4.43.4) names
    the same tensors `vision_model.embeddings...`; that level is dropped, since our `model` is
    always the vision transformer itself.
    """
    if name.startswith(_HF4_PREFIX):
        name = name[len(_HF4_PREFIX):]
    return _PREFIX + name


def ours_key_to_official(name: str) -> str:
    """Inverse of `official_key_to_ours`, giving the transformers-5 / reference-fixture names."""
    if not name.startswith(_PREFIX):
        raise KeyError(f"{name!r} is not a vision-tower state-dict name (they start with {_PREFIX!r})")
    return name[len(_PREFIX):]


def official_input_scaling(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """TokenFlow's scaling layers: [-1, 1] -> ((x + 1) * 127.5).clamp(0, 255) / 255 -> (x - mean) / std.

    Same arithmetic as the official code (so the same rounding). With SigLIP's mean = std = 0.5 it is
    x clamped to [-1, 1] (bit for bit on the reference images); ViTamin uses CLIP's mean/std.
    """
    x = ((images + 1.0) * 127.5).clamp(0.0, 255.0) / 255.0
    return (x - _channel_constant(tuple(mean), x.dtype, x.device)) / _channel_constant(tuple(std), x.dtype, x.device)


@functools.lru_cache(maxsize=32)
def _channel_constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, C, 1, 1) constant, made once per device and dtype: a new CUDA tensor per call is a
    host-to-device copy on every forward. Never an inference tensor, so autograd may save it."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


def _read_bare_state(path: Path, config_key: str, what: str) -> dict[str, torch.Tensor]:
    """A state-dict file as the bare network's names (official, tower-relative): files saved from one
    of our towers (`model.*`) or with transformers 4.x SigLIP names (`vision_model.*`) work too."""
    try:
        state = read_state_file(weights_file(path))
    except (OSError, ValueError, RuntimeError) as err:
        raise MissingWeightsError(
            f"could not read {config_key}={str(path)!r} ({err}). Point {config_key} at a state-dict file "
            f"(.safetensors or torch) of {what}, or at a folder holding model.safetensors."
        ) from err
    own = bool(state) and all(k.startswith(_PREFIX) for k in state)
    return {ours_key_to_official(k if own else official_key_to_ours(k)): v for k, v in state.items()}


def _check_grid(grid: int | None, actual: int, what: str) -> None:
    if grid is not None and grid != actual:
        raise ValueError(f"{what} gives a {actual}x{actual} token grid, but grid={grid} was asked for")


class VisionTower(nn.Module, ABC):
    """What every tower offers: `forward(images in [-1, 1], grid=None) -> (B, grid**2, out_dim)`,
    `width` (token width of the network), `out_dim` (what forward returns; the width unless a
    projection applies) and `grid_for(image_size)` (the token grid at that input side)."""

    @property
    @abstractmethod
    def width(self) -> int:
        ...

    @property
    def out_dim(self) -> int:
        return self.width

    @abstractmethod
    def grid_for(self, image_size: int) -> int:
        ...

    @abstractmethod
    def rebuild_arguments(self) -> dict[str, Any]:
        """`build_vision_tower` arguments that rebuild this architecture with random weights
        (`pretrained: None`): what a saved tokenizer records, as the weights travel with it."""


class ClipVisionTower(VisionTower):
    """An OpenAI-layout CLIP ViT (open_clip `VisionTransformer`) returning ln_post'ed patch tokens.

    pretrained: None (random weights from `config`); a local state-dict file (.safetensors or torch)
        or a folder holding model.safetensors / pytorch_model.bin, with the visual tower's names
        (`conv1.weight`, ..., `proj` optional; a file saved from this tower, `model.*`, works too):
        the architecture is read from the tensor shapes, `config` supplies `heads` (default
        width // 64, the OpenAI convention); or an open_clip model name, "ViT-B-16" with `tag`, or
        "ViT-B-16/openai" (offline: the local Hub cache, `cache_dir` to point elsewhere).
    config: {image_size, patch_size, width, layers, heads, mlp_ratio=4, output_dim=512}.
    project: multiply the tokens by `proj` (teacher targets: CLIP-B/16's 512-d space).
    config_key: the config entry named in errors.
    """

    def __init__(self, pretrained: str | None = None, config: Mapping[str, Any] | None = None,
                 project: bool = False, tag: str = "openai", config_key: str = "semantic_encoder.pretrained",
                 cache_dir: str | None = None):
        super().__init__()
        self.config_key = config_key
        self.project = project
        if pretrained is None:
            if config is None:
                raise ValueError(f"a CLIP tower needs {config_key} (weights) or a config dict (random weights)")
            self.model = self._build(**dict(config))
        elif Path(pretrained).exists():
            self.model = self._from_file(Path(pretrained), config or {})
        else:
            self.model = self._from_open_clip(pretrained, tag, cache_dir)

    @staticmethod
    def _build(image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_ratio: float = 4.0,
               output_dim: int = 512) -> nn.Module:
        from open_clip.model import QuickGELU
        from open_clip.transformer import LayerNorm, VisionTransformer

        # OpenAI layout: QuickGELU, LayerNorm eps 1e-5 (open_clip's default), class-token pooling.
        return VisionTransformer(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
                                 heads=heads, mlp_ratio=mlp_ratio, output_dim=output_dim, act_layer=QuickGELU,
                                 norm_layer=LayerNorm)

    def _from_file(self, path: Path, config: Mapping[str, Any]) -> nn.Module:
        state = _read_bare_state(path, self.config_key, "an OpenAI-layout CLIP vision tower")
        if "conv1.weight" not in state or "positional_embedding" not in state:
            raise MissingWeightsError(f"{self.config_key}={str(path)!r} is not a CLIP vision tower state dict "
                                         f"(no conv1.weight / positional_embedding; keys: {sorted(state)[:5]}...)")
        width, _, patch, _ = state["conv1.weight"].shape
        grid = math.isqrt(state["positional_embedding"].shape[0] - 1)
        layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks."))
        # Shapes fix everything but the head count; those not stored fall back to `config`.
        sizes = dict(image_size=grid * patch, patch_size=patch, width=width, layers=layers,
                     heads=config.get("heads", width // 64),
                     mlp_ratio=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
                     output_dim=state["proj"].shape[1] if "proj" in state else config.get("output_dim", 512))
        model = self._build(**sizes)
        if "proj" not in state:
            model.proj = None  # a trainable TokenFlow tower was saved without it
        model.load_state_dict(state, strict=True)
        return model

    def _from_open_clip(self, pretrained: str, tag: str, cache_dir: str | None) -> nn.Module:
        import open_clip

        name, _, maybe_tag = pretrained.rpartition("/")
        if not (name and maybe_tag in open_clip.list_pretrained_tags_by_model(name.replace("/", "-"))):
            name = pretrained
        else:
            tag = maybe_tag
        name = name.replace("/", "-")  # the OpenAI spelling "ViT-B/16"
        if name not in open_clip.list_models():
            raise MissingWeightsError(
                f"{self.config_key}={pretrained!r} is neither a local file or folder nor an open_clip model name. "
                f"Set it to a state-dict file of the CLIP vision tower, or to an open_clip name such as "
                f"'ViT-B-16/openai' (downloaded where there is network; offline it must be in the Hub cache).")
        try:
            # The tag's own QuickGELU setting (OpenAI weights need it) instead of the config's default.
            quick_gelu = bool((open_clip.get_pretrained_cfg(name, tag) or {}).get("quick_gelu", False))
            clip = open_clip.create_model(name, pretrained=tag, force_quick_gelu=quick_gelu, cache_dir=cache_dir)
        except Exception as err:
            raise MissingWeightsError(
                f"could not load {self.config_key}={pretrained!r} (open_clip {name!r}, tag {tag!r}: {err}). "
                f"Download it where there is network (open_clip.create_model({name!r}, pretrained={tag!r}) fills "
                f"the Hub cache), or set {self.config_key} to a local state-dict file of the vision tower."
            ) from err
        return clip.visual

    @property
    def patch_size(self) -> int:
        return int(self.model.conv1.kernel_size[0])

    @property
    def width(self) -> int:
        return int(self.model.conv1.out_channels)

    @property
    def out_dim(self) -> int:
        """Width of what `forward` returns by default (the projection's when `project`)."""
        return int(self.model.proj.shape[1]) if self.project else self.width

    def grid_for(self, image_size: int) -> int:
        return image_size // self.patch_size

    def rebuild_arguments(self) -> dict[str, Any]:
        m = self.model
        blocks = m.transformer.resblocks
        grid = math.isqrt(m.positional_embedding.shape[0] - 1)
        config = {"image_size": grid * self.patch_size, "patch_size": self.patch_size, "width": self.width,
                  "layers": len(blocks), "heads": int(blocks[0].attn.num_heads),
                  "mlp_ratio": blocks[0].mlp.c_fc.out_features / self.width,
                  "output_dim": int(m.proj.shape[1]) if m.proj is not None else m.output_dim}
        return {"kind": "openai_clip", "pretrained": None, "config": config, "project": self.project}

    def drop_projection(self) -> None:
        """Delete `proj` as the official loader does: the trainable tower neither uses nor stores it."""
        self.model.proj = None
        self.project = False

    def forward(self, images: torch.Tensor, grid: int | None = None, project: bool | None = None) -> torch.Tensor:
        m = self.model
        x = m.conv1(images)  # (B, W, g, g)
        _check_grid(grid, x.shape[-1], f"a {images.shape[-1]} px image with patch {self.patch_size}")
        g = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)
        pos = m.positional_embedding
        pos = torch.cat([pos[:1], interpolate_position_table(pos[1:], g)], dim=0)  # class row unchanged
        cls = m.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = m.ln_pre(torch.cat([cls, x], dim=1) + pos.to(x.dtype))
        # open_clip's stack takes (B, N, W) since it has `batch_first` (3.3.0: True); older ones want (N, B, W).
        if hasattr(m.transformer, "batch_first"):
            x = m.transformer(x)
        else:
            x = m.transformer(x.transpose(0, 1)).transpose(0, 1)
        tokens = m.ln_post(x)[:, 1:]  # ln_post on all tokens, then the class token goes
        if self.project if project is None else project:
            if m.proj is None:
                raise ValueError("this CLIP tower's projection was dropped (drop_projection); build the "
                                 "teacher tower separately to get projected features")
            tokens = tokens @ m.proj
        return tokens


class SiglipVisionTower(VisionTower):
    """transformers' SigLIP vision tower returning the tokens of one hidden layer.

    pretrained: None (random weights from `config`, SiglipVisionConfig arguments); a folder or Hub id
        for `SiglipVisionModel.from_pretrained` (e.g. "google/siglip-so400m-patch14-384"); or a
        state-dict file (needs `config` for the architecture; our `model.*` names or the bare ones).
    feature_layer: index into `hidden_states` (embeddings first): -2 is the penultimate layer's
        output, before post_layernorm, as TokenFlow uses.
    scale_input: apply TokenFlow's SigLIP scaling layer to the [-1, 1] input, i.e. clamp to [-1, 1]
        (identity for inputs already in range).
    freeze_unused: turn off gradients of what cannot affect the tokens (layers after `feature_layer`,
        post_layernorm, the pooling head), as the official code does; without it DDP would meet
        parameters that never get a gradient.
    The tower runs at its native image size only; another size raises ValueError.
    """

    def __init__(self, pretrained: str | None = None, config: Mapping[str, Any] | None = None,
                 feature_layer: int = -2, scale_input: bool = True, freeze_unused: bool = True,
                 attn_implementation: str = "sdpa", config_key: str = "semantic_encoder.pretrained",
                 cache_dir: str | None = None):
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        self.config_key = config_key
        self.feature_layer = feature_layer
        self.scale_input = scale_input
        self.freeze_unused = freeze_unused
        self.attn_implementation = attn_implementation
        if pretrained is not None and not Path(pretrained).is_file():
            kwargs = {"attn_implementation": attn_implementation, **({"cache_dir": cache_dir} if cache_dir else {})}
            hf = _from_pretrained(SiglipVisionModel, pretrained, config_key, **kwargs)
        elif config is not None:
            hf = SiglipVisionModel._from_config(SiglipVisionConfig(**dict(config)),
                                                attn_implementation=attn_implementation)
        else:
            raise ValueError(f"a SigLIP tower needs {config_key} (a folder or Hub id), or a config dict "
                             "(SiglipVisionConfig arguments) for random weights or a state-dict file")
        # transformers 4.x wraps the tower in `vision_model`; keep the tower itself so our names
        # do not depend on the version.
        self.model = getattr(hf, "vision_model", hf)
        if pretrained is not None and Path(pretrained).is_file():
            self.model.load_state_dict(_read_bare_state(Path(pretrained), config_key, "a SigLIP vision tower"),
                                       strict=True)
        self.config = hf.config
        layers = self.config.num_hidden_layers
        self._feature_index = feature_layer % (layers + 1)
        if not 1 <= self._feature_index <= layers:
            raise ValueError(f"feature_layer={feature_layer} selects the embeddings, not a layer of {layers}")
        if freeze_unused:
            for name, param in self.model.named_parameters():
                if self._unused(name):
                    param.requires_grad_(False)

    def _unused(self, name: str) -> bool:
        if name.startswith(("post_layernorm.", "head.")):
            return True
        parts = name.split(".")
        # Layer i writes hidden_states[i + 1]; later layers do not reach the selected tokens.
        return parts[:2] == ["encoder", "layers"] and int(parts[2]) >= self._feature_index

    @property
    def patch_size(self) -> int:
        return int(self.config.patch_size)

    def rebuild_arguments(self) -> dict[str, Any]:
        from transformers import SiglipVisionConfig

        defaults = SiglipVisionConfig().to_dict()
        config = {k: v for k, v in self.config.to_dict().items()
                  if k in defaults and not k.startswith("_") and k not in ("transformers_version", "model_type")}
        return {"kind": "siglip", "pretrained": None, "config": config, "feature_layer": self.feature_layer,
                "scale_input": self.scale_input, "freeze_unused": self.freeze_unused,
                "attn_implementation": self.attn_implementation}

    @property
    def width(self) -> int:
        return int(self.config.hidden_size)

    def grid_for(self, image_size: int) -> int:
        if image_size != self.config.image_size:
            raise ValueError(f"the SigLIP tower runs at its native {self.config.image_size} px only (its position "
                             f"table is {self.config.image_size // self.patch_size}^2), not {image_size} px")
        return image_size // self.patch_size

    def forward(self, images: torch.Tensor, grid: int | None = None) -> torch.Tensor:
        h, w = images.shape[-2:]
        if h != w:
            raise ValueError(f"the SigLIP tower takes square images, got {h}x{w}")
        _check_grid(grid, self.grid_for(h), f"a {h} px image with patch {self.patch_size}")
        if self.scale_input:
            images = official_input_scaling(images, SIGLIP_MEAN, SIGLIP_STD)
        out = self.model(pixel_values=images, output_hidden_states=True)
        return out.hidden_states[self._feature_index]


class TimmVisionTower(VisionTower):
    """A timm ViT (ViTamin-XL for TokenFlow: `vitamin_xlarge_256`) returning `forward_features` tokens,
    prefix tokens dropped. As the official loader does, the classifier and `fc_norm` are removed
    (they never touch these tokens).

    name: timm model name. pretrained: None (random weights; `config` holds extra create_model
        arguments that shrink it); a timm name with its pretrained tag, e.g. "vitamin_xlarge_256"
        (timm's own weights: a download, or the Hub cache offline); a local file / folder; or a Hub id.
    input_mean / input_std: `official_input_scaling` constants (TokenFlow's ViTamin: CLIP's), or None
        to feed the [-1, 1] images as they are.
    """

    def __init__(self, name: str | None = None, pretrained: str | None = None,
                 config: Mapping[str, Any] | None = None, input_mean: Sequence[float] | None = CLIP_MEAN,
                 input_std: Sequence[float] | None = CLIP_STD, config_key: str = "semantic_encoder.pretrained"):
        super().__init__()
        import timm

        options = {"num_classes": 0, **dict(config or {})}
        is_path = pretrained is not None and Path(pretrained).exists()
        if pretrained is not None and not is_path and "/" not in pretrained:
            name, pretrained = pretrained, None  # a timm name (with tag): timm's own weights
            self.model = load_timm_model(name, None, options, config_key)
        elif name is None:
            raise ValueError("a timm tower needs `name` (a timm model name)")
        elif pretrained is None:
            self.model = timm.create_model(name, pretrained=False, **options)
        else:
            self.model = load_timm_model(name, pretrained, options, config_key)
        self.name, self.options = name, dict(config or {})
        if getattr(self.model, "fc_norm", None) is not None:
            self.model.fc_norm = nn.Identity()
        self.input_mean, self.input_std = input_mean, input_std
        self.reduction = int(self.model.feature_info[-1]["reduction"])

    def rebuild_arguments(self) -> dict[str, Any]:
        # The bare architecture name: a "name.tag" picks weights, not a different network.
        return {"kind": "timm", "name": self.name.split(".")[0], "pretrained": None, "config": dict(self.options),
                "input_mean": self.input_mean, "input_std": self.input_std}

    @property
    def width(self) -> int:
        return int(self.model.num_features)

    def grid_for(self, image_size: int) -> int:
        return image_size // self.reduction

    def forward(self, images: torch.Tensor, grid: int | None = None) -> torch.Tensor:
        _check_grid(grid, self.grid_for(images.shape[-1]), f"a {images.shape[-1]} px image")
        if self.input_mean is not None:
            images = official_input_scaling(images, self.input_mean, self.input_std)
        tokens = self.model.forward_features(images)
        return tokens[:, getattr(self.model, "num_prefix_tokens", 0):]


_TOWERS = {"openai_clip": ClipVisionTower, "siglip": SiglipVisionTower, "timm": TimmVisionTower}


def build_vision_tower(kind: str, pretrained: str | None = None, config: Mapping[str, Any] | None = None,
                       **options: Any) -> nn.Module:
    """A vision tower by kind: "openai_clip", "siglip" or "timm" (options go to its constructor)."""
    if kind not in _TOWERS:
        raise ValueError(f"unknown vision tower kind {kind!r}; expected one of {sorted(_TOWERS)}")
    return _TOWERS[kind](pretrained=pretrained, config=config, **options)
