"""The `Tokenizer` contract every model implements, the registry that rebuilds models from config,
and the batch contract.

Images at the public boundary are float tensors in [0, 1], shape (B, 3, H, W); video is
(B, T, 3, H, W). Each model maps them to its own internal range inside. A batch (what loaders
yield, objectives and metrics take) is `{"image": (B, 3, H, W)}` or `{"video": (B, T, 3, H, W)}`,
plus optional `"text"` (list of str) and `"key"`.
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

_REGISTRY: dict[str, type[Tokenizer]] = {}

# -- the batch contract ------------------------------------------------------------------------
Batch = Mapping[str, Any]
VISUAL_KEYS = ("image", "video")


def as_batch(batch: Batch | torch.Tensor) -> Batch:
    """The batch dict; a bare tensor of images (or video, 5-D) becomes `{"image"|"video": tensor}`."""
    if isinstance(batch, torch.Tensor):
        return {"video" if batch.dim() == 5 else "image": batch}
    if not isinstance(batch, Mapping) or not any(k in batch for k in VISUAL_KEYS):
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"a batch is a dict with 'image' (B, 3, H, W) or 'video' (B, T, 3, H, W); got {keys}")
    return batch


def batch_pixels(batch: Batch | torch.Tensor) -> torch.Tensor:
    """The visual input of a batch: its images, or its video when it holds no images."""
    batch = as_batch(batch)
    return batch["image"] if "image" in batch else batch["video"]


def register_tokenizer(cls: type[Tokenizer]) -> type[Tokenizer]:
    """Class decorator: make `cls` rebuildable from a saved config by its `model_type`."""
    if not getattr(cls, "model_type", None):
        raise TypeError(f"{cls.__name__} needs a `model_type` class attribute to be registered")
    _REGISTRY[cls.model_type] = cls
    return cls


def tokenizer_class(model_type: str) -> type[Tokenizer]:
    if model_type not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise KeyError(f"unknown tokenizer model_type {model_type!r}; known: {known}")
    return _REGISTRY[model_type]


def build_tokenizer(config: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from the dict its `config` property returned."""
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise KeyError("tokenizer config has no 'model_type'")
    return tokenizer_class(model_type)(**config)


def _plain(value: Any) -> Any:
    """Turn OmegaConf containers (Hydra passes them) and tuples into JSON-friendly values."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra, a hard dependency
        pass
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass
class Encoded:
    """What `encode` returns.

    ids:     LongTensor (B, K) of discrete token ids, or None for continuous models.
    latents: the continuous (quantized when discrete) tokens the decoder consumes, (B, K, C).
    extras:  anything else decode needs or callers may want (posterior stats, layout, ...).
    """

    ids: torch.Tensor | None
    latents: torch.Tensor | None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelOutput:
    """What `forward` returns for a training step.

    reconstruction: (B, 3, H, W) on the [0, 1] scale, not clamped (losses see the raw values); None
                    for a step that trains no pixel path (TiTok's proxy codes, SEED).
    aux_loss:       the model's own weighted losses (quantizer / KL), a scalar tensor.
    logs:           named scalar statistics to log (detached).
    encoded:        the `Encoded` of this batch (ids feed codebook-usage metrics).
    """

    reconstruction: torch.Tensor | None
    aux_loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    encoded: Encoded | None = None


class Tokenizer(nn.Module, ABC):
    """Base class of every tokenizer.

    Subclasses set `model_type`, implement `encode`, `decode` and `forward`, and are decorated
    with `@register_tokenizer`. The keyword arguments of a subclass's `__init__` are recorded
    automatically as `config`, so `build_tokenizer(tok.config)` rebuilds the same architecture
    (the diffusers `register_to_config` idea without a decorator on every `__init__`).
    """

    model_type: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        original_init = cls.__init__
        signature = inspect.signature(original_init)

        @functools.wraps(original_init)
        def recording_init(self, *args, **init_kwargs):
            # Only the outermost __init__ records: a subclass calling super().__init__ keeps its own.
            if "_config" not in self.__dict__:
                bound = signature.bind(self, *args, **init_kwargs)
                bound.apply_defaults()
                arguments = {k: _plain(v) for k, v in bound.arguments.items() if k != "self"}
                for name, param in signature.parameters.items():
                    if param.kind is inspect.Parameter.VAR_KEYWORD:
                        arguments.update(_plain(arguments.pop(name, {})))
                object.__setattr__(self, "_config", {"model_type": type(self).model_type, **arguments})
            original_init(self, *args, **init_kwargs)

        cls.__init__ = recording_init

    # -- configuration -------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """Plain-dict architecture config; `build_tokenizer(config)` rebuilds this model."""
        return dict(self.__dict__.get("_config", {"model_type": self.model_type}))

    # -- the contract --------------------------------------------------------------------------
    # "image": encode/decode/forward take (B, 3, H, W); "video": (B, T, 3, H, W). Loaders, metrics
    # and grids accept both, so a video model plugs into the same training and evaluation.
    input_kind: ClassVar[str] = "image"
    image_size: int
    num_tokens: int
    codebook_size: int | None = None

    @abstractmethod
    def encode(self, images: torch.Tensor) -> Encoded:
        ...

    @abstractmethod
    def decode(self, encoded: Encoded | torch.Tensor, **sampling) -> torch.Tensor:
        ...

    @abstractmethod
    def forward(self, images: torch.Tensor) -> ModelOutput:
        ...

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, **sampling) -> torch.Tensor:
        """encode + decode, clamped to [0, 1]."""
        return self.decode(self.encode(images), **sampling).clamp(0, 1)

    # -- which parts train ----------------------------------------------------------------------
    # The one way every model and training stage says what trains: `freeze_parts(frozen=[...])` or
    # `freeze_parts(trainable=[...])` over the model's top-level parts, usually from an __init__
    # argument. Frozen parts get requires_grad=False, stay in eval mode under `train()` (a frozen
    # quantizer restarts no codes, a frozen branch drops no scales) and never enter the optimizer
    # or the EMA copy.
    frozen_parts: tuple[str, ...] = ()

    def freezable_parts(self) -> list[str]:
        """Top-level parts that `freeze_parts` may name: child modules and direct parameters."""
        return [name for name, _ in self.named_children()] + [name for name, _ in self.named_parameters(recurse=False)]

    def freeze_parts(self, frozen: Sequence[str] = (), trainable: Sequence[str] | None = None) -> None:
        """Freeze the parts named in `frozen`, or every part except those in `trainable`."""
        if trainable is not None and frozen:
            raise ValueError(f"name the parts that train or those that are frozen, not both: frozen={list(frozen)}, "
                             f"trainable={list(trainable)}")
        available = self.freezable_parts()
        named = list(frozen) if trainable is None else list(trainable)
        unknown = sorted(set(named) - set(available))
        if unknown:
            verb = "freeze" if trainable is None else "train only"
            raise ValueError(f"cannot {verb} {unknown}: this {self.model_type} has the parts {available}")
        parts = tuple(named) if trainable is None else tuple(p for p in available if p not in set(trainable))
        if self.frozen_parts and parts != self.frozen_parts:
            # Unfreezing could also thaw pretrained pieces frozen inside a part: parts freeze once.
            raise ValueError(f"this {self.model_type} already froze {list(self.frozen_parts)}; parts are frozen "
                             "once, when the model is built")
        for name in parts:
            getattr(self, name).requires_grad_(False)
        self.frozen_parts = parts

    def train(self, mode: bool = True) -> Tokenizer:
        super().train(mode)
        for name in self.frozen_parts:
            part = getattr(self, name)
            if isinstance(part, nn.Module):
                part.eval()  # frozen parts run as at inference
        return self

    def last_layer_weight(self) -> torch.Tensor | None:
        """Weight of the layer that produces pixels (for the adaptive GAN weight); None if n/a."""
        return None

    def no_weight_decay_names(self) -> set[str]:
        """Names of parameters, besides 1-D ones, that must not get weight decay."""
        return set()

    # -- input checks shared by all image tokenizers ---------------------------------------------
    def check_images(self, images: torch.Tensor, patch_size: int | None = None) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images of shape (B, 3, H, W) in [0, 1], got {shape}")
        if images.shape[1] != 3:
            raise ValueError(f"expected 3 (RGB) channels, got {images.shape[1]} in shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")
        h, w = images.shape[-2:]
        if patch_size and (h % patch_size or w % patch_size):
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch_size}")
        size = getattr(self, "image_size", None)
        if size and (h, w) != (size, size):
            raise ValueError(f"this {self.model_type} tokenizer expects {size}x{size} images, got {h}x{w}")

    def check_video(self, video: torch.Tensor, num_frames: int | None = None, patch_size: int | None = None) -> None:
        """Checks for video tokenizers: float (B, T, 3, H, W) in [0, 1], `num_frames` frames if given."""
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"expected video of shape (B, T, 3, H, W) in [0, 1], got {shape}")
        if num_frames is not None and video.shape[1] != num_frames:
            raise ValueError(f"this {self.model_type} tokenizer takes clips of {num_frames} frames, got {video.shape[1]}")
        self.check_images(video.flatten(0, 1), patch_size)

    def check_ids(self, ids: torch.Tensor, num_tokens: int | None = None) -> None:
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"token ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"token ids must have shape (B, K), got {tuple(ids.shape)}")
        if num_tokens is not None and ids.shape[1] != num_tokens:
            raise ValueError(f"expected {num_tokens} tokens per image, got {ids.shape[1]}")
        if self.codebook_size is not None and ids.numel():
            lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one host sync
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(f"token ids must lie in [0, {self.codebook_size - 1}], got range [{lo}, {hi}]")
