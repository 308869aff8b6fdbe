"""The training step, unit by unit: learning-rate schedule, weight-decay groups, EMA update and its
warm-up, gradient clipping, and bf16-mixed against float32 (tiny TiTok, in-process, CPU)."""

import math
from functools import partial

import lightning as L
import pytest
import torch

from torch.optim.optimizer import register_optimizer_step_pre_hook

from tokenizers_vis.evaluation import evaluate_reconstruction
from tokenizers_vis.losses.objective import ReconstructionObjective
from tokenizers_vis.metrics import ReconstructionMetrics
from tokenizers_vis.models.titok import TiTok
from tokenizers_vis.training.module import TokenizerModule

BASE_LR = 1e-3
WEIGHT_DECAY = 0.05


def tiny_titok(**kwargs) -> TiTok:
    torch.manual_seed(0)
    return TiTok(image_size=32, patch_size=8, num_latent_tokens=4, encoder_width=32, encoder_depth=1,
                 encoder_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2, codebook_size=16,
                 token_dim=4, **kwargs)


def module_for(tokenizer, **options) -> TokenizerModule:
    objective = ReconstructionObjective(lpips_weight=0.0, gan_weight=0.0, discriminator=None)
    optimizer = partial(torch.optim.AdamW, lr=BASE_LR, weight_decay=WEIGHT_DECAY)  # as Hydra's _partial_
    return TokenizerModule(tokenizer, objective, optimizer=optimizer, **options)


def batches(count: int, size: int = 4):
    generator = torch.Generator().manual_seed(1)
    return [{"image": torch.rand(size, 3, 32, 32, generator=generator)} for _ in range(count)]


def fit(module, steps: int, precision="32"):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches(steps), batch_size=None))
    return trainer


# -- learning rate ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("step", "factor"), [
    (0, 0.1), (4, 0.5), (9, 1.0),                 # linear warm-up over 10 steps, from (step + 1) / 10
    (10, 1.0), (60, 0.1 + 0.9 * 0.5), (35, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),  # cosine
    (110, 0.1), (500, 0.1),                       # the floor min_lr_ratio from total_steps on
])
def test_warmup_then_cosine_learning_rate_at_chosen_steps(step, factor):
    module = module_for(tiny_titok(), schedule={"name": "cosine", "warmup_steps": 10, "total_steps": 110,
                                                "min_lr_ratio": 0.1})
    optimizer = module.configure_optimizers()[0]
    module._set_lr([optimizer], step)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([BASE_LR * factor] * 2, rel=1e-12)


# -- weight decay ----------------------------------------------------------------------------------
def test_no_decay_groups_hold_norms_biases_tokens_and_embeddings_and_no_frozen_parameter():
    tokenizer = tiny_titok(frozen=["decoder"])
    optimizer = module_for(tokenizer).configure_optimizers()[0]
    names = {id(p): n for n, p in tokenizer.named_parameters()}
    groups = {group["weight_decay"]: {names[id(p)] for p in group["params"]} for group in optimizer.param_groups}
    assert set(groups) == {WEIGHT_DECAY, 0.0}
    no_decay, decay = groups[0.0], groups[WEIGHT_DECAY]
    # TiTok's recipe: tokens, position tables and the codebook take no weight decay, nor do 1-D tensors.
    assert {"latent_tokens", "quantize.embedding.weight", "encoder.positional_embedding",
            "encoder.class_embedding", "encoder.latent_token_positional_embedding"} <= no_decay
    assert {"encoder.ln_pre.weight", "encoder.ln_pre.bias"} <= no_decay
    assert all(tokenizer.get_parameter(n).ndim < 2 or n in tokenizer.no_weight_decay_names() for n in no_decay)
    assert "encoder.patch_embed.proj.weight" in decay and all(tokenizer.get_parameter(n).ndim >= 2 for n in decay)
    # Frozen parameters are in no group; every trainable one is in exactly one.
    trainable = {n for n, p in tokenizer.named_parameters() if p.requires_grad}
    assert not decay & no_decay and decay | no_decay == trainable
    assert not any(n.startswith("decoder.") for n in trainable)


# -- EMA -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("step", "decay"), [(0, 0.1), (90, 0.91), (50_000, 0.999)])
def test_ema_update_formula_and_its_warmup(step, decay):
    """ema <- decay * ema + (1 - decay) * weights, decay = min(ema_decay, (1 + step) / (10 + step))."""
    tokenizer = tiny_titok(frozen=["encoder"])
    module = module_for(tokenizer, ema_decay=0.999)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in tokenizer.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator))
    before = {n: p.clone() for n, p in module.ema.named_parameters()}
    module._update_ema(step)
    for name, param in tokenizer.named_parameters():
        expected = decay * before[name] + (1 - decay) * param if param.requires_grad else param
        torch.testing.assert_close(module.ema.get_parameter(name), expected, rtol=1e-6, atol=1e-6)
    # A non-finite step leaves the EMA where it was.
    after = {n: p.clone() for n, p in module.ema.named_parameters()}
    module._update_ema(step, finite=torch.tensor(False))
    assert all(torch.equal(module.ema.get_parameter(n), v) for n, v in after.items())


# -- gradient clipping -----------------------------------------------------------------------------
def gradient_norm_at_the_optimizer_step(grad_clip):
    """The total gradient norm the first optimizer step sees (after any clipping)."""
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    handle = register_optimizer_step_pre_hook(record)
    try:
        fit(module_for(tiny_titok(), grad_clip=grad_clip, ema_decay=None), steps=1)
    finally:
        handle.remove()
    assert len(norms) == 1
    return norms[0]


def test_gradient_clipping_scales_the_total_norm_to_the_limit():
    raw = gradient_norm_at_the_optimizer_step(None)
    limit = raw / 4
    assert gradient_norm_at_the_optimizer_step(limit) == pytest.approx(limit, rel=1e-4)
    # Below the limit nothing changes.
    assert gradient_norm_at_the_optimizer_step(raw * 2) == pytest.approx(raw, rel=1e-6)


# -- bf16-mixed against float32 --------------------------------------------------------------------
def flat(tokenizer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in tokenizer.parameters()])


def test_bf16_mixed_training_and_evaluation_stay_within_tolerance_of_float32():
    """Six steps from the same weights on the same batches, then evaluation of both results in both
    precisions. Tolerances, about 3x and 25x the measured differences (1.5% of the update; 4e-4 dB,
    8e-6 SSIM): the total weight update within 5% of float32's, PSNR within 0.01 dB, SSIM 1e-4.
    Each bf16 result must also differ from float32's, or autocast was not on at all."""
    start = flat(tiny_titok())
    results = {}
    for precision in ("32", "bf16-mixed"):
        module = module_for(tiny_titok(), ema_decay=None)
        fit(module, steps=6, precision=precision)
        assert module.trainer.precision == {"32": "32-true"}.get(precision, precision)
        assert all(p.dtype == torch.float32 for p in module.tokenizer.parameters())  # mixed: float32 weights
        results[precision] = module.tokenizer.eval()
    update32, update16 = flat(results["32"]) - start, flat(results["bf16-mixed"]) - start
    assert update32.norm() > 1e-3 * start.norm()  # it trained
    assert 0 < (update16 - update32).norm() < 0.05 * update32.norm()
    images = [{"image": b["image"]} for b in batches(2)]
    measured = {}
    for name, tokenizer in results.items():
        for precision in ("32", "bf16-mixed"):
            metrics = ReconstructionMetrics(16, fid=False, lpips=False)
            measured[name, precision] = evaluate_reconstruction(tokenizer, images, metrics, precision=precision,
                                                                progress=False)
    reference = measured["32", "32"]
    assert math.isfinite(reference["psnr"]) and reference["num_images"] == 8
    for key, value in measured.items():
        assert abs(value["psnr"] - reference["psnr"]) < 0.01, key
        assert abs(value["ssim"] - reference["ssim"]) < 1e-4, key
    assert measured["32", "bf16-mixed"]["psnr"] != reference["psnr"]  # bf16 evaluation ran in bf16
