"""Layton built from config with tiny random diffusers parts: the token grid, the API, the zero-init
token branch, the few-step sampler's gradients (and its stop-gradient), the pretrained-part and
LlamaGen loading paths, and stage-2 training on demo images."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from tokenizers_vis import load_tokenizer, save_pretrained
from tokenizers_vis.losses.layton import LaytonConsistencyObjective, LaytonDiffusionObjective
from tokenizers_vis.models import build_tokenizer
from tokenizers_vis.models.layton import Layton
from tokenizers_vis.nn.weights import MissingWeightsError
from tokenizers_vis.training.module import ema_copy

TINY_UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [16, 32],
             "layers_per_block": 1, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "mid_block_type": "UNetMidBlock2DCrossAttn",
             "attention_head_dim": [2, 4], "use_linear_projection": True, "cross_attention_dim": 32,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 1328, "norm_num_groups": 8}
# Two levels (x2): a random frozen VAE of four levels cannot draw the demo images at all.
TINY_VAE = {"block_out_channels": [16, 16], "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "scaling_factor": 1.0}


def tiny(**overrides) -> Layton:
    """32 px in and out, 4x-down VQ (8 x 8 ids), 16 x 16 latents."""
    args = dict(image_size=32, tokenizer_input_size=32, encoder_channels=32, encoder_channel_mult=[1, 1, 2],
                encoder_num_res_blocks=1, z_channels=16, codebook_size=64, cond_embedding_widths=[8, 16],
                lora_rank=4, unet={"pretrained": None, "config": TINY_UNET},
                vae={"pretrained": None, "config": TINY_VAE})
    args.update(overrides)
    return Layton(**args)


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    return tiny().eval()


def _randomise_zero_convs(model: Layton, seed: int = 0) -> None:
    """A 'trained' token branch: the zero-initialised convs and LoRA B drawn at random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(key in name for key in ("controlnet_down_blocks", "controlnet_mid_block", "cond_embedding.conv_out",
                                           "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_256px_in_gives_a_16x16_id_grid():
    torch.manual_seed(0)
    model = tiny(tokenizer_input_size=256, encoder_channel_mult=[1, 1, 2, 2, 4]).eval()
    assert model.num_tokens == 256 and model.grid == 16
    with torch.no_grad():
        encoded = model.encode(torch.rand(1, 3, 256, 256))
        assert encoded.ids.shape == (1, 256) and model.id_grid(encoded.ids).shape == (1, 16, 16)
        # The same image at the output size is resized to the encoder's 256 px first.
        assert model.encode(torch.rand(1, 3, 32, 32)).ids.shape == (1, 256)
        # decode takes the flat ids or the grid
        noise = [torch.randn(1, 4, 16, 16) for _ in range(model.noise_draws(1))]
        flat = model.decode(encoded.ids[:1], steps=1, noise=noise)
        grid = model.decode(model.id_grid(encoded.ids[:1]), steps=1, noise=noise)
    assert flat.shape == (1, 3, 32, 32) and torch.equal(flat, grid)
    with pytest.raises(ValueError, match="takes 32 px images"):
        model.encode(torch.rand(1, 3, 128, 128))


@torch.no_grad()
def test_decode_api_noise_lists_generators_and_range(tok):
    x = torch.rand(2, 3, 32, 32)
    encoded = tok.encode(x)
    assert encoded.ids.shape == (2, 64) and encoded.ids.max() < 64
    for steps in (1, 2, 3):
        assert tok.noise_draws(steps) == steps + 1  # initial latent + one per re-noise (the last discarded)
    noise = [torch.randn(2, 4, 16, 16) for _ in range(4)]
    image = tok.decode(encoded.ids, steps=3, cond_scale=0.8, noise=noise)
    assert image.shape == (2, 3, 32, 32) and image.min() >= 0 and image.max() <= 1
    assert torch.equal(image, tok.decode(encoded.ids, noise=noise))  # defaults: 3 calls, cond_scale 0.8
    one = tok.decode(encoded.ids, generator=torch.Generator().manual_seed(3), steps=1)
    assert torch.equal(one, tok.decode(encoded.ids, generator=torch.Generator().manual_seed(3), steps=1))
    assert not torch.equal(one, tok.decode(encoded.ids, generator=torch.Generator().manual_seed(4), steps=1))
    with pytest.raises(ValueError, match="uses 4 noise draws"):
        tok.decode(encoded.ids, noise=noise[:3])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 63\]"):
        tok.decode(torch.full((1, 64), 64))


@torch.no_grad()
def test_zero_initialised_token_branch_leaves_the_unet_output_unchanged_at_init(tok):
    denoiser = tok.decoder.denoiser
    x_t, t = torch.randn(2, 4, 16, 16), torch.tensor([999, 499])
    a, b = torch.rand(2, 8, 8, 8), torch.rand(2, 8, 8, 8)
    plain = tok.unet(x_t, t, return_dict=False, **denoiser.text_inputs(2, x_t))[0]  # no residuals at all
    assert torch.equal(denoiser(x_t, t, a, cond_scale=1.0), plain)
    assert torch.equal(denoiser(x_t, t, b, cond_scale=1.0), plain)
    # ...and peft starts LoRA B at zero: the wrapped UNet is the base UNet.
    lora_b = [p for n, p in tok.unet.named_parameters() if ".lora_B." in n]
    assert len(lora_b) == 79 and all(not p.any() for p in lora_b)  # 78 as in the fixture + one conv_shortcut
    trained = copy.deepcopy(tok)
    _randomise_zero_convs(trained)
    out_a = trained.decoder.denoiser(x_t, t, a, cond_scale=1.0)
    assert not torch.allclose(out_a, plain, atol=1e-3)  # the check above could fail
    assert not torch.allclose(out_a, trained.decoder.denoiser(x_t, t, b, cond_scale=1.0), atol=1e-3)


def _grad_norms(model: Layton) -> dict[str, float]:
    parts = {"encoder": model.encoder, "cond_embedding": model.controlnet.controlnet_cond_embedding,
             "controlnet": model.controlnet, "lora": model.unet}
    return {name: sum(float(p.grad.norm()) for n, p in part.named_parameters() if p.grad is not None)
            for name, part in parts.items()}


def test_gradients_flow_through_the_two_step_sampler_into_the_token_branch_and_not_through_the_stop_gradient():
    torch.manual_seed(0)
    model = tiny(train_tokenizer=True)
    _randomise_zero_convs(model)
    model.train()
    x = torch.rand(2, 3, 32, 32)
    noise = [torch.randn(2, 4, 16, 16) for _ in range(3)]
    grad_enabled = []
    hook = model.decoder.denoiser.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    try:
        code_map = model.code_map(model.encode(x))
        latents = model.sample_latents(code_map, steps=2, noise=noise, grad_steps=1)
        latents.square().mean().backward()
    finally:
        hook.remove()
    assert grad_enabled == [False, True]  # the t=999 call runs under stop-gradient
    norms = _grad_norms(model)
    assert all(v > 0 for v in norms.values()), norms  # decoder parts and, straight through the VQ, the encoder
    assert all(p.grad is None for p in model.vae.parameters())  # the frozen VAE
    # The same values as one full run; the gradient equals that of the second call alone, with the
    # first call's x0 a constant.
    with torch.no_grad():
        full = model.sample_latents(code_map.detach(), steps=2, noise=noise)
    assert torch.allclose(latents.detach(), full, atol=1e-5)
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    decoder = model.decoder
    with torch.no_grad():
        first = model.sample_latents(model.code_map(model.encode(x)), timesteps=[999], noise=noise[:1] + [noise[2]])
    t = torch.full((2,), 499)
    x_t = decoder.add_noise(first, noise[1], t)
    condition = model.condition(model.code_map(model.encode(x)))
    eps = decoder.denoiser(x_t, t, **decoder.condition(condition))
    decoder.predict_x0(eps, x_t, t).square().mean().backward()
    for name, grad in expected.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-6, rtol=1e-4), name
    # Without the stop-gradient the first call contributes: the gradients differ.
    model.zero_grad(set_to_none=True)
    model.sample_latents(model.code_map(model.encode(x)), steps=2, noise=noise).square().mean().backward()
    assert not torch.allclose(model.encoder.conv_in.weight.grad, expected["encoder.conv_in.weight"], rtol=1e-3)


def test_trainable_parts_and_the_ema_copy_share_the_frozen_bases(tok):
    trainable = {n for n, p in tok.named_parameters() if p.requires_grad}
    decoder_parts = ("decoder.denoiser.controlnet.", "decoder.denoiser.unet.")
    assert trainable and all(n.startswith(decoder_parts) for n in trainable)
    assert all(".lora_" in n for n in trainable if n.startswith("decoder.denoiser.unet."))
    assert not any(n.startswith(("encoder.", "quantize.", "decoder.vae.")) for n in trainable)  # release: frozen VQ
    ema = ema_copy(tok)
    assert ema.unet.conv_in.weight is tok.unet.conv_in.weight and ema.vae.model is not tok.vae.model
    assert ema.vae.model.decoder.conv_out.weight is tok.vae.model.decoder.conv_out.weight
    assert ema.controlnet.conv_in.weight is not tok.controlnet.conv_in.weight
    assert {n for n, p in tiny(train_unet=True).named_parameters() if p.requires_grad} > trainable


def test_config_rebuilds_offline_and_saved_folders_load(tok, tmp_path):
    config = tok.config
    assert config["unet"]["pretrained"] is None and config["unet"]["config"]["block_out_channels"] == [16, 32]
    json.dumps(config)
    rebuilt = build_tokenizer(config)
    rebuilt.load_state_dict(tok.state_dict(), strict=True)
    save_pretrained(tok, tmp_path / "saved")
    loaded = load_tokenizer(tmp_path / "saved")
    assert isinstance(loaded, Layton)
    ids = torch.randint(0, 64, (1, 64))
    noise = [torch.randn(1, 4, 16, 16) for _ in range(4)]
    with torch.no_grad():
        assert torch.equal(loaded.decode(ids, noise=noise), tok.decode(ids, noise=noise))


def test_pretrained_parts_load_from_local_folders_and_missing_ones_say_which_key(tmp_path):
    """The real recipe reads stabilityai/stable-diffusion-xl-base-1.0's unet/ and vae/ subfolders:
    the same code path with a local folder in that layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(1)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    unet.save_pretrained(tmp_path / "sdxl" / "unet")
    vae.save_pretrained(tmp_path / "sdxl" / "vae")
    model = tiny(unet={"pretrained": str(tmp_path / "sdxl"), "subfolder": "unet"},
                 vae={"pretrained": str(tmp_path / "sdxl"), "subfolder": "vae"})
    assert torch.equal(model.unet.conv_in.weight, unet.conv_in.weight)
    assert torch.equal(model.unet.down_blocks[0].resnets[0].conv1.base_layer.weight,
                       unet.down_blocks[0].resnets[0].conv1.weight)
    # ControlNet.from_unet: the token ControlNet starts as a copy of the UNet's encoder half.
    assert torch.equal(model.controlnet.conv_in.weight, unet.conv_in.weight)
    assert torch.equal(model.vae.model.decoder.conv_out.weight, vae.decoder.conv_out.weight)
    assert model.config["unet"]["pretrained"] is None  # saved models record the architecture
    with pytest.raises(MissingWeightsError, match="model.tokenizer.unet.pretrained"):
        tiny(unet={"pretrained": str(tmp_path / "absent"), "subfolder": "unet"})


def test_llamagen_vq16_checkpoint_loads_the_frozen_tokenizer_half(tmp_path):
    torch.manual_seed(2)
    source = tiny()
    with torch.no_grad():
        for p in list(source.encoder.parameters()) + list(source.quant_conv.parameters()):
            p.add_(torch.randn_like(p))
        source.quantize.embedding.weight.normal_()
    state = {k: v for k, v in source.state_dict().items()
             if k.startswith(("encoder.", "quant_conv.", "quantize.", "post_quant_conv."))}
    state["decoder.conv_in.weight"] = torch.randn(64, 16, 3, 3)  # LlamaGen's pixel decoder: not used
    torch.save({"model": state}, tmp_path / "vq_ds16_c2i.pt")
    model = tiny(tokenizer_weights=str(tmp_path / "vq_ds16_c2i.pt"))
    assert torch.equal(model.encoder.conv_in.weight, source.encoder.conv_in.weight)
    assert torch.equal(model.quantize.embedding.weight, source.quantize.embedding.weight)
    assert not model.encoder.conv_in.weight.requires_grad  # frozen, as in the release
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode(x).ids, source.encode(x).ids)
    del state["quant_conv.weight"]
    torch.save({"model": state}, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="quant_conv.weight"):
        tiny(tokenizer_weights=str(tmp_path / "broken.pt"))


def test_vit_encoder_and_pixel_space_variants():
    torch.manual_seed(3)
    pixel_unet = {**TINY_UNET, "in_channels": 3, "out_channels": 3}
    model = tiny(encoder_type="vit", vit_patch_size=8, vit_width=32, vit_depth=1, vit_heads=2, pixel_space=True,
                 unet={"pretrained": None, "config": pixel_unet}).eval()
    assert model.num_tokens == 16 and model.vae is None and model.latent_size == 32
    with torch.no_grad():
        encoded = model.encode(torch.rand(2, 3, 32, 32))
        assert encoded.ids.shape == (2, 16)
        assert model.decode(encoded, steps=1).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="in/out channels must be 3"):
        tiny(pixel_space=True)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(4)
    model = tiny()
    _randomise_zero_convs(model)
    objective = LaytonConsistencyObjective(steps=1, lpips_weight=0.0)
    x = torch.rand(2, 3, 32, 32)
    grads = []
    for enabled in (False, True):
        model.set_gradient_checkpointing(enabled)
        assert model.unet.is_gradient_checkpointing == enabled == model.controlnet.is_gradient_checkpointing
        assert model.vae.model.is_gradient_checkpointing == enabled
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss, _, _ = objective(model, x, 0)
        loss.backward()
        grads.append(model.controlnet.controlnet_down_blocks[0].weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_stage1_objective_regresses_the_noise_on_vae_latents(tok):
    objective = LaytonDiffusionObjective()
    model = copy.deepcopy(tok).train()
    x = torch.rand(2, 3, 32, 32)
    loss, logs, output = objective(model, {"image": x}, 0)
    assert loss.requires_grad and float(logs["loss/diffusion"]) > 0.1
    assert output.reconstruction.shape == x.shape and output.encoded.ids.shape == (2, 64)
    loss.backward()
    assert model.controlnet.controlnet_down_blocks[0].weight.grad.abs().sum() > 0  # the zero convs learn first
    assert model.unet.conv_in.weight.grad is None and model.encoder.conv_in.weight.grad is None


def _demo_images(size: int) -> torch.Tensor:
    import skimage.data as data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    return torch.stack([F.interpolate(torch.tensor(p).permute(2, 0, 1)[None].float() / 255, size=(size, size),
                                      mode="area")[0] for p in photos])


@pytest.mark.slow
def test_stage2_training_on_demo_images_lowers_the_pixel_loss_by_a_third():
    """One-call consistency decoding through the frozen VAE decoder, L2 on pixels. The tiny UNet is
    random, so its base trains too (`train_unet`); the release trains a LoRA on SDXL's."""
    torch.manual_seed(0)
    model = tiny(train_unet=True).train()
    objective = LaytonConsistencyObjective(steps=1, lpips_weight=0.0)
    images = _demo_images(32)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(30):
        loss, logs, _ = objective(model, {"image": images}, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(logs["loss/pixel"]))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, (first, last)


def test_both_objectives_run_under_bf16_autocast(tok):
    """bf16 mixed precision (the GPU recipe), here on the CPU: the quantizer stays in float32 (same
    ids as in float32), the losses are finite and reach the trainable parts."""
    model = copy.deepcopy(tok).train()
    _randomise_zero_convs(model)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ids = model.encode(x).ids
    for objective in (LaytonDiffusionObjective(), LaytonConsistencyObjective(steps=2, lpips_weight=0.0)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, output = objective(model, x, 0)
        assert torch.isfinite(loss) and loss.dtype == torch.float32
        assert torch.equal(output.encoded.ids, ids)
        loss.backward()
        assert model.controlnet.controlnet_down_blocks[0].weight.grad.abs().sum() > 0
