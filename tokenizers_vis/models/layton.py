"""Layton (released as LaCTok): 256 discrete tokens decoded to 1024 px by a latent consistency
decoder built on SDXL.

Tokenizer half: a downsampled copy of the image (256 px for a 1024 px output) goes through the
LlamaGen / taming VQ-16 CNN encoder (`nn.cnn.VQGANEncoder`, or a ViT, the paper's alternative),
a 1x1 `quant_conv` to 8 dims and an l2-normalised VQ (16384 x 8): a 16 x 16 id grid.
Decoder half (diffusers + peft): the code map (the l2-normalised codebook rows, (B, 8, 16, 16))
is nearest-upsampled to the latent grid (128 x 128), embedded by stride-1 convs with SiLU and a
zero-initialised output conv (`TokenMapEmbedding`), and added to the input of a ControlNet copied
from the SDXL UNet (`ControlNetModel.from_unet`); the ControlNet's residuals, times `cond_scale`,
go into the UNet, which carries a LoRA (rank 64, peft) on the release's target modules. Every text
input is zero (77 x 2048 states, 1280 pooled) and the SDXL time ids are [S, S, 0, 0, S, S] with
S = image_size. The UNet predicts epsilon; the few-step consistency sampler of the shared
diffusion-decoder interface (x0 from eps, re-noise to the next timestep: 999 -> 499 -> 124) gives
the latents, which the SDXL VAE decodes.

API: `tok.encode(x)` with x in [0, 1] at `image_size` (resized to `tokenizer_input_size` inside) or
already at `tokenizer_input_size`; `Encoded.ids` is (B, h*w), the id grid flattened row-major
(`tok.id_grid(ids)` gives (B, h, w)). `tok.decode(ids, steps=3, cond_scale=0.8, noise=None,
generator=None)` -> (B, 3, image_size, image_size) in [0, 1]. `noise` is the list of every random
draw in order (the initial latent, then one per re-noise, including the release's discarded last
one), so a decode replays exactly; `len(noise) == tok.noise_draws(steps)`.

Random draws: with `generator`, every draw comes from it; without, from the global RNG. (The
release draws the initial latent from its generator on the CPU and the re-noises from the global
RNG of the model's device; pass its draws as `noise` to replay a release decode.)

Weights: the tokenizer half loads from a LlamaGen VQ-16 checkpoint in its own layout
(`tokenizer_weights`, as the release does; frozen unless `train_tokenizer`), the UNet and VAE from
a local folder or Hub id (`stabilityai/stable-diffusion-xl-base-1.0` for the real recipe) or, with
`pretrained: null`, from their config with random weights (tests). See `layton_official.py` for the
released LaCTok checkpoint.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.models.base import Encoded, ModelOutput, Tokenizer, _plain, register_tokenizer
from tokenizers_vis.nn.cnn import VQGANEncoder
from tokenizers_vis.nn.diffusion_decoder import ConditionAdapter, DiffusionDecoder
from tokenizers_vis.nn.pretrained import FrozenVAE, _from_pretrained
from tokenizers_vis.nn.quantizers import VectorQuantizer, float32, squared_distances
from tokenizers_vis.nn.transformer import PatchEmbed, Transformer, embedding_parameter, init_vit_weights
from tokenizers_vis.nn.weights import read_state_file

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
# The release's LoRA targets: a UNet module is wrapped when its path ends in one of these names.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
# The release's sampler: torch.linspace(999, 0, 9, dtype=int)[[0, 4, 7, 8]] = 999, 499, 124 (and a
# final re-noise to 0 whose draw is made and discarded).
RELEASE_TIMESTEPS = (999, 499, 124)
TEXT_TOKENS = 77  # zero text states, SDXL's sequence length
CODEBOOK_USED_SIZE = 65536  # the LlamaGen quantizer's usage log (a fixed size in the release)
# SDXL's noise schedule as the release builds it: DDIMScheduler from the SDXL scheduler config.
SDXL_SCHEDULER = {"name": "ddim", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                  "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"}
ENCODER_TYPES = ("cnn", "vit")


def consistency_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The model timesteps of a `steps`-call consistency decode: the release's 999, 499, 124 (its
    prefix for 1 or 2 calls); more calls: evenly spaced from the last training timestep."""
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
    release = torch.linspace(num_train_timesteps - 1, 0, 9).to(torch.int64)[[0, 4, 7]].tolist()
    if steps <= len(release):
        return release[:steps]
    return [num_train_timesteps - 1 - (i * num_train_timesteps) // steps for i in range(steps)]


class TokenMapEmbedding(nn.Module):
    """LaCTok's conditioning embedding: conv_in (cond_channels -> c0) + SiLU, then for each width
    step a pair of 3x3 convs (c_i -> c_i, c_i -> c_{i+1}) each + SiLU, then conv_out to the
    ControlNet width, zero-initialised so an untrained token branch adds nothing. Every conv is
    3x3, stride 1: the code map is already at the latent grid (diffusers' version downsamples)."""

    def __init__(self, cond_channels: int, channels: Sequence[int], out_channels: int):
        super().__init__()
        channels = list(channels)
        self.conv_in = nn.Conv2d(cond_channels, channels[0], 3, padding=1)
        blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            blocks += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.Conv2d(c_in, c_out, 3, padding=1)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, code_map: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(code_map))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class ViTTokenEncoder(nn.Module):
    """The paper's alternative encoder: patch embedding, learned positions, a pre-norm transformer,
    LayerNorm and a linear map to z_channels, returned as a (B, z_channels, g, g) map."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int, z_channels: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"tokenizer_input_size {image_size} is not divisible by the ViT patch {patch_size}")
        self.grid = image_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, 3, width)
        self.pos_embed = embedding_parameter(1, self.grid * self.grid, width, width=width)
        self.transformer = Transformer(width, depth, heads)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, z_channels)
        init_vit_weights(self.transformer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x) + self.pos_embed.to(x.dtype)
        out = self.proj(self.norm(self.transformer(tokens)))
        b, n, c = out.shape
        grid = int(round(n**0.5))
        return out.transpose(1, 2).reshape(b, c, grid, grid)


class UnusedConv(nn.Module):
    """The release's `post_quant_conv`: in its checkpoint, used by no code path. Held as buffers
    (never trained) so a released file loads strictly and is written back unchanged."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_channels, in_channels, 1, 1))
        self.register_buffer("bias", torch.zeros(out_channels))


class LaytonDenoiser(nn.Module):
    """SDXL UNet (+ LoRA) with the token ControlNet: `forward(x_t, timesteps, code_map, cond_scale)`
    predicts epsilon. The code map is resized (nearest) to the latent grid fixed at build time."""

    def __init__(self, unet: nn.Module, controlnet: nn.Module, latent_size: int, image_size: int):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.latent_size = latent_size
        self.image_size = image_size
        config = unet.config
        self.cross_attention_dim = int(config.cross_attention_dim)
        # The pooled-text width: SDXL's add_embedding input is 1280 pooled + 6 time-id embeddings.
        self.pooled_dim = int(config.projection_class_embeddings_input_dim) - 6 * int(config.addition_time_embed_dim)

    def conditioning_image(self, code_map: torch.Tensor) -> torch.Tensor:
        """The ControlNet's conditioning input: the code map upsampled (nearest) to the latent grid."""
        return F.interpolate(code_map, size=(self.latent_size, self.latent_size), mode="nearest")

    def text_inputs(self, batch: int, like: torch.Tensor) -> dict[str, Any]:
        """Zero text states and pooled embedding, and the SDXL time ids [S, S, 0, 0, S, S]."""
        s = float(self.image_size)
        time_ids = torch.tensor([s, s, 0.0, 0.0, s, s], device=like.device, dtype=like.dtype).expand(batch, 6)
        return {"encoder_hidden_states": like.new_zeros(batch, TEXT_TOKENS, self.cross_attention_dim),
                "added_cond_kwargs": {"text_embeds": like.new_zeros(batch, self.pooled_dim), "time_ids": time_ids}}

    def residuals(self, x_t: torch.Tensor, timesteps: torch.Tensor, code_map: torch.Tensor, cond_scale: float = 1.0):
        """(down residuals, mid residual) of the ControlNet, already times `cond_scale`."""
        text = self.text_inputs(x_t.shape[0], x_t)
        cond = self.conditioning_image(code_map).to(x_t.dtype)
        down, mid = self.controlnet(x_t, timesteps, controlnet_cond=cond, conditioning_scale=cond_scale,
                                    return_dict=False, **text)
        return down, mid

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, code_map: torch.Tensor,
                cond_scale: float = 1.0) -> torch.Tensor:
        down, mid = self.residuals(x_t, timesteps, code_map, cond_scale)
        text = self.text_inputs(x_t.shape[0], x_t)
        return self.unet(x_t, timesteps, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         return_dict=False, **text)[0]


class TokenMapCondition(ConditionAdapter):
    """Condition {"code_map": (B, C, h, w), "cond_scale": float} -> the denoiser's keyword arguments;
    the unconditional branch switches the ControlNet off (cond_scale 0)."""

    def __init__(self):
        super().__init__(key="code_map")

    def __call__(self, condition) -> dict[str, Any]:
        return {"code_map": condition["code_map"], "cond_scale": condition.get("cond_scale", 1.0)}

    def unconditional(self, condition) -> dict[str, Any]:
        return {"code_map": condition["code_map"], "cond_scale": 0.0}


def build_unet(spec: Mapping[str, Any] | None) -> nn.Module:
    """A diffusers UNet2DConditionModel: `pretrained` (folder or Hub id, `subfolder` inside) or, with
    pretrained null, from `config` with random weights."""
    from diffusers import UNet2DConditionModel

    spec = dict(spec or {})
    if spec.get("pretrained"):
        kwargs = {"subfolder": spec["subfolder"]} if spec.get("subfolder") else {}
        return _from_pretrained(UNet2DConditionModel, spec["pretrained"], "model.tokenizer.unet.pretrained", **kwargs)
    if spec.get("config") is None:
        raise ValueError("model.tokenizer.unet needs `pretrained` (a folder or Hub id) or `config` "
                         "(UNet2DConditionModel arguments)")
    return UNet2DConditionModel.from_config(dict(spec["config"]))


def unet_rebuild_arguments(unet: nn.Module) -> dict[str, Any]:
    """The UNet's architecture without its source: what a saved Layton records (its weights travel
    in the tokenizer's state_dict)."""
    accepted = inspect.signature(type(unet).__init__).parameters
    config = {k: _plain(v) for k, v in unet.config.items() if k in accepted and not k.startswith("_")}
    return {"pretrained": None, "subfolder": None, "config": config}


def add_lora(unet: nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> nn.Module:
    """Wrap the UNet modules whose path ends in one of `targets` with a peft LoRA (adapter "default",
    scale alpha / rank, B zero-initialised: the wrapped UNet starts equal to the base). peft leaves
    only the adapter weights trainable: the UNet base is frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    return inject_adapter_in_model(config, unet)


@register_tokenizer
class Layton(Tokenizer):
    """Layton / LaCTok tokenizer.

    image_size: the output side (1024), also the side of the images `encode` / `forward` take.
    tokenizer_input_size: the side the encoder sees (256); images are resized to it (bicubic,
        antialiased) unless given at that size.
    encoder_type: "cnn" (LlamaGen VQ-16: encoder_channels, encoder_channel_mult, encoder_num_res_blocks,
        z_channels, encoder_norm_groups) or "vit" (vit_patch_size, vit_width, vit_depth, vit_heads).
    codebook_size / codebook_dim / commitment_weight / codebook_weight: the l2-normalised VQ.
    dead_code_threshold: restart codes used less than this per batch (`VectorQuantizer`; 0: off, as
        the release). A jointly trained tokenizer needs it: while the zero-initialised token branch
        still passes no gradient back, the commitment loss alone collapses the codes.
    tokenizer_weights: a LlamaGen VQ-16 checkpoint (its own layout: encoder.*, quant_conv.*,
        quantize.*, post_quant_conv.*; its decoder.* is not used) to load the tokenizer half from.
    train_tokenizer: train the encoder, quant_conv and codebook jointly; False (the release)
        freezes them.
    unet: {pretrained, subfolder, config} of the SDXL UNet2DConditionModel.
    cond_embedding_widths: widths of the conditioning embedding (LaCTok: 8, 32, 96, 256).
    lora_rank / lora_alpha / lora_targets: the UNet LoRA (0 = none); scale alpha / rank.
    train_unet: train the UNet base too. The release keeps SDXL frozen and trains the LoRA; a small
        random UNet (CPU demos) has nothing worth freezing.
    vae: `FrozenVAE` arguments {pretrained, subfolder, config, scaling_factor}.
    pixel_space: no VAE: the UNet denoises [-1, 1] pixels at image_size (its in/out channels 3);
        small CPU demos, where a random frozen VAE would cap what the decoder can reconstruct.
    scheduler: the noise schedule (`nn.diffusion_decoder.build_scheduler` config; SDXL's DDIM).
    cond_scale / sampling_steps: decode defaults (the release: 0.8, 3 calls).
    """

    model_type = "layton"

    def __init__(
        self,
        image_size: int = 1024,
        tokenizer_input_size: int = 256,
        encoder_type: str = "cnn",
        encoder_channels: int = 128,
        encoder_channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
        encoder_num_res_blocks: int = 2,
        z_channels: int = 256,
        encoder_norm_groups: int = 32,
        vit_patch_size: int = 16,
        vit_width: int = 768,
        vit_depth: int = 12,
        vit_heads: int = 12,
        codebook_size: int = 16384,
        codebook_dim: int = 8,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        dead_code_threshold: float = 0.0,
        tokenizer_weights: str | None = None,
        train_tokenizer: bool = False,
        unet: Mapping[str, Any] | None = None,
        cond_embedding_widths: Sequence[int] = (8, 32, 96, 256),
        lora_rank: int = 64,
        lora_alpha: float = 8.0,
        lora_targets: Sequence[str] = LORA_TARGETS,
        train_unet: bool = False,
        vae: Mapping[str, Any] | None = None,
        pixel_space: bool = False,
        scheduler: Mapping[str, Any] | None = None,
        cond_scale: float = 0.8,
        sampling_steps: int = 3,
    ):
        super().__init__()
        if encoder_type not in ENCODER_TYPES:
            raise ValueError(f"encoder_type must be one of {ENCODER_TYPES}, got {encoder_type!r}")
        self.image_size = image_size
        self.tokenizer_input_size = tokenizer_input_size
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.cond_scale = cond_scale
        self.sampling_steps = sampling_steps
        self.train_tokenizer = train_tokenizer
        self.lora_rank = lora_rank

        # -- tokenizer half --
        if encoder_type == "cnn":
            self.encoder = VQGANEncoder(ch=encoder_channels, ch_mult=tuple(encoder_channel_mult),
                                        num_res_blocks=encoder_num_res_blocks, z_channels=z_channels,
                                        norm_groups=encoder_norm_groups)
            self.downsample = 2 ** (len(encoder_channel_mult) - 1)
        else:
            self.encoder = ViTTokenEncoder(tokenizer_input_size, vit_patch_size, vit_width, vit_depth, vit_heads,
                                           z_channels)
            self.downsample = vit_patch_size
        if tokenizer_input_size % self.downsample:
            raise ValueError(f"tokenizer_input_size {tokenizer_input_size} is not divisible by the encoder's "
                             f"downsampling {self.downsample}")
        self.grid = tokenizer_input_size // self.downsample
        self.num_tokens = self.grid * self.grid
        self.quant_conv = nn.Conv2d(z_channels, codebook_dim, 1)
        self.quantize = VectorQuantizer(codebook_size, codebook_dim, use_l2_norm=True,
                                        commitment_weight=commitment_weight, codebook_weight=codebook_weight,
                                        dead_code_threshold=dead_code_threshold)
        # The release's usage log: kept (not updated) so its checkpoints load and save back unchanged.
        self.quantize.register_buffer("codebook_used", torch.zeros(CODEBOOK_USED_SIZE))
        self.post_quant_conv = UnusedConv(codebook_dim, z_channels)
        if tokenizer_weights:
            self.load_tokenizer_weights(tokenizer_weights)

        # -- decoder half --
        self.pixel_space = pixel_space
        vae_module = None if pixel_space else FrozenVAE(**dict(vae or {"pretrained": SDXL, "subfolder": "vae"}))
        factor = 1 if vae_module is None else vae_module.downsample
        if image_size % factor:
            raise ValueError(f"image_size {image_size} is not divisible by the VAE factor {factor}")
        self.latent_size = image_size // factor
        unet_module = build_unet(unet or {"pretrained": SDXL, "subfolder": "unet"})
        self.latent_channels = int(unet_module.config.in_channels)
        expected = 3 if vae_module is None else vae_module.latent_channels
        if self.latent_channels != expected or int(unet_module.config.out_channels) != expected:
            raise ValueError(f"the UNet's in/out channels must be {expected} ("
                             f"{'pixels' if vae_module is None else 'the VAE latents'}), got "
                             f"{unet_module.config.in_channels}/{unet_module.config.out_channels}")
        from diffusers import ControlNetModel

        controlnet = ControlNetModel.from_unet(unet_module, conditioning_embedding_out_channels=tuple(
            cond_embedding_widths), conditioning_channels=codebook_dim)
        controlnet.controlnet_cond_embedding = TokenMapEmbedding(
            codebook_dim, cond_embedding_widths, int(controlnet.config.block_out_channels[0]))
        if lora_rank > 0:
            unet_module = add_lora(unet_module, lora_rank, lora_alpha, lora_targets)
        unet_module.requires_grad_(False)
        for name, param in unet_module.named_parameters():
            param.requires_grad_(train_unet or ".lora_" in name)
        self.decoder = DiffusionDecoder(LaytonDenoiser(unet_module, controlnet, self.latent_size, image_size),
                                        dict(scheduler or SDXL_SCHEDULER), condition=TokenMapCondition(),
                                        vae=vae_module)
        if self.decoder.prediction_type != "epsilon":
            raise ValueError(f"Layton's UNet predicts epsilon; the scheduler says {self.decoder.prediction_type!r}")
        if not train_tokenizer:
            self.freeze_parts(["encoder", "quant_conv", "quantize"])

    # -- parts -------------------------------------------------------------------------------------
    @property
    def unet(self) -> nn.Module:
        return self.decoder.denoiser.unet

    @property
    def controlnet(self) -> nn.Module:
        return self.decoder.denoiser.controlnet

    @property
    def vae(self) -> FrozenVAE | None:
        return self.decoder.vae

    def load_tokenizer_weights(self, path: str) -> None:
        """Load the tokenizer half from a LlamaGen VQ-16 checkpoint (state dict bare or under
        `model` / `state_dict` / `ema`), strictly on encoder, quant_conv, quantize (+ its usage log
        when present) and post_quant_conv; the checkpoint's pixel decoder is not used."""
        state = read_state_file(path, wrappers=("model", "state_dict", "ema"), what="LlamaGen VQ state dict")
        parts = ("encoder.", "quant_conv.", "quantize.", "post_quant_conv.")
        ours = {k: v for k, v in state.items() if k.startswith(parts)}
        if "quantize.codebook_used" not in ours:
            ours["quantize.codebook_used"] = self.quantize.codebook_used
        module = nn.ModuleDict({"encoder": self.encoder, "quant_conv": self.quant_conv, "quantize": self.quantize,
                                "post_quant_conv": self.post_quant_conv})
        try:
            module.load_state_dict(ours, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path} is not a LlamaGen VQ checkpoint of this encoder "
                             f"(model.tokenizer.tokenizer_weights): {err}") from err

    # -- tokenizer half ----------------------------------------------------------------------------
    def tokenizer_input(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images at image_size or tokenizer_input_size -> the encoder's input in [-1, 1]."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images of shape (B, 3, H, W) in [0, 1], got {shape}")
        side = images.shape[-1]
        sizes = {self.image_size, self.tokenizer_input_size}
        if images.shape[-2] != side or side not in sizes:
            raise ValueError(f"this layton tokenizer takes {self.image_size} px images (or {self.tokenizer_input_size} "
                             f"px, the encoder's input), got {tuple(images.shape[-2:])}")
        x = images
        if side != self.tokenizer_input_size:
            size = (self.tokenizer_input_size, self.tokenizer_input_size)
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return x * 2 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, codebook_dim, g, g): the quantizer input (before l2 normalisation). Computed in float32
        under autocast too: the tokenizer half is small next to the decoder, and bf16 features flip
        ids near a tie (a frozen tokenizer must give the ids it gives in float32)."""
        with float32():
            return self.quant_conv(self.encoder(self.tokenizer_input(images).float()))

    def codebook_distances(self, z: torch.Tensor) -> torch.Tensor:
        """(B*g*g, K) squared distances of the normalised features (rows b, y, x) to the normalised codes."""
        with float32():
            flat = F.normalize(z.float().permute(0, 2, 3, 1).reshape(-1, self.codebook_dim), dim=-1)
            return squared_distances(flat, self.quantize.codebook())

    def encode(self, images: torch.Tensor) -> Encoded:
        z = self.features(images)
        quantized, ids, aux = self.quantize(z.permute(0, 2, 3, 1))  # channels last; ids (B, g, g)
        return Encoded(ids=ids.flatten(1), latents=quantized.flatten(1, 2),
                       extras={"aux": aux, "grid": (self.grid, self.grid)})

    def id_grid(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, g*g) ids -> (B, g, g), row-major."""
        return ids.reshape(ids.shape[0], self.grid, self.grid)

    def code_map(self, encoded: Encoded | torch.Tensor) -> torch.Tensor:
        """(B, codebook_dim, g, g): the l2-normalised codebook rows of ids ((B, g*g) or (B, g, g)), or
        the quantized latents of an Encoded (straight-through in training)."""
        if isinstance(encoded, Encoded):
            if encoded.latents is not None:
                latents = encoded.latents
                return latents.transpose(1, 2).reshape(latents.shape[0], self.codebook_dim, self.grid, self.grid)
            encoded = encoded.ids
        ids = encoded
        if ids.dim() == 3:
            ids = ids.flatten(1)
        self.check_ids(ids, self.num_tokens)
        rows = self.quantize.embed(ids.long())  # (B, g*g, dim), normalised
        return rows.transpose(1, 2).reshape(ids.shape[0], self.codebook_dim, self.grid, self.grid)

    # -- decoder half ------------------------------------------------------------------------------
    def condition(self, code_map: torch.Tensor, cond_scale: float | None = None) -> dict[str, Any]:
        return {"code_map": code_map, "cond_scale": self.cond_scale if cond_scale is None else cond_scale}

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.latent_channels, self.latent_size, self.latent_size)

    def sampling_timesteps(self, steps: int | None = None) -> list[int]:
        return consistency_timesteps(steps or self.sampling_steps, self.decoder.num_train_timesteps)

    def noise_draws(self, steps: int | None = None, timesteps: Sequence[int] | None = None) -> int:
        """Length of a full `noise` list: the initial latent and one draw per re-noise (the release
        also draws one after the last call)."""
        times = list(timesteps) if timesteps is not None else self.sampling_timesteps(steps)
        return self.decoder.noise_draws(len(times), "consistency", timesteps=times, draw_final_noise=True)

    def sample_latents(self, code_map: torch.Tensor, steps: int | None = None, cond_scale: float | None = None,
                       noise=None, generator: torch.Generator | None = None,
                       timesteps: Sequence[int] | None = None, grad_steps: int | None = None) -> torch.Tensor:
        """The consistency sampler's final x0 (scaled VAE latents). `grad_steps`: only the last
        `grad_steps` model calls record gradients (stage 2's stop-gradient through the first);
        None records all (autograd permitting)."""
        times = list(timesteps) if timesteps is not None else self.sampling_timesteps(steps)
        condition = self.condition(code_map, cond_scale)
        shape = self.latent_shape(code_map.shape[0])
        options = dict(sampler="consistency", shape=shape, draw_final_noise=True)
        if grad_steps is None or grad_steps >= len(times):
            return self.decoder.sample(condition, len(times), noise=noise, generator=generator, timesteps=times,
                                       **options)
        if grad_steps < 1:
            raise ValueError(f"grad_steps must be >= 1, got {grad_steps}")
        # The first calls without gradients, then the rest from their re-noised x0: the same values
        # as one run over all timesteps, with the same draws in the same order (drawn up front).
        total = self.noise_draws(timesteps=times)
        if isinstance(noise, (list, tuple)):
            if len(noise) != total:
                raise ValueError(f"this run uses {total} noise draws (initial latent first), got {len(noise)}")
            draws = list(noise)
        else:
            first = noise if noise is not None else _draw(shape, code_map, generator)
            draws = [first] + [_draw(shape, code_map, generator) for _ in range(total - 1)]
        split = len(times) - grad_steps
        with torch.no_grad():
            x0 = self.decoder.sample(condition, split, noise=draws[:split], timesteps=times[:split],
                                     sampler="consistency")
        t_next = torch.full((x0.shape[0],), times[split], device=x0.device, dtype=torch.long)
        x_t = self.decoder.add_noise(x0, draws[split].to(x0), t_next)
        return self.decoder.sample(condition, grad_steps, noise=[x_t, *draws[split + 1:]], timesteps=times[split:],
                                   **options)

    def latents_to_pixels(self, latents: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """Scaled latents -> [0, 1] images through the VAE decoder (clipped like the release, or raw)."""
        x = self.decoder.decode_latents(latents)
        if clip:
            x = x.clamp(-1, 1)
        return (x + 1) / 2

    @torch.no_grad()
    def target_latents(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled VAE latents (pixel space: [-1, 1] pixels) of [0, 1] images at image_size (posterior
        mean, or a sample with `noise`)."""
        return self.decoder.encode_images(images * 2 - 1, noise)

    def decode(self, encoded: Encoded | torch.Tensor, steps: int | None = None, cond_scale: float | None = None,
               noise=None, generator: torch.Generator | None = None,
               timesteps: Sequence[int] | None = None) -> torch.Tensor:
        """(B, 3, image_size, image_size) in [0, 1] from ids ((B, g*g) or (B, g, g)) or an Encoded (see the
        module docstring for `noise`); steps / cond_scale default to the config's (3, 0.8)."""
        code_map = self.code_map(encoded)
        latents = self.sample_latents(code_map, steps, cond_scale, noise, generator, timesteps)
        return self.latents_to_pixels(latents, clip=True)

    def forward(self, images: torch.Tensor) -> ModelOutput:
        """encode + a default decode, reconstruction unclipped (objectives call the parts themselves)."""
        encoded = self.encode(images)
        latents = self.sample_latents(self.code_map(encoded))
        reconstruction = self.latents_to_pixels(latents, clip=False)
        return ModelOutput(reconstruction=reconstruction, aux_loss=self.quantizer_loss(encoded),
                           logs=self.quantizer_logs(encoded), encoded=encoded)

    def quantizer_loss(self, encoded: Encoded) -> torch.Tensor:
        """The VQ loss when the tokenizer trains; zero when it is frozen."""
        aux = encoded.extras["aux"]
        return aux["loss"] if self.train_tokenizer else aux["loss"].detach() * 0

    def quantizer_logs(self, encoded: Encoded) -> dict[str, torch.Tensor]:
        return {f"quantizer/{k}": v.detach() for k, v in encoded.extras["aux"].items() if k != "loss"}

    # -- training hooks ----------------------------------------------------------------------------
    def no_weight_decay_names(self) -> set[str]:
        return {"quantize.embedding.weight", "encoder.pos_embed"}

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in backward: UNet, ControlNet and the VAE decoder (diffusers' own
        checkpointing; stage 2 backpropagates through the frozen VAE decoder), and a ViT encoder."""
        for module in (self.unet, self.controlnet) + (() if self.vae is None else (self.vae.model,)):
            if enabled:
                module.enable_gradient_checkpointing()
            else:
                module.disable_gradient_checkpointing()
        if isinstance(self.encoder, ViTTokenEncoder):
            self.encoder.transformer.gradient_checkpointing = enabled

    @property
    def config(self) -> dict[str, Any]:
        """The architecture config with the UNet and VAE recorded by architecture and no tokenizer
        checkpoint: a saved Layton rebuilds offline, its weights travel in the state_dict."""
        config = super().config
        config["unet"] = unet_rebuild_arguments(self.unet)
        config["vae"] = None if self.vae is None else _plain(self.vae.rebuild_arguments())
        config["tokenizer_weights"] = None
        return config


def _draw(shape: Sequence[int], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A standard normal draw of `shape` on `like`'s device: from `generator` (on its device), else the
    global RNG, as the shared sampler draws."""
    if generator is None:
        return torch.randn(tuple(shape), device=like.device, dtype=like.dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=like.dtype).to(like.device)
