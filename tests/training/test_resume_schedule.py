"""A checkpoint records the length of its learning-rate schedule; resuming into a schedule of
another length (a new trainer.max_steps while model.schedule.total_steps is null) warns."""

import warnings

import hydra
import lightning as L
import pytest
from helpers import compose_train

from tokenizers_vis.config import prepare_config


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    cfg = prepare_config(compose_train(["experiment=titok_b", "debug=smoke", "model.objective.lpips_weight=0",
                                        "model.objective.convnext_weight=0"], tmp_path_factory.mktemp("run")))
    return hydra.utils.instantiate(cfg.model)


def attach(module, max_steps: int, total_steps: int | None) -> None:
    module.schedule["total_steps"] = total_steps
    module.trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def saved_by(module, max_steps: int, total_steps: int | None) -> dict:
    attach(module, max_steps, total_steps)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    return checkpoint


def test_a_checkpoint_records_its_schedule_length(module):
    assert saved_by(module, 20, None)["training_state"]["schedule_total_steps"] == 20
    assert saved_by(module, 20, 500)["training_state"]["schedule_total_steps"] == 500


def test_resuming_into_a_longer_schedule_warns(module):
    checkpoint = saved_by(module, 20, None)
    attach(module, 40, None)
    with pytest.warns(UserWarning, match=r"schedule is 20 steps long, this run's is 40 \(from trainer\.max_steps, "
                                         r"as model\.schedule\.total_steps is null\).*model\.schedule\.total_steps=20"):
        module.on_load_checkpoint(checkpoint)


@pytest.mark.parametrize(("saved", "resumed"), [
    ((20, None), (20, None)),    # same max_steps
    ((20, 100), (40, 100)),      # a fixed schedule: max_steps does not matter
    ((100, None), (40, 100)),    # max_steps changed, total_steps fixed to the old length
])
def test_resuming_the_same_schedule_does_not_warn(module, saved, resumed):
    checkpoint = saved_by(module, *saved)
    attach(module, *resumed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.on_load_checkpoint(checkpoint)


def test_checkpoints_without_the_record_load_silently(module):
    checkpoint = saved_by(module, 20, None)
    del checkpoint["training_state"]["schedule_total_steps"]
    attach(module, 40, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.on_load_checkpoint(checkpoint)
