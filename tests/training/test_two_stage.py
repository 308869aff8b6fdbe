"""TiTok's two-stage recipe: proxy codes of a frozen VQGAN teacher (stage 1), then the pixel decoder
with encoder, quantizer and latent tokens frozen (stage 2), on the demo shards at tiny sizes."""

import json

import hydra
import pytest
import torch
from helpers import compose_train

from tokenizers_vis import load_tokenizer, save_pretrained
from tokenizers_vis.config import prepare_config
from tokenizers_vis.data import DemoDataModule
from tokenizers_vis.hub import checkpoint_state, read_checkpoint
from tokenizers_vis.losses.proxy_codes import ProxyCodeObjective
from tokenizers_vis.models import TiTok
from tokenizers_vis.models.vqgan import VQGAN
from tokenizers_vis.training.module import load_initial_weights
from tokenizers_vis.training.run import run_training

TWO_STAGE = ["titok_s128", "titok_b64", "titok_l32"]
STAGE1_FROZEN = ("pixel_quantize", "pixel_decoder")
STAGE2_FROZEN = ("latent_tokens", "encoder", "quantize")

# 32 px, an 8 x 8 grid: the teacher downsamples by 4, the TiTok has patch 4 and a matching pixel decoder.
TEACHER = dict(image_size=32, base_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1, z_channels=16,
               codebook_size=32)
STUDENT = dict(image_size=32, patch_size=4, num_latent_tokens=16, encoder_size=None, decoder_size=None,
               encoder_width=64, encoder_depth=2, encoder_heads=4, decoder_width=64, decoder_depth=2,
               decoder_heads=4, token_dim=8, codebook_size=64, head="proxy_codes", legacy_reshape=True,
               proxy_codebook_size=32, pixel_decoder_channels=32, pixel_decoder_channel_mult=(1, 1, 2),
               pixel_decoder_res_blocks=1, pixel_decoder_z_channels=16)


def part(name: str) -> str:
    return name.split(".")[0]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation, which made the
    training tests here 10x slower on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_images(demo_data):
    data = DemoDataModule(demo_dir=str(demo_data / "demo"), resolution=32, batch_size=8, num_workers=0,
                          val_max_images=8)
    data.setup("validate")
    return next(iter(data.val_dataloader()))["image"]


# -- the pieces --------------------------------------------------------------------------------
def test_stage_one_objective_starts_from_the_teacher_pixel_decoder():
    objective = ProxyCodeObjective(random_teacher=TEACHER)
    student = TiTok(**STUDENT, frozen=STAGE1_FROZEN)
    load_initial_weights(student, None, objective)
    teacher = objective.teacher.state_dict()
    for name, value in student.state_dict().items():
        if part(name) in STAGE1_FROZEN:
            assert torch.equal(value, teacher[name.removeprefix("pixel_")]), name
    assert objective.discriminator is None and not objective.discriminator_active(10**9)
    assert list(objective.frozen) == ["teacher"] and not any(p.requires_grad for p in objective.parameters())
    with pytest.raises(ValueError, match="model.stages.1.objective.teacher"):
        ProxyCodeObjective()
    mismatched = TiTok(**{**STUDENT, "proxy_codebook_size": 16})
    with pytest.raises(ValueError, match="do not fit this TiTok's pixel decoder"):
        objective.initial_weights(mismatched)


def test_freezing_and_logits_without_pixels():
    student = TiTok(**STUDENT, frozen=STAGE2_FROZEN).train()
    trainable = {part(n) for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {"decoder", "pixel_quantize", "pixel_decoder"}
    assert not student.encoder.training and not student.quantize.training and student.decoder.training
    x = torch.rand(2, 3, 32, 32)
    out = student(x)
    assert out.reconstruction.shape == x.shape and not out.encoded.latents.requires_grad
    logits_only = student(x, pixels=False)
    assert logits_only.reconstruction is None
    assert logits_only.encoded.extras["proxy_logits"].shape == (2, 32, 8, 8)
    with pytest.raises(ValueError, match="cannot freeze"):
        TiTok(**{**STUDENT, "head": "pixel", "legacy_reshape": False}, frozen=["pixel_decoder"])


def test_stage_one_cross_entropy_falls_on_demo_images(demo_images):
    """A tiny TiTok fits the codes a tiny random teacher gives 8 demo images (4 x 4 grids of 16 codes)."""
    torch.manual_seed(0)
    teacher = dict(image_size=32, base_channels=8, channel_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=8,
                   codebook_size=16, norm_groups=4)
    objective = ProxyCodeObjective(random_teacher=teacher)
    student = TiTok(**{**STUDENT, "patch_size": 8, "num_latent_tokens": 8, "proxy_codebook_size": 16,
                       "pixel_decoder_channel_mult": (1, 1, 2, 2)}, frozen=STAGE1_FROZEN).train()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    frozen_before = {n: v.clone() for n, v in student.state_dict().items() if part(n) in STAGE1_FROZEN}
    history = []
    for step in range(40):
        loss, logs, output = objective(student, demo_images, step)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:  # straight-through and codebook losses reach everything that is not frozen
            grads = {part(n): p.grad is not None and bool(p.grad.abs().sum() > 0)
                     for n, p in student.named_parameters()}
            assert grads == {"latent_tokens": True, "encoder": True, "quantize": True, "decoder": True,
                             "pixel_quantize": False, "pixel_decoder": False}
        optimizer.step()
        history.append((float(logs["loss/proxy_ce"]), float(logs["proxy/accuracy"])))
    assert output.reconstruction is None and output.encoded.ids.shape == (8, 8)
    (ce_first, acc_first), (ce_last, acc_last) = history[0], history[-1]
    assert ce_last < 0.6 * ce_first and acc_last > acc_first + 0.1, history[::5]
    for name, value in frozen_before.items():
        assert torch.equal(student.state_dict()[name], value), name


# -- the recipe, end to end ---------------------------------------------------------------------
def test_stage_two_from_stage_one_keeps_the_frozen_parts_bit_identical(demo_data, tmp_path):
    """Stage 1 from a saved teacher folder, then stage 2 from its checkpoint, both with debug=smoke."""
    teacher = VQGAN(image_size=64, base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=32,
                    codebook_size=64)
    save_pretrained(teacher, tmp_path / "teacher")
    stage1 = run_training(compose_train(
        ["experiment=titok_b64", "debug=smoke", f"model.stages.1.objective.teacher={tmp_path / 'teacher'}"],
        tmp_path / "stage1", data_dir=demo_data))
    assert stage1["steps"] == 3 and "val/psnr" in stage1["val_after"]
    ckpt1 = tmp_path / "stage1" / "checkpoints" / "last.ckpt"
    start = checkpoint_state(read_checkpoint(ckpt1))  # EMA weights: what init_from loads
    for name, value in start.items():  # stage 1 kept the teacher's decoder and codebook
        if part(name) in STAGE1_FROZEN:
            assert torch.equal(value, teacher.state_dict()[name.removeprefix("pixel_")]), name

    # Without the (random) ConvNeXt perceptual net, most of a CPU step: the GAN and pixel terms remain.
    stage2 = run_training(compose_train(
        ["experiment=titok_b64", "debug=smoke", "model.stage=2", f"model.init_from={ckpt1}",
         "model.stages.2.objective.convnext_weight=0.0"],
        tmp_path / "stage2", data_dir=demo_data))
    assert stage2["steps"] == 3 and "val/psnr" in stage2["val_after"]
    checkpoint = read_checkpoint(tmp_path / "stage2" / "checkpoints" / "last.ckpt")
    assert checkpoint["tokenizer_config"]["frozen"] == list(STAGE2_FROZEN)
    assert not any(k.startswith("objective.frozen.") for k in checkpoint["state_dict"])
    changed = set()
    for weights in (checkpoint_state(checkpoint, use_ema=False), checkpoint_state(checkpoint)):
        for name, value in weights.items():
            if part(name) in STAGE2_FROZEN:
                assert torch.equal(value, start[name]), name
            elif not torch.equal(value, start[name]):
                changed.add(part(name))
    assert changed == {"decoder", "pixel_quantize", "pixel_decoder"}

    tokenizer = load_tokenizer(tmp_path / "stage2" / "checkpoints" / "last.ckpt")
    ids = tokenizer.encode(torch.rand(2, 3, 64, 64)).ids
    assert tokenizer.decode(ids).shape == (2, 3, 64, 64)
    assert tokenizer.decode_logits(ids).shape == (2, 64, 8, 8)


# -- configs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", TWO_STAGE)
@pytest.mark.parametrize("stage", [1, 2])
def test_every_two_stage_experiment_builds_both_stages_with_debug_smoke(experiment, stage, tmp_path):
    """(Stage 1 of every experiment also trains in test_train.py; stage 2 trains end to end above: under
    smoke the three experiments build the same tiny model.)"""
    cfg = prepare_config(compose_train([f"experiment={experiment}", "debug=smoke", f"model.stage={stage}"], tmp_path))
    assert "stage" not in cfg.model and "stages" not in cfg.model
    module = hydra.utils.instantiate(cfg.model)
    if stage == 1:
        assert module.tokenizer.frozen_parts == STAGE1_FROZEN and isinstance(module.objective, ProxyCodeObjective)
        loss, _, _ = module.objective(module.tokenizer, torch.rand(2, 3, 64, 64), step=0)
        assert torch.isfinite(loss)
    else:
        assert module.tokenizer.frozen_parts == STAGE2_FROZEN and module.objective.discriminator is not None


@pytest.mark.parametrize("experiment", TWO_STAGE)
def test_real_configs_name_the_missing_inputs_and_set_the_stage_lengths(experiment, tmp_path):
    with pytest.raises(ValueError, match=r"model\.stages\.1\.objective\.teacher is not set"):
        prepare_config(compose_train([f"experiment={experiment}"], tmp_path))
    with pytest.raises(ValueError, match=r"model\.init_from is not set"):
        prepare_config(compose_train([f"experiment={experiment}", "model.stage=2"], tmp_path))
    with pytest.raises(ValueError, match="not a stage of this recipe"):
        prepare_config(compose_train([f"experiment={experiment}", "model.stage=3"], tmp_path))
    stage1 = prepare_config(compose_train([f"experiment={experiment}", "model.stages.1.objective.teacher=/t.bin"],
                                          tmp_path))
    stage2 = prepare_config(compose_train([f"experiment={experiment}", "model.stage=2", "model.init_from=/s1.ckpt"],
                                          tmp_path))
    assert (stage1.trainer.max_steps, stage2.trainer.max_steps) == (1_000_000, 500_000)
    assert stage1.model.objective.aux_weight == 1.0 and stage2.model.objective.gan_start_step == 20_000
    assert stage2.model.objective.lecam_weight == 0.001 and stage2.model.init_from == "/s1.ckpt"
    for cfg in (stage1, stage2):
        assert tuple(cfg.model.optimizer.betas) == (0.9, 0.99) and cfg.model.ema_decay == 0.999
        assert cfg.model.schedule.warmup_steps == 10_000 and cfg.model.grad_clip == 1.0


@pytest.mark.parametrize("experiment", TWO_STAGE)
def test_experiments_build_the_released_architectures(experiment, shared_dir, tmp_path):
    """Parameter counts of the released S-128 / B-64 / L-32, pixel decoder included."""
    counts = json.loads((shared_dir / "reference/titok/full_size_keys.json").read_text())["_param_counts"]
    overrides = [f"experiment={experiment}", "model.stages.1.objective.teacher=/t.bin"]
    cfg = prepare_config(compose_train(overrides, tmp_path))
    with torch.device("meta"):
        tokenizer = hydra.utils.instantiate(cfg.model.tokenizer)
    assert sum(p.numel() for p in tokenizer.parameters()) == counts[experiment]["_total"]
