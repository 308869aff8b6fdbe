"""Frozen pretrained networks built from config: `pretrained: null | local path | hub id`.

With `pretrained` set, the weights come from that folder or Hub repo (offline: the local Hub
cache); with `pretrained: null`, the network is built from its `config` dict with random weights,
which is how tests build tiny versions without downloading anything, and how a saved tokenizer
rebuilds a VAE whose weights then arrive with the tokenizer's own state_dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenizers_vis.nn.weights import MissingWeightsError


def _from_pretrained(cls, source: str, key: str, **kwargs):
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise MissingWeightsError(
            f"could not load {key}={source!r} ({err}). Set {key} to a local folder holding the weights "
            f"(download it where there is network, e.g. `hf download {source} --local-dir DIR`), or to null "
            f"to build the network from its config with random weights."
        ) from err


WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")


def weights_file(path: str | Path) -> Path:
    """`path` itself when it is a file, else the first of `WEIGHT_FILE_NAMES` inside the folder."""
    path = Path(path)
    if path.is_dir():
        files = [path / name for name in WEIGHT_FILE_NAMES if (path / name).is_file()]
        if not files:
            raise FileNotFoundError(f"{path} holds none of {list(WEIGHT_FILE_NAMES)}")
        return files[0]
    return path


def load_timm_model(name: str, pretrained: str | None, options: Mapping[str, Any], key: str,
                    alternative: str = "set it to null to build the network with random weights") -> nn.Module:
    """A timm model with pretrained weights from a local file or folder, a Hub id, or (pretrained None)
    timm's own pretrained tag of `name` (a download, or the local Hub cache offline).

    Any failure becomes a `MissingWeightsError` naming the config `key` and how to provide the
    weights; `alternative` is the other way out offered.
    """
    import timm

    try:
        if pretrained is None:
            return timm.create_model(name, pretrained=True, **options)
        path = Path(pretrained)
        if path.exists():
            file = weights_file(path)
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **options)
        return timm.create_model(f"hf-hub:{pretrained}", pretrained=True, **options)
    except Exception as err:
        raise MissingWeightsError(
            f"could not load {name!r} ({key}={pretrained or name!r}): {err}. Set {key} to a local weights file or "
            f"folder (download it where there is network), or {alternative}."
        ) from err


class FrozenModule(nn.Module):
    """A network that never trains: no gradients, and always in eval mode (no dropout, fixed
    statistics). Subclasses call `_freeze()` once their parts are built."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # The module holding it is put in train mode during fitting; a frozen net must not follow.
        return super().train(False)


class FrozenVAE(FrozenModule):
    """A diffusers `AutoencoderKL` as the frozen first stage of a latent model.

    Images are in [-1, 1] here (the VAE's range). `encode` returns the posterior mean, or
    mean + std * noise when `noise` is given, times `scaling_factor`; `decode` inverts the scaling.

    pretrained: folder or Hub id of an AutoencoderKL (`subfolder` inside it), or None to build one
        from `config` (AutoencoderKL keyword arguments) with random weights.
    scaling_factor: multiplies the latents; None takes the VAE config's value.
    """

    def __init__(self, pretrained: str | None = None, config: Mapping[str, Any] | None = None,
                 scaling_factor: float | None = None, subfolder: str | None = None):
        super().__init__()
        try:
            from diffusers import AutoencoderKL
        except ImportError as err:  # pragma: no cover - diffusers is a dependency
            raise ImportError("a VAE stage needs diffusers: pip install diffusers") from err
        if pretrained:
            kwargs = {"subfolder": subfolder} if subfolder else {}
            self.model = _from_pretrained(AutoencoderKL, pretrained, "vae.pretrained", **kwargs)
        elif config is not None:
            self.model = AutoencoderKL(**dict(config))
        else:
            raise ValueError("a VAE needs `pretrained` (a folder or Hub id) or `config` (AutoencoderKL arguments)")
        cfg = self.model.config
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else (cfg.scaling_factor or 1.0))
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self._freeze()

    def rebuild_arguments(self) -> dict[str, Any]:
        """Arguments that rebuild this VAE's architecture without its source (`pretrained: None`,
        the full AutoencoderKL config, the scaling in use): what a saved tokenizer records, as its
        weights travel in the tokenizer's own state_dict."""
        import inspect

        accepted = inspect.signature(type(self.model).__init__).parameters
        config = {k: v for k, v in self.model.config.items() if k in accepted and not k.startswith("_")}
        return {"pretrained": None, "config": config, "scaling_factor": self.scaling_factor, "subfolder": None}

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the posterior, unscaled."""
        dist = self.model.encode(images).latent_dist
        return dist.mean, dist.std

    def encode(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        mean, std = self.posterior(images)
        latents = mean if noise is None else mean + std * noise.to(mean)
        return latents * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents / self.scaling_factor).sample


# The image statistics torchvision / timm ImageNet backbones are trained with (the one definition).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FrozenVisionEncoder(FrozenModule):
    """A frozen timm ViT (DINOv2 for REPA) that maps [0, 1] images to patch features (B, h, w, C).

    name: timm model name. pretrained: a weights file, a folder holding one, or a Hub id; None
        takes timm's own pretrained tag of `name` (a download, or the local Hub cache offline).
    random_weights: build `name` with random weights (tests; `kwargs` shrink it).
    image_size: side the images are resized to (224 gives DINOv2-L/14 a 16 x 16 grid).
    """

    def __init__(self, name: str = "vit_large_patch14_dinov2.lvd142m", pretrained: str | None = None,
                 image_size: int = 224, random_weights: bool = False, kwargs: Mapping[str, Any] | None = None):
        super().__init__()
        try:
            import timm
        except ImportError as err:  # pragma: no cover - timm is a dependency
            raise ImportError("REPA needs timm: pip install timm") from err
        options = {"img_size": image_size, "num_classes": 0, **dict(kwargs or {})}
        self.image_size = image_size
        if random_weights:
            self.model = timm.create_model(name, pretrained=False, **options)
        else:
            self.model = load_timm_model(name, pretrained, options, key="objective.repa_encoder.pretrained",
                                         alternative="set repa_weight to 0")
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bicubic",
                                            align_corners=False)
        tokens = self.model.forward_features((x - self.mean) / self.std)
        tokens = tokens[:, getattr(self.model, "num_prefix_tokens", 1):]
        grid = int(round(tokens.shape[1] ** 0.5))
        return tokens.reshape(tokens.shape[0], grid, grid, -1)
