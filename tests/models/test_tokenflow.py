"""TokenFlow's defining properties on tiny random models (no reference files needed)."""

import pytest
import torch

from tokenizers_vis.hub import load_tokenizer, save_pretrained
from tokenizers_vis.losses.distillation import DistillationObjective
from tokenizers_vis.models import build_tokenizer
from tokenizers_vis.models.tokenflow import TokenFlow

TINY_CLIP = {"kind": "openai_clip", "pretrained": None, "seed": 3,
             "config": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2, "output_dim": 24}}


def tiny(**overrides):
    kwargs = dict(image_size=32, semantic_encoder=TINY_CLIP, semantic_decoder_width=32, semantic_decoder_depth=1,
                  semantic_decoder_heads=2, semantic_out_dim=24, pixel_channels=32, pixel_channel_mult=(1, 1, 1, 1),
                  pixel_num_res_blocks=1, z_channels=32, codebook_size=64, scales=(1, 2, 4), drop_scale_prob=0.0)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return TokenFlow(**kwargs)


@pytest.fixture(scope="module")
def model():
    return tiny().eval()


def images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_id_count_is_the_sum_of_squared_scales_and_layout(model):
    encoded = model.encode(images())
    assert model.num_tokens == 1 + 4 + 16 == encoded.ids.shape[1]
    assert model.id_layout() == [(1, 0, 1), (2, 1, 4), (4, 5, 16)]
    assert encoded.extras["scales"] == [1, 2, 4]
    assert int(encoded.ids.min()) >= 0 and int(encoded.ids.max()) < 64


@torch.no_grad()
def test_decode_of_ids_equals_decode_of_the_quantized_features(model):
    encoded = model.encode(images())
    from_features = model.decode(encoded.latents)
    from_ids = model.decode(encoded.ids)
    assert (from_features - from_ids).abs().max() < 1e-5
    assert from_ids.shape == (2, 3, 32, 32)


def test_decode_rejects_id_counts_that_are_not_whole_scales(model):
    ids = model.encode(images()).ids
    for bad in (ids[:, :-1], ids[:, :2], torch.cat([ids, ids[:, :1]], dim=1)):
        with pytest.raises(ValueError, match=r"expected 21 ids \(scales \[1, 2, 4\]\)"):
            model.decode(bad)
    with pytest.raises(ValueError, match="token ids must lie in"):
        model.decode(torch.full_like(ids, 64))
    model.decode(ids[:, :5])  # whole scales: fine


def test_semantic_features_have_the_teacher_width(model):
    ids = model.encode(images()).ids
    assert model.semantic_features(ids).shape == (2, 16, 24)  # 4 x 4 grid, CLIP projection width 24


def test_wrong_images_and_configs_fail_clearly():
    with pytest.raises(ValueError, match="last scale must equal the feature grid 4"):
        tiny(scales=(1, 2, 8))
    with pytest.raises(ValueError, match="trainable must be one of"):
        tiny(trainable="encoder")
    with pytest.raises(ValueError, match="expects 32x32 images"):
        tiny().encode(images(size=64))


def test_scale_drop_is_seeded_and_never_drops_the_first_scale():
    model = tiny(drop_scale_prob=1.0).train()
    x = images()

    def dropped(seed):
        torch.manual_seed(seed)
        ids = model.encode(x).ids
        return tuple(s for s, start, count in model.id_layout() if bool((ids[:, start:start + count] < 0).all()))

    runs = [dropped(seed) for seed in range(6)]
    assert all(len(d) == 1 and d[0] != 1 for d in runs)   # always one scale, never the first
    assert dropped(4) == runs[4]                            # same seed, same choice
    assert len(set(runs)) > 1                               # and the choice does vary


def test_stage_two_trains_only_the_pixel_decoder():
    model = tiny(trainable="pixel_decoder").train()
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"post_quant_conv", "decoder"}
    assert not model.quantize.training and model.decoder.training


def test_save_and_reload_round_trip(tmp_path, model):
    save_pretrained(model, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).ids, model.encode(x).ids)
        assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
    assert build_tokenizer(model.config).num_tokens == model.num_tokens


def test_teacher_starts_equal_to_the_semantic_tower_and_distillation_is_zero_at_a_perfect_prediction():
    model = tiny()
    teacher = model.build_teacher()
    tower = model.semantic_encoder.model.state_dict()
    for name, value in teacher.model.state_dict().items():
        if name in tower:
            assert torch.equal(value, tower[name]), name
    assert "proj" in dict(teacher.model.named_parameters()) and "proj" not in tower

    objective = DistillationObjective(distill_weight=1.0, lpips_weight=0.0, gan_weight=0.0, discriminator=None)
    objective.prepare(model)
    x = images()
    loss, logs, output = objective(model, x, step=0)
    assert 0.0 <= float(logs["loss/distill"]) <= 2.0
    assert all(not p.requires_grad for p in objective.frozen["teacher"].parameters())
    loss.backward()
    assert model.encode_task_layer[0].weight.grad is not None
    assert model.semantic_decoder.patch_embed.proj.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_decode_num_tokens_keeps_a_prefix_of_whole_scales(model):
    encoded = model.encode(images())
    assert model.token_prefixes == [1, 5, 21]
    assert torch.equal(model.decode(encoded, num_tokens=5), model.decode(encoded.ids[:, :5]))
    assert torch.equal(model.decode(encoded, num_tokens=21), model.decode(encoded.ids))
    with pytest.raises(ValueError, match=r"not a count of whole scales; choose one of \[1, 5, 21\]"):
        model.decode(encoded, num_tokens=4)


def test_evaluation_measures_each_scale_prefix(model, tmp_path):
    from tokenizers_vis.evaluation import evaluate_reconstruction, metrics_factory, token_counts

    with pytest.raises(ValueError, match="not a prefix of whole scales"):
        token_counts([1, 4], model)
    loader = [{"image": images(4, seed=s)} for s in range(2)]
    factory, _ = metrics_factory(model.codebook_size, fid=False, lpips=False)
    results = evaluate_reconstruction(model, loader, factory, tokens=[1, 5, 21], progress=False,
                                      k_grid_path=tmp_path / "k_grid.png")
    psnr = {int(k): v["psnr"] for k, v in results["tokens"].items()}
    assert set(psnr) == {1, 5, 21} and (tmp_path / "k_grid.png").is_file()
    assert results["tokens"][21]["psnr"] == pytest.approx(results["psnr"])  # all ids = the plain decode


def test_saved_model_records_its_tower_by_architecture_and_keeps_the_teacher_source(tmp_path):
    spec = {"kind": "openai_clip", "pretrained": str(tmp_path / "clip.pt"), "config": {"heads": 2}, "seed": 0}
    tower = tiny().build_teacher()  # a CLIP tower with its projection, saved as a "pretrained" file
    torch.save(tower.model.state_dict(), tmp_path / "clip.pt")
    model = tiny(semantic_encoder=spec).eval()
    assert model.config["semantic_encoder"]["pretrained"] is None
    assert model.config["teacher"] == spec
    save_pretrained(model, tmp_path / "tok")
    (tmp_path / "clip.pt").unlink()  # the source is gone: the saved model must not need it
    loaded = load_tokenizer(tmp_path / "tok")
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).ids, model.encode(x).ids)
    assert loaded.teacher_spec == spec


@pytest.mark.parametrize("kind", ["openai_clip", "siglip", "timm"])
def test_every_tower_kind_round_trips_through_save_and_load(kind, tmp_path):
    model = tiny(image_size=64, semantic_encoder={"kind": kind, "tiny": True}, semantic_out_dim=16,
                 pixel_channel_mult=(1, 1, 1, 1, 1)).eval()
    save_pretrained(model, tmp_path / kind)
    loaded = load_tokenizer(tmp_path / kind)
    assert loaded.config["semantic_encoder"]["kind"] == kind
    x = images(size=64)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).ids, model.encode(x).ids)
        assert torch.equal(loaded.semantic_features(model.encode(x).ids), model.semantic_features(model.encode(x).ids))


def test_every_trainable_parameter_gets_a_gradient_without_distillation():
    """DDP (no unused-parameter search) needs a gradient on every trainable parameter, also when
    the objective has no distillation term."""
    from tokenizers_vis.losses import ReconstructionObjective

    model = tiny().train()
    objective = ReconstructionObjective(lpips_weight=0.0, gan_weight=0.0, discriminator=None)
    loss, _, _ = objective(model, images(), step=0)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]


def test_training_mode_ids_with_a_dropped_scale_are_refused_clearly():
    model = tiny(drop_scale_prob=1.0).train()
    ids = model.encode(images()).ids
    with pytest.raises(ValueError, match="encode in eval mode"):
        model.decode(ids)


@pytest.mark.parametrize("kind", ["openai_clip", "siglip", "timm"])
def test_gradient_checkpointing_reaches_every_tower_kind_and_keeps_the_gradients(kind, recwarn):
    def gradients(checkpointing):
        model = tiny(image_size=64, semantic_encoder={"kind": kind, "tiny": True}, semantic_out_dim=16,
                     pixel_channel_mult=(1, 1, 1, 1, 1)).train()
        model.set_gradient_checkpointing(checkpointing)
        out = model(images(size=64))
        (out.reconstruction.square().mean() + out.aux_loss).backward()
        return model, {n: p.grad for n, p in model.semantic_encoder.named_parameters() if p.grad is not None}

    _, plain = gradients(False)
    model, checkpointed = gradients(True)
    tower = model.semantic_encoder.model
    flags = (getattr(tower, "is_gradient_checkpointing", False),                   # transformers
             getattr(tower, "grad_checkpointing", False),                          # timm
             getattr(getattr(tower, "transformer", None), "grad_checkpointing", False))  # open_clip
    assert any(flags), type(tower).__name__
    assert not [w for w in recwarn if "gradient checkpointing is not available" in str(w.message)]
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)
