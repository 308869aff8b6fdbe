"""VQGAN: convolutional encoder, vector quantizer, convolutional decoder, in the MaskGIT-VQGAN layout.

With the defaults this is the MaskGIT-VQGAN (ImageNet 256 px, 16x downsampling to a 16x16 grid,
1024 x 256 codebook, no attention) whose codes TiTok's two-stage recipe uses as "proxy codes": the
stage-1 TiTok learns to predict them, and its decoder and codebook become TiTok's `pixel_decoder`
and `pixel_quantize`. Pixels are [0, 1] in and out, as that model works (no [-1, 1] remap).

Teachers are read by `load_vqgan`: one of our checkpoints, folders or Hub ids (`load_tokenizer`),
or the official MaskGIT-VQGAN layout, registered as the official format "maskgit_vqgan"
(models/official.py) so that `load_tokenizer` reads it too, in two forms:
- a state-dict file (the `maskgit-vqgan-imagenet-f16-256.bin` that TiTok's training uses), sizes
  read from its tensors;
- a folder holding that file under its released name and, for sizes other than the release's,
  `official_args.json`: {"config": the official model config (hidden_channels, channel_mult,
  num_resolutions, num_res_blocks, z_channels, resolution, ...), "num_embeddings": N}.
That layout names every weight as this module does, so the key mapping is the identity:

    official / ours                                   what
    encoder.conv_in.weight                            bias-free 3x3 conv from RGB
    encoder.down.{i}.block.{j}.{norm1,conv1,          residual blocks of level i (finest first);
        norm2,conv2,nin_shortcut}.*                   nin_shortcut where the width changes
    encoder.mid.{j}.*, encoder.norm_out.*             blocks and GroupNorm at the coarsest level
    encoder.conv_out.{weight,bias}                    1x1 conv to z_channels
    quantize.embedding.weight                         the codebook (codebook_size x z_channels)
    decoder.conv_in / mid.{j} / up.{i}.block.{j} /    the MaskGIT decoder (nn.cnn.ConvDecoder)
        up.{i}.upsample_conv / norm_out / conv_out

Without `official_args.json` the sizes are read from the tensors (`config_from_maskgit_state`), so
any model in that layout loads, and the strict load catches whatever the shapes did not describe.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from tokenizers_vis.models.base import Encoded, ModelOutput, Tokenizer, register_tokenizer
from tokenizers_vis.models.loading import load_tokenizer
from tokenizers_vis.models.official import OfficialFormat, find_official_format, register_official_format
from tokenizers_vis.nn.cnn import ConvDecoder, ConvEncoder
from tokenizers_vis.nn.quantizers import VectorQuantizer, squared_distances
from tokenizers_vis.nn.weights import read_state_file

# The resolution the official MaskGIT-VQGAN was trained at; its state dict does not record it.
MASKGIT_IMAGE_SIZE = 256
# The official model hard-codes GroupNorm with 32 groups; a state dict cannot tell the group count.
MASKGIT_NORM_GROUPS = 32


@register_tokenizer
class VQGAN(Tokenizer):
    """Conv encoder -> VQ (plain squared-distance lookup) -> conv decoder; ids on a square grid.

    image_size: the images it takes; the grid is image_size / 2**(len(channel_mult) - 1) per side.
    base_channels, channel_mult, num_res_blocks, norm_groups: both conv stacks (nn.cnn).
    z_channels: width of the latent grid and of the codes. codebook_size: number of codes.
    Ids are (B, grid * grid) in row-major grid order, latents (B, grid * grid, z_channels).
    """

    model_type = "vqgan"

    def __init__(
        self,
        image_size: int = MASKGIT_IMAGE_SIZE,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        codebook_size: int = 1024,
        norm_groups: int = MASKGIT_NORM_GROUPS,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
    ):
        super().__init__()
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise ValueError(f"image_size {image_size} must be divisible by the downsampling factor {factor} "
                             f"(2**(len(channel_mult) - 1))")
        self.image_size = image_size
        self.downsampling = factor
        self.grid_size = image_size // factor
        self.num_tokens = self.grid_size**2
        self.codebook_size = codebook_size
        conv = dict(base_channels=base_channels, channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
                    norm_groups=norm_groups)
        self.encoder = ConvEncoder(in_channels=3, z_channels=z_channels, **conv)
        self.quantize = VectorQuantizer(codebook_size, z_channels, commitment_weight=commitment_weight,
                                        codebook_weight=codebook_weight)
        self.decoder = ConvDecoder(z_channels=z_channels, out_channels=3, **conv)

    # -- Tokenizer API -------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> Encoded:
        self.check_images(images, self.downsampling)
        z = self.encoder(images)
        b, c, h, w = z.shape
        z = z.permute(0, 2, 3, 1).reshape(b, h * w, c)
        latents, ids, aux = self.quantize(z)
        return Encoded(ids=ids, latents=latents, extras={"pre_quant": z, "aux": aux, "grid": (h, w)})

    def decode(self, encoded: Encoded | torch.Tensor, **sampling) -> torch.Tensor:
        """Pixels on the [0, 1] scale (unclamped) from an `Encoded`, ids (B, K) or latents (B, K, C)."""
        if sampling:
            raise ValueError(f"VQGAN decoding is deterministic and takes no options, got {sorted(sampling)}")
        if isinstance(encoded, Encoded):
            latents = encoded.latents if encoded.latents is not None else self._embed_ids(encoded.ids)
        elif not encoded.is_floating_point():
            latents = self._embed_ids(encoded)
        else:
            latents = encoded
        b, k, c = latents.shape
        if k != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} latents ({self.grid_size}x{self.grid_size}), got {k}")
        grid = latents.reshape(b, self.grid_size, self.grid_size, c).permute(0, 3, 1, 2)
        return self.decoder(grid.to(self.decoder.conv_in.weight.dtype))

    def code_grid(self, images: torch.Tensor) -> torch.Tensor:
        """The codes of `images` as a (B, grid, grid) map: the targets of TiTok's proxy-code stage."""
        ids = self.encode(images).ids
        return ids.reshape(ids.shape[0], self.grid_size, self.grid_size)

    def soft_codes(self, images: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """(B, grid * grid, codebook_size): softmax over codes of -squared distance / temperature
        (the official VectorQuantizer's `get_soft_code`; argmax gives `encode(images).ids`)."""
        self.check_images(images, self.downsampling)
        z = self.encoder(images).float()
        b, c, h, w = z.shape
        z = z.permute(0, 2, 3, 1).reshape(b * h * w, c)
        distances = squared_distances(z, self.quantize.codebook())
        return torch.softmax(-distances / temperature, dim=1).reshape(b, h * w, -1)

    def _embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        self.check_ids(ids, self.num_tokens)
        return self.quantize.embed(ids)

    def forward(self, images: torch.Tensor) -> ModelOutput:
        encoded = self.encode(images)
        aux = encoded.extras["aux"]
        logs = {f"quantizer/{k}": v for k, v in aux.items() if k != "loss"}
        return ModelOutput(reconstruction=self.decode(encoded.latents), aux_loss=aux["loss"], logs=logs,
                           encoded=encoded)

    # -- training hooks ------------------------------------------------------------------------
    def last_layer_weight(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def no_weight_decay_names(self) -> set[str]:
        return {"quantize.embedding.weight"}


# -- the official MaskGIT-VQGAN layout -------------------------------------------------------------
def _count(state: Mapping[str, torch.Tensor], prefix: str, suffix: str) -> int:
    """How many consecutive indices i have a key f"{prefix}{i}{suffix}"."""
    n = 0
    while f"{prefix}{n}{suffix}" in state:
        n += 1
    return n


def config_from_maskgit_state(state: Mapping[str, torch.Tensor], image_size: int = MASKGIT_IMAGE_SIZE) -> dict:
    """Our `VQGAN` config for a state dict in the official MaskGIT-VQGAN layout, sizes read from its tensors."""
    needed = ("encoder.conv_in.weight", "encoder.conv_out.weight", "quantize.embedding.weight",
              "encoder.down.0.block.0.conv1.weight")
    absent = [key for key in needed if key not in state]
    if absent:
        raise ValueError(f"not a MaskGIT-VQGAN state dict: no {absent} (expected encoder.*, quantize.*, decoder.*)")
    base = state["encoder.conv_in.weight"].shape[0]
    levels = _count(state, "encoder.down.", ".block.0.conv1.weight")
    return {
        "model_type": VQGAN.model_type,
        "image_size": image_size,
        "base_channels": base,
        "channel_mult": [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // base for i in range(levels)],
        "num_res_blocks": _count(state, "encoder.down.0.block.", ".conv1.weight"),
        "z_channels": state["encoder.conv_out.weight"].shape[0],
        "codebook_size": state["quantize.embedding.weight"].shape[0],
        "norm_groups": MASKGIT_NORM_GROUPS,
    }


def vqgan_from_maskgit_state(state: Mapping[str, torch.Tensor], image_size: int = MASKGIT_IMAGE_SIZE) -> VQGAN:
    """Our VQGAN, in eval mode, holding an official-layout state dict (identity key mapping, strict)."""
    config = config_from_maskgit_state(state, image_size)
    config.pop("model_type")
    vqgan = VQGAN(**config)
    try:
        vqgan.load_state_dict(dict(state), strict=True)
    except RuntimeError as err:
        raise ValueError(f"MaskGIT-VQGAN weights do not match the model their shapes describe ({config}): "
                         f"{err}") from err
    return vqgan.eval()


def maskgit_state_dict(vqgan: VQGAN) -> dict[str, torch.Tensor]:
    """Our VQGAN's weights in the official MaskGIT-VQGAN layout (the same names; parameters only)."""
    return {name: param.detach().contiguous().cpu() for name, param in vqgan.named_parameters()}


def save_maskgit_vqgan(vqgan: VQGAN, path: str | os.PathLike) -> Path:
    """Write `vqgan` as one official-layout state-dict file: safetensors for a .safetensors name,
    else torch.save (the official .bin)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = maskgit_state_dict(vqgan)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


# The suffixes of a single state-dict file; Lightning checkpoints (.ckpt) are ours, not this layout.
MASKGIT_FILE_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
# The released file's name, which marks a folder in this layout, and the folder's optional sizes.
MASKGIT_RELEASED_NAME = "maskgit-vqgan-imagenet-f16-256.bin"
MASKGIT_ARGS_NAME = "official_args.json"
# Official config keys that change nothing here: dropout is off at inference, and the model is RGB.
_MASKGIT_FIXED = {"dropout": 0.0, "num_channels": 3}


def is_maskgit_vqgan_file(path: str | os.PathLike) -> bool:
    """True for a single state-dict file. Only the suffix is checked; `load_maskgit_vqgan` says
    clearly when the content is not that layout."""
    path = Path(path)
    return path.is_file() and path.suffix in MASKGIT_FILE_SUFFIXES


def is_maskgit_vqgan(path: str | os.PathLike) -> bool:
    """A state-dict file, or a folder holding the released file under its name."""
    path = Path(path)
    return is_maskgit_vqgan_file(path) or (path.is_dir() and (path / MASKGIT_RELEASED_NAME).is_file())


def config_from_maskgit_args(args: Mapping) -> dict:
    """Our `VQGAN` config for an `official_args.json`: {"config": official keys, "num_embeddings": N}."""
    config = args.get("config")
    if not isinstance(config, Mapping):
        raise ValueError(f"{MASKGIT_ARGS_NAME} needs a 'config' mapping (the official model config)")
    needed = ("hidden_channels", "channel_mult", "num_res_blocks", "z_channels", "resolution")
    absent = [key for key in needed if key not in config] + (["num_embeddings"] if "num_embeddings" not in args else [])
    if absent:
        raise ValueError(f"{MASKGIT_ARGS_NAME} lacks {absent}")
    mult = list(config["channel_mult"])
    if config.get("num_resolutions", len(mult)) != len(mult):
        raise ValueError(f"{MASKGIT_ARGS_NAME}: num_resolutions {config['num_resolutions']} is not "
                         f"len(channel_mult) = {len(mult)}")
    for key, value in _MASKGIT_FIXED.items():
        if config.get(key, value) != value:
            raise ValueError(f"{MASKGIT_ARGS_NAME}: {key}={config[key]} is not supported (only {value})")
    return {
        "image_size": int(config["resolution"]),
        "base_channels": int(config["hidden_channels"]),
        "channel_mult": mult,
        "num_res_blocks": int(config["num_res_blocks"]),
        "z_channels": int(config["z_channels"]),
        "codebook_size": int(args["num_embeddings"]),
        "norm_groups": MASKGIT_NORM_GROUPS,
    }


def load_maskgit_vqgan(path: str | os.PathLike, image_size: int | None = None) -> VQGAN:
    """Our VQGAN, in eval mode, from an official MaskGIT-VQGAN state-dict file (bare or under
    `state_dict` / `model`) or a folder in that layout (see the module docstring).

    image_size: the images to accept; default the folder's `official_args.json` resolution, else 256
    (the state dict does not record it). A value that contradicts `official_args.json` is an error."""
    path = Path(path)
    weights = path / MASKGIT_RELEASED_NAME if path.is_dir() else path
    state = read_state_file(weights, what="MaskGIT-VQGAN state dict")
    args_path = path / MASKGIT_ARGS_NAME
    if not path.is_dir() or not args_path.is_file():
        return vqgan_from_maskgit_state(state, image_size or MASKGIT_IMAGE_SIZE)
    config = config_from_maskgit_args(json.loads(args_path.read_text()))
    if image_size is not None and image_size != config["image_size"]:
        raise ValueError(f"{args_path} describes {config['image_size']} px images, not {image_size} px")
    vqgan = VQGAN(**config)
    try:
        vqgan.load_state_dict(dict(state), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not match the model {args_path} describes ({config}): {err}") from err
    return vqgan.eval()


MASKGIT_FORMAT = register_official_format(OfficialFormat(
    name="maskgit_vqgan", recognise=is_maskgit_vqgan, load=load_maskgit_vqgan, save=save_maskgit_vqgan,
))


def load_vqgan(source: str | os.PathLike, image_size: int | None = None) -> VQGAN:
    """A VQGAN in eval mode from any of the places a teacher may come from.

    source: a file or folder in the official MaskGIT-VQGAN layout (`MASKGIT_FILE_SUFFIXES`, or a folder
        holding `MASKGIT_RELEASED_NAME`), or one of our `.ckpt` checkpoints (EMA weights), saved
        folders or Hub ids (see `models.loading.load_tokenizer`).
    image_size: for official files, the image size to accept (default 256, the official one, or the
        folder's `official_args.json`); our formats record theirs, and a different value here is an error.
    """
    path = Path(source)
    if path.exists() and find_official_format(path) is MASKGIT_FORMAT:
        # The official state dict does not record the image size: it is an option of the converter.
        return MASKGIT_FORMAT.load(path, image_size=image_size)
    tokenizer = load_tokenizer(source)
    if not isinstance(tokenizer, VQGAN):
        raise ValueError(f"{source} holds a {tokenizer.model_type!r} tokenizer, not a VQGAN")
    if image_size is not None and image_size != tokenizer.image_size:
        raise ValueError(f"{source} is a VQGAN for {tokenizer.image_size} px images, not {image_size} px")
    return tokenizer

