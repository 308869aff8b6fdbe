"""Our Layton against the official LaCTok: shared/reference/layton (random weights, official outputs
of every step), the full-size key list, and fresh official-layout LaCToks of other sizes written by
an independent generator (peft's own LoraModel naming, a hand-merged LoRA and a hand-written
sampler as the reference computation).

Tolerances are the fixture README's: ids and timesteps exact, x_t / x0 / latents atol 5e-4, every
other float output atol 1e-4.
"""

import functools
import json
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import reference_path
from safetensors.torch import load_file
from torch import nn

from tokenizers_vis import load_tokenizer
from tokenizers_vis.models.layton import Layton, consistency_timesteps
from tokenizers_vis.models.layton_official import (
    ARGS_FIELDS,
    ARGS_NAME,
    RELEASED_ARGS,
    WEIGHTS_NAME,
    layton_config,
    official_state_dict,
    released_folder,
    save_official_layton,
)
from tokenizers_vis.models.official import find_official_format, find_preset
from tokenizers_vis.nn.cnn import VQGANEncoder

CHAIN_ATOL, ATOL = 5e-4, 1e-4
RUNS = {"decode": 0.8, "decode_random_ids": 1.0}  # cond_scale of each fixture run


@pytest.fixture(scope="module")
def fixture_dir():
    from helpers import SHARED  # module scope: the function-scoped shared_dir fixture is not usable here

    return reference_path(SHARED, "layton", "tiny.safetensors").parent


@functools.cache
def _fixture(fixture_dir: Path):
    """(official-layout folder, official state, io tensors, fixture json, our loaded model)."""
    tensors = load_file(str(fixture_dir / "tiny.safetensors"))
    state = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    io = {k[len("io."):]: v for k, v in tensors.items() if k.startswith("io.")}
    meta = json.loads((fixture_dir / "tiny.json").read_text())
    folder = Path(tempfile.mkdtemp(prefix="lactok_tiny_"))
    (folder / ARGS_NAME).write_text(json.dumps({k: meta[k] for k in ARGS_FIELDS}))
    torch.save({"model": state}, folder / WEIGHTS_NAME)  # the official loader reads "model" (else "state_dict")
    return folder, state, io, meta, load_tokenizer(folder)


@pytest.fixture(scope="module")
def fixture(fixture_dir):
    return _fixture(fixture_dir)


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def _images01(io):
    return (io["image"] + 1) / 2  # the fixture feeds [-1, 1]; our API takes [0, 1]


# -- loading -------------------------------------------------------------------------------------------
def test_load_tokenizer_recognises_the_folder_and_loads_strictly(fixture, tmp_path):
    folder, state, _, meta, tok = fixture
    assert find_official_format(folder).name == "layton"  # and no other format claims it
    assert isinstance(tok, Layton) and not tok.training
    assert tok.num_tokens == 16 and tok.latent_size == 8 and tok.image_size == meta["image_size_sd"]
    wrapped = {name[: -len(".lora_A.default.weight")] for name in state if name.endswith(".lora_A.default.weight")}
    assert sorted(n[len("decoder.unet.base_model.model."):] for n in wrapped) == sorted(meta["lora"]["wrapped_modules"])
    back = official_state_dict(tok)
    assert sorted(back) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name
    # Saving writes a folder the official loader reads ("model" key), bit for bit, that loads again.
    out = save_official_layton(tok, tmp_path / "saved", {k: meta[k] for k in ARGS_FIELDS})
    written = torch.load(out / WEIGHTS_NAME, map_location="cpu", weights_only=True)["model"]
    assert sorted(written) == sorted(state)
    assert all(torch.equal(written[k], state[k]) for k in state)
    # The checkpoint under "state_dict" (the official loader's other key) loads the same way.
    torch.save({"state_dict": state}, out / WEIGHTS_NAME)
    again = load_tokenizer(out)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), tok.state_dict().values()))


def test_a_wrong_checkpoint_fails_the_strict_load(fixture, tmp_path):
    folder, state, _, meta, _ = fixture
    (tmp_path / ARGS_NAME).write_text((folder / ARGS_NAME).read_text())
    torch.save({"model": {k: v for k, v in state.items() if k != "quantize.codebook_used"}}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="quantize.codebook_used"):
        load_tokenizer(tmp_path)
    (tmp_path / ARGS_NAME).write_text(json.dumps({"vq_model_args": {}}))
    with pytest.raises(ValueError, match="lacks the fields"):
        load_tokenizer(tmp_path)


def test_the_release_preset_names_the_lactok_file_and_says_how_to_get_it_offline(tmp_path):
    for name in ("lactok", "LaCTok-T", "OPPOer/LaCTok", "OPPOer/LaCTok/LaCTok-T.pth"):
        fmt, _ = find_preset(name)
        assert fmt.name == "layton"
    with pytest.raises(OSError, match="hf download OPPOer/LaCTok LaCTok-T.pth"):
        released_folder(tmp_path)  # HF_HUB_OFFLINE in tests


@pytest.mark.slow
def test_the_full_size_release_has_the_official_keys_and_shapes(fixture_dir):
    """Built on the meta device from the released sizes: exactly the 4498 entries (names and shapes)
    of the official full-size state dict, 4,128,378,307 numbers, 16 x 16 ids, 128 x 128 latents."""
    listing = json.loads((fixture_dir / "full_size_keys.json").read_text())
    with torch.device("meta"):
        tok = Layton(**layton_config(RELEASED_ARGS))
    ours = {name: list(t.shape) for name, t in official_state_dict(tok).items()}
    assert ours == {name: shape for name, shape, _ in listing["entries"]}
    assert sum(t.numel() for t in tok.state_dict().values()) == listing["totals"]["elements"]
    assert (tok.num_tokens, tok.latent_size) == (256, 128)


# -- encode ------------------------------------------------------------------------------------------
@torch.no_grad()
def test_encode_matches_ids_distances_and_quantized_map(fixture):
    _, _, io, _, tok = fixture
    images = _images01(io)
    assert _max_diff(tok.encoder(tok.tokenizer_input(images)), io["encode.encoder_out"]) < ATOL
    z = tok.features(images)
    assert _max_diff(z, io["encode.z"]) < ATOL
    assert _max_diff(tok.codebook_distances(z), io["encode.codebook_distances"]) < ATOL
    encoded = tok.encode(images)
    assert encoded.ids.shape == (2, 16)
    assert torch.equal(tok.id_grid(encoded.ids), io["encode.ids"])
    assert _max_diff(tok.code_map(encoded), io["encode.quant"]) < ATOL
    assert _max_diff(tok.code_map(io["encode.ids"]), io["decode.quant"]) < ATOL
    assert _max_diff(tok.code_map(io["random_ids"]), io["decode_random_ids.quant"]) < ATOL


# -- one UNet call -------------------------------------------------------------------------------------
@torch.no_grad()
def test_one_unet_call_matches_embedding_residuals_and_noise_prediction(fixture):
    _, _, io, _, tok = fixture
    denoiser = tok.decoder.denoiser
    code_map, x_t = io["decode.quant"], io["unet_call.sample"]
    t = io["unet_call.timestep"].expand(2)
    cond = denoiser.conditioning_image(code_map)
    assert _max_diff(cond, io["unet_call.controlnet_cond"]) < ATOL
    assert _max_diff(denoiser.controlnet.controlnet_cond_embedding(cond), io["unet_call.cond_embedding"]) < ATOL
    assert torch.equal(denoiser.text_inputs(2, x_t)["added_cond_kwargs"]["time_ids"], io["unet_call.time_ids"])
    down, mid = denoiser.residuals(x_t, t, code_map, cond_scale=0.8)
    assert len(down) == 4
    for i, residual in enumerate(down):
        assert _max_diff(residual, io[f"unet_call.down_residual.{i}"]) < ATOL, i
    assert _max_diff(mid, io["unet_call.mid_residual"]) < ATOL
    assert _max_diff(denoiser(x_t, t, code_map, cond_scale=0.8), io["unet_call.noise_pred"]) < ATOL


# -- the sampler, every step ---------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("run", sorted(RUNS))
def test_every_sampler_step_and_the_latents_with_the_saved_noise(fixture, run):
    _, _, io, _, tok = fixture
    assert torch.equal(tok.decoder.scheduler.alphas_cumprod, io["schedule.alphas_cumprod"])
    assert tok.sampling_timesteps(3) == io[f"{run}.model_timesteps"].tolist() == [999, 499, 124]
    noise = [io[f"{run}.noise.{i}"] for i in range(4)]
    assert tok.noise_draws(3) == len(noise)
    calls = []
    hook = tok.decoder.denoiser.register_forward_hook(lambda m, args, kwargs, out: calls.append((args, out)),
                                                      with_kwargs=True)
    try:
        ids = io["encode.ids"] if run == "decode" else io["random_ids"]
        latents = tok.sample_latents(tok.code_map(ids), cond_scale=RUNS[run], noise=noise)
    finally:
        hook.remove()
    assert len(calls) == 3
    for k, ((x_t, t), eps) in enumerate(calls):
        assert t.tolist() == [io[f"{run}.model_timesteps"][k].item()] * 2
        assert _max_diff(x_t, io[f"{run}.step{k}.x_t"]) < CHAIN_ATOL, k
        assert _max_diff(eps, io[f"{run}.step{k}.eps"]) < ATOL, k
        assert _max_diff(tok.decoder.predict_x0(eps, x_t, t), io[f"{run}.step{k}.x0"]) < CHAIN_ATOL, k
    assert _max_diff(latents, io[f"{run}.latents"]) < CHAIN_ATOL


@torch.no_grad()
def test_decode_gives_the_official_image_and_the_release_seeding_replays(fixture):
    _, _, io, meta, tok = fixture
    assert _max_diff(tok.vae.decode(io["decode.latents"]), io["decode.vae_decoded_unclipped"]) < ATOL
    # The release's draws: noise 0 from the decode generator (CPU), the re-noises from the global RNG.
    generator = torch.Generator().manual_seed(meta["seeds"]["decode_generator"])
    first = torch.randn(2, 4, 8, 8, generator=generator)
    torch.manual_seed(meta["seeds"]["decode_global"])
    noise = [first] + [torch.randn(2, 4, 8, 8) for _ in range(3)]
    for i, draw in enumerate(noise):
        assert torch.equal(draw, io[f"decode.noise.{i}"]), i
    image = tok.decode(io["encode.ids"], steps=3, cond_scale=0.8, noise=noise)
    assert image.shape == (2, 3, 64, 64) and 0 <= image.min() and image.max() <= 1
    assert _max_diff(image * 2 - 1, io["decode.image"]) < ATOL


# -- fresh official-layout LaCToks of other sizes --------------------------------------------------------
CASES = {
    # 8x-down VQ (ch_mult [1, 1, 2, 2]), 32 px in -> 4 x 4 ids, 64 px out (VAE x8, 8 x 8 latents: nearest
    # 2x), codebook 32 x 8, LoRA rank 2 (scale 4), two-step conditioning embedding, narrow cross-attention.
    "rank2_x8": dict(ch_mult=[1, 1, 2, 2], input_size=32, image_size=64, codebook=(32, 8), rank=2, alpha=8,
                     cond_channels=[8, 12, 16], unet_channels=[8, 16], heads=[2, 4], cross=32, time_dim=4,
                     vae_channels=[8, 8, 8, 8]),
    # 4x-down VQ (ch_mult [1, 2, 2]), 16 px in -> 4 x 4 ids, 48 px out (VAE x4, 12 x 12 latents: nearest
    # 3x), codebook 128 x 4, LoRA rank 8 alpha 16 (scale 2), a 3-level UNet.
    "rank8_x4": dict(ch_mult=[1, 2, 2], input_size=16, image_size=48, codebook=(128, 4), rank=8, alpha=16,
                     cond_channels=[4, 8, 8, 16], unet_channels=[8, 8, 16], heads=[2, 2, 4], cross=16, time_dim=8,
                     vae_channels=[8, 8, 8]),
}


def _official_args(c: dict) -> dict:
    levels = len(c["unet_channels"])
    unet = {"sample_size": c["image_size"] // 2 ** (len(c["vae_channels"]) - 1), "in_channels": 4, "out_channels": 4,
            "block_out_channels": c["unet_channels"], "layers_per_block": 1,
            "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (levels - 1),
            "up_block_types": ["CrossAttnUpBlock2D"] * (levels - 1) + ["UpBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_head_dim": c["heads"],
            "use_linear_projection": True, "cross_attention_dim": c["cross"], "addition_embed_type": "text_time",
            "addition_time_embed_dim": c["time_dim"], "projection_class_embeddings_input_dim": 1280 + 6 * c["time_dim"],
            "norm_num_groups": 4, "flip_sin_to_cos": True, "freq_shift": 0}
    vae = {"in_channels": 3, "out_channels": 3, "block_out_channels": c["vae_channels"], "layers_per_block": 1,
           "down_block_types": ["DownEncoderBlock2D"] * len(c["vae_channels"]),
           "up_block_types": ["UpDecoderBlock2D"] * len(c["vae_channels"]), "latent_channels": 4,
           "norm_num_groups": 4, "sample_size": c["image_size"], "scaling_factor": 0.13025}
    k, dim = c["codebook"]
    return {"vq_model_args": {"codebook_size": k, "codebook_embed_dim": dim, "codebook_l2_norm": True,
                              "commit_loss_beta": 0.25, "encoder_ch_mult": c["ch_mult"], "z_channels": 16},
            "vq_encoder": {"ch": 32, "num_res_blocks": 1},
            "controlnet_cond": {"conditioning_embedding_out_channels": c["cond_channels"], "cond_channels": dim},
            "lora": {"r": c["rank"], "lora_alpha": c["alpha"],
                     "target_modules": list(RELEASED_ARGS["lora"]["target_modules"])},
            "unet_config": unet, "vae_config": vae, "scheduler_config": RELEASED_ARGS["scheduler_config"],
            "image_size_sd": c["image_size"], "tokenizer_input_size": c["input_size"]}


class _OfficialCondEmbedding(nn.Module):
    """The official conditioning embedding's layout, written here from the README's description."""

    def __init__(self, cond: int, widths: list[int], out: int):
        super().__init__()
        self.conv_in = nn.Conv2d(cond, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1))
        self.conv_out = nn.Conv2d(widths[-1], out, 3, padding=1)

    def forward(self, x):
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


def _randomise(module: nn.Module, g: torch.Generator) -> None:
    """Every parameter redrawn (the fixture's recipe: zero-initialised ones and LoRA B too)."""
    for name, p in module.named_parameters():
        with torch.no_grad():
            if p.ndim >= 2:
                scale = 0.25 / p.shape[1] ** 0.5 if "lora_B" in name else 1.0 / p[0].numel() ** 0.5
                if "cond_embedding" in name and "conv_out" not in name:
                    scale *= 2.0
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif name.endswith("weight"):  # norms
                p.copy_(1 + 0.15 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


@functools.cache
def _generated(case: str):
    """(folder, official state, reference outputs) of a fresh random official-layout LaCTok."""
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    c = CASES[case]
    args = _official_args(c)
    g = torch.Generator().manual_seed(sorted(CASES).index(case) + 7)
    k_dim = c["codebook"]
    encoder = VQGANEncoder(ch=32, ch_mult=c["ch_mult"], num_res_blocks=1, z_channels=16)
    quant_conv = nn.Conv2d(16, k_dim[1], 1)
    unet = UNet2DConditionModel(**args["unet_config"])
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=c["cond_channels"])
    controlnet.controlnet_cond_embedding = _OfficialCondEmbedding(k_dim[1], c["cond_channels"], c["unet_channels"][0])
    lora_unet = LoraModel(unet, LoraConfig(r=c["rank"], lora_alpha=c["alpha"],
                                           target_modules=args["lora"]["target_modules"]), "default")
    vae = AutoencoderKL(**{k: v for k, v in args["vae_config"].items() if k != "scaling_factor"})
    for part in (encoder, quant_conv, lora_unet, controlnet, vae):
        _randomise(part, g)
    codebook = torch.randn(k_dim, generator=g)
    state = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
             **{f"quant_conv.{k}": v for k, v in quant_conv.state_dict().items()},
             "quantize.embedding.weight": codebook,
             "quantize.codebook_used": torch.randint(0, k_dim[0], (65536,), generator=g).float(),
             "post_quant_conv.weight": torch.randn(16, k_dim[1], 1, 1, generator=g),
             "post_quant_conv.bias": torch.randn(16, generator=g),
             **{f"decoder.unet.base_model.{k}": v for k, v in lora_unet.state_dict().items()},
             **{f"decoder.controlnet.{k}": v for k, v in controlnet.state_dict().items()},
             **{f"vae.{k}": v for k, v in vae.state_dict().items()}}
    folder = Path(tempfile.mkdtemp(prefix=f"lactok_{case}_"))
    (folder / ARGS_NAME).write_text(json.dumps(args))
    torch.save({"model": state}, folder / WEIGHTS_NAME)

    # The reference computation: the README's recipe on a plain UNet (drop the peft levels and
    # `.base_layer`, merge W += s B A with s = alpha / r).
    plain = UNet2DConditionModel(**args["unet_config"])
    lora_state = lora_unet.model.state_dict()
    merged = {k.replace(".base_layer", ""): v.clone() for k, v in lora_state.items() if ".lora_" not in k}
    for key, a in lora_state.items():
        if key.endswith(".lora_A.default.weight"):
            b = lora_state[key.replace("lora_A", "lora_B")]
            target = key[: -len(".lora_A.default.weight")] + ".weight"
            delta = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a) if a.ndim == 4 else b @ a
            merged[target] += (c["alpha"] / c["rank"]) * delta
    plain.load_state_dict(merged, strict=True)
    torch.manual_seed(1)
    image = torch.rand(2, 3, c["input_size"], c["input_size"])
    with torch.no_grad():
        z = quant_conv(encoder(image * 2 - 1)).permute(0, 2, 3, 1)
        grid = z.shape[1]
        flat = F.normalize(z.reshape(-1, k_dim[1]), dim=-1)
        codes = F.normalize(codebook, dim=-1)
        ids = (flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.t()).argmin(1)
        code_map = codes[ids].reshape(2, grid, grid, -1).permute(0, 3, 1, 2)
        latent = args["unet_config"]["sample_size"]
        cond = F.interpolate(code_map, size=(latent, latent), mode="nearest")
        s = float(c["image_size"])
        kwargs = {"encoder_hidden_states": torch.zeros(2, 77, c["cross"]),
                  "added_cond_kwargs": {"text_embeds": torch.zeros(2, 1280),
                                        "time_ids": torch.tensor([[s, s, 0, 0, s, s]] * 2)}}
        schedule = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps")
        abar = DDIMScheduler(**{k: v for k, v in args["scheduler_config"].items() if k in schedule}).alphas_cumprod
        noise = [torch.randn(2, 4, latent, latent) for _ in range(4)]
        x, x0 = noise[0], None
        for i, (t, t_next) in enumerate([(999, 499), (499, 124), (124, 0)]):
            tt = torch.full((2,), t)
            down, mid = controlnet(x, tt, controlnet_cond=cond, conditioning_scale=0.8, return_dict=False, **kwargs)
            eps = plain(x, tt, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                        return_dict=False, **kwargs)[0]
            x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
            x = abar[t_next].sqrt() * x0 + (1 - abar[t_next]).sqrt() * noise[i + 1]
        pixels = vae.decode(x0 / 0.13025).sample.clamp(-1, 1)
    reference = {"image": image, "ids": ids.reshape(2, grid, grid), "noise": noise, "latents": x0,
                 "pixels": pixels}
    return folder, state, reference


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_fresh_official_layout_lactoks_of_other_sizes_load_and_reproduce(case, tmp_path):
    folder, state, ref = _generated(case)
    tok = load_tokenizer(folder)
    assert isinstance(tok, Layton)
    c = CASES[case]
    assert tok.lora_rank == c["rank"] and tok.codebook_size == c["codebook"][0]
    back = official_state_dict(tok)
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)
    encoded = tok.encode(ref["image"])
    assert torch.equal(tok.id_grid(encoded.ids), ref["ids"])
    latents = tok.sample_latents(tok.code_map(encoded.ids), steps=3, cond_scale=0.8, noise=ref["noise"])
    assert _max_diff(latents, ref["latents"]) < CHAIN_ATOL
    image = tok.decode(encoded.ids, noise=ref["noise"])
    assert image.shape == (2, 3, c["image_size"], c["image_size"])
    assert _max_diff(image * 2 - 1, ref["pixels"]) < ATOL
    saved = save_official_layton(tok, tmp_path / case)
    written = torch.load(saved / WEIGHTS_NAME, map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(written[k], state[k]) for k in state) and sorted(written) == sorted(state)
    again = load_tokenizer(saved)  # the args written from the model rebuild the same architecture
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), tok.state_dict().values()))


def test_consistency_timesteps_follow_the_release_formula():
    assert consistency_timesteps(3) == [999, 499, 124]
    assert consistency_timesteps(1) == [999] and consistency_timesteps(2) == [999, 499]
    assert consistency_timesteps(4) == [999, 749, 499, 249]
    with pytest.raises(ValueError):
        consistency_timesteps(0)
