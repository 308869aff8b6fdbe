"""Our Divot against the official one: shared/reference/divot (random weights, official outputs).

Tolerances are the fixture README's: encoder / resampler / head tensors atol 2e-4 rtol 1e-4, the
input from the clip atol 1e-6, UNet single calls and contexts 1e-4, the 50-step DDIM chain 1e-3,
DDIM timesteps exact, DDIM alphas 1e-9.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from helpers import SHARED
from helpers import reference_path
from safetensors.torch import load_file

from tokenizers_vis import load_tokenizer
from tokenizers_vis.models.divot import Divot
from tokenizers_vis.models.divot_official import (
    ARGS_NAME,
    DETOKENIZER_NAME,
    TOKENIZER_NAME,
    TEXT_LEFTOVERS,
    load_official_divot,
    official_state_dicts,
)
from tokenizers_vis.models.official import find_official_format
from tokenizers_vis.nn.gmm import GMMHead, ProjectionMLP, gmm_log_prob

ATOL, RTOL = 2e-4, 1e-4
UNET_ATOL, CHAIN_ATOL = 1e-4, 1e-3


def _group(tensors, group: str) -> dict[str, torch.Tensor]:
    prefix = f"state_dict.{group}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def write_official_folder(folder: Path, main, detok, meta, unet_prefix: str = "diffusion_model.") -> Path:
    """The fixture's weights in the released layout (Divot_tokenizer.bin, Divot_detokenizer_stage1.bin)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_group(main, "encoder"), folder / TOKENIZER_NAME)
    detok_state = {"image_proj_model." + k: v for k, v in _group(main, "detok_resampler").items()}
    detok_state.update({unet_prefix + k: v for k, v in _group(detok, "unet").items()})
    detok_state.update({"first_stage_model." + k: v for k, v in _group(detok, "vae").items()})
    torch.save(detok_state, folder / DETOKENIZER_NAME)
    (folder / ARGS_NAME).write_text(json.dumps({"config": meta["config"], "detok_config": meta["detok_config"]}))
    return folder


@pytest.fixture(scope="module")
def ref():
    root = reference_path(SHARED, "divot", "tiny.safetensors").parent
    main = load_file(str(root / "tiny.safetensors"))
    detok = load_file(str(root / "tiny_detok.safetensors"))
    clip = load_file(str(root / "tiny_clip.safetensors"))
    meta = json.loads((root / "tiny.json").read_text())
    io = {k[3:]: v for src in (main, detok, clip) for k, v in src.items() if k.startswith("io.")}
    return main, detok, meta, io


@pytest.fixture(scope="module")
def folder(ref, tmp_path_factory):
    main, detok, meta, _ = ref
    return write_official_folder(tmp_path_factory.mktemp("divot_official"), main, detok, meta)


@pytest.fixture(scope="module")
def model(folder) -> Divot:
    return load_official_divot(folder)


def _close(actual, expected, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def test_folder_is_recognised_and_loads_strictly(folder, model):
    assert find_official_format(folder).name == "divot"
    loaded = load_tokenizer(folder)
    assert isinstance(loaded, Divot)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


def test_writing_back_gives_the_release_state_bit_for_bit(model, ref):
    main, detok, _, _ = ref
    tok, detok_state = official_state_dicts(model)
    encoder = _group(main, "encoder")
    leftovers = {k for k in encoder if k.startswith(TEXT_LEFTOVERS)}
    assert len(leftovers) == 6 and set(tok) == set(encoder) - leftovers
    expected = {"image_proj_model." + k: v for k, v in _group(main, "detok_resampler").items()}
    expected.update({"diffusion_model." + k: v for k, v in _group(detok, "unet").items()})
    expected.update({"first_stage_model." + k: v for k, v in _group(detok, "vae").items()})
    assert set(detok_state) == set(expected)
    for key, value in [*tok.items(), *detok_state.items()]:
        assert torch.equal(value, encoder[key] if key in tok else expected[key]), key


def test_unet_prefix_of_dynamicrafter_checkpoints_loads(ref, tmp_path, model):
    main, detok, meta, _ = ref
    other = load_official_divot(write_official_folder(tmp_path, main, detok, meta, "model.diffusion_model."))
    assert torch.equal(other.decoder.denoiser.out[2].weight, model.decoder.denoiser.out[2].weight)


def test_extra_key_fails_the_strict_load(ref, tmp_path):
    main, detok, meta, _ = ref
    folder = write_official_folder(tmp_path, main, detok, meta)
    state = torch.load(folder / TOKENIZER_NAME)
    state["temporal_encoder.surplus"] = torch.zeros(1)
    torch.save(state, folder / TOKENIZER_NAME)
    with pytest.raises(KeyError):
        load_official_divot(folder)


def test_frame_selection_and_input_transform(model, ref):
    io = ref[3]
    assert model.frame_positions == io["input.frame_positions"].tolist() == [0, 4, 8, 12, 15]
    clip = io["input.clip_uint8"].permute(0, 1, 4, 2, 3).float() / 255  # (B, 16, 3, H, W) in [0, 1]
    frames = model.select_frames(clip)
    b, t = frames.shape[:2]
    video = model.official_transform(frames.flatten(0, 1)).view(b, t, 3, 256, 256)
    _close(video, io["input.video"], atol=1e-6, rtol=0)
    _close(model.vit_input(io["input.video"][:, 0]), io["vit.preprocessed_frame0"])


def test_every_encoder_stage(model, ref):
    io = ref[3]
    with torch.no_grad():
        s = model.stages(io["input.video"])
        # each stage from its saved input as well
        st_from_saved = model.st_transformer(io["pool.normed"])
        tokens_from_saved = model.resampler(io["st.output"])
    feats = io["vit.features"][:, :, 1:]  # the encoder drops CLS
    _close(s["vit"], feats)
    _close(s["temporal"], io["temporal.output"])
    _close(s["pool"], io["pool.output"])
    _close(s["normed"], io["pool.normed"])
    _close(s["st_input"], io["st.input"])
    _close(s["st"], io["st.output"])
    _close(st_from_saved, io["st.output"])
    _close(s["tokens"], io["output.tokens"])
    _close(tokens_from_saved, io["output.tokens"])


def test_encode_api_from_the_uint8_clip(model, ref):
    io = ref[3]
    clip = io["input.clip_uint8"].permute(0, 1, 4, 2, 3).float() / 255
    with torch.no_grad():
        enc = model.encode(clip)
    assert enc.ids is None and enc.latents.shape == (2, 8, 16)
    _close(enc.latents, io["output.tokens"])


def test_uncond_tokens_and_contexts(model, ref):
    io = ref[3]
    with torch.no_grad():
        uncond = model.unconditional_tokens()
        cond_ctx, uncond_ctx = model.contexts(io["output.tokens"])
    _close(uncond, io["uncond.tokens"])
    _close(io["dt.uncond_tokens"], io["uncond.tokens"])
    _close(cond_ctx, io["detok.context"], atol=UNET_ATOL)
    _close(uncond_ctx, io["uncond.context"], atol=UNET_ATOL)
    _close(uncond_ctx, io["dt.context_uncond"], atol=UNET_ATOL)


def test_noise_schedule_and_ddim_parameters(model, ref):
    io = ref[3]
    sched = model.decoder.scheduler
    _close(sched.betas, io["schedule.betas"], atol=1e-7, rtol=0)
    _close(sched.alphas_cumprod, io["schedule.alphas_cumprod"], atol=1e-7, rtol=0)
    sched.set_timesteps(50)
    assert sched.timesteps.tolist() == io["ddim.timesteps"].tolist()
    torch.testing.assert_close(sched.ddim_alphas, io["ddim.alphas"], atol=1e-9, rtol=0)
    torch.testing.assert_close(sched.ddim_alphas_prev, io["ddim.alphas_prev"], atol=1e-9, rtol=0)
    torch.testing.assert_close(sched.sigmas(1.0), io["ddim.sigmas"], atol=1e-9, rtol=0)


def test_unet_single_calls(model, ref):
    io = ref[3]
    unet = model.decoder.denoiser
    t = io["ddim.timesteps"][:1]
    with torch.no_grad():
        v_cond = unet(io["ddim.x_T"], t, io["dt.context_cond"], fs=io["ddim.fs"])
        v_uncond = unet(io["ddim.x_T"], t, io["dt.context_uncond"], fs=io["ddim.fs"])
    _close(v_cond, io["ddim.step0.v_cond"], atol=UNET_ATOL)
    _close(v_uncond, io["ddim.step0.v_uncond"], atol=UNET_ATOL)


@pytest.fixture(scope="module")
def detok_run(model, ref):
    """One `decode` of the fixture's tokens with its saved noise, recording every DDIM step."""
    io = ref[3]
    noise = [io["ddim.x_T"], *io["ddim.noise"].unbind(0)]
    sched = model.decoder.scheduler
    steps, step = [], sched.step

    @functools.wraps(step)  # keeps the signature the decoder inspects (eta, variance_noise)
    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        steps.append((out.prev_sample, out.pred_original_sample))
        return out

    sched.step = recording_step
    try:
        with torch.no_grad():
            video = model.decode(io["dt.video_embeds"], steps=50, guidance=7.5, guidance_rescale=0.7, noise=noise)
    finally:
        del sched.step
    return video, steps


def test_every_ddim_step_with_the_saved_noise(detok_run, ref):
    io = ref[3]
    _, steps = detok_run
    assert len(steps) == 50
    for i, (x_prev, x0) in enumerate(steps):
        _close(x_prev, io["ddim.x_steps"][i], atol=CHAIN_ATOL, rtol=CHAIN_ATOL)
        _close(x0, io["ddim.pred_x0_steps"][i], atol=CHAIN_ATOL, rtol=CHAIN_ATOL)
    _close(steps[-1][0], io["dt.latents"], atol=CHAIN_ATOL, rtol=CHAIN_ATOL)


def test_decode_api_returns_the_release_video_in_unit_range(detok_run, ref):
    io = ref[3]
    video, _ = detok_run
    assert video.shape == (1, 16, 3, 64, 64)
    _close(video * 2 - 1, io["dt.video"].permute(0, 2, 1, 3, 4), atol=CHAIN_ATOL, rtol=CHAIN_ATOL)


def test_decode_noise_list_is_checked(model, ref):
    io = ref[3]
    with pytest.raises(ValueError, match="noise draws"):
        model.decode(io["dt.video_embeds"], steps=2, noise=[io["ddim.x_T"]])


def test_gmm_head_and_llm_input_projection(ref):
    main, _, meta, io = ref
    k, d = meta["config"]["gmm_k"], meta["config"]["gmm_d"]
    head = GMMHead(meta["config"]["gmm_head"]["input_dim"], k, d)
    head.load_state_dict(_group(main, "gmm_head"), strict=True)
    proj = ProjectionMLP(d, meta["config"]["input_resampler"]["output_dim"])
    proj.load_state_dict(_group(main, "input_resampler"), strict=True)
    with torch.no_grad():
        params = head(io["gmm.hidden"])
        means, variances, logits = head.split(params)
        _close(params, io["gmm.params"])
        _close(means, io["gmm.means"])
        _close(variances, io["gmm.variances"])
        _close(logits, io["gmm.logits"])
        _close(gmm_log_prob(means, variances, logits, io["gmm.target"]), io["gmm.log_prob"])
        torch.testing.assert_close(head.nll(params, io["gmm.target"]), io["gmm.nll"], rtol=1e-5, atol=0)
        _close(head.predict(params), io["gmm.prediction"])
        _close(proj(io["output.tokens"]), io["llm_in.embeds"])
