from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tokenizers_vis.data import ImageDataModule, write_shards

from .conftest import NUM_IMAGES, make_samples

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
RES = 16


def make_dm(shard_dir, **kw):
    args = dict(
        train_shards=str(shard_dir / "train-*.tar"),
        val_shards=str(shard_dir / "train-{000000..000002}.tar"),
        resolution=RES,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=8,
    )
    return ImageDataModule(**{**args, **kw})


def test_missing_shards_fail_at_setup_naming_the_pattern(tmp_path, shard_dir):
    pattern = str(tmp_path / "nowhere" / "train-{000000..000009}.tar")
    dm = make_dm(shard_dir, train_shards=pattern)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dm.setup("fit")
    dm = make_dm(shard_dir, val_shards=str(tmp_path / "val-*.tar"))
    with pytest.raises(FileNotFoundError, match=r"val-\*\.tar"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="interpolation"):
        make_dm(shard_dir, interpolation="bicubicc")


def test_loaders_outside_a_trainer(shard_dir):
    dm = make_dm(shard_dir, val_batch_size=5, val_max_images=7)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, RES, RES) and batch["label"].dtype == torch.long
    val = list(dm.val_dataloader())
    assert [len(b["key"]) for b in val] == [5, 2]
    assert [k for b in val for k in b["key"]] == [f"img{i:03d}" for i in range(7)]
    assert len(list(dm.test_dataloader())) == 2
    assert make_dm(shard_dir, val_shards=None).val_dataloader() == []
    assert dm.skip_counter.skipped == 0


def _corrupt_shards(tmp_path):
    samples = make_samples()
    samples.insert(2, {"__key__": "garbage", "png": b"not a png"})
    write_shards(samples, tmp_path / "bad", "train", 4)
    return tmp_path / "bad"


@pytest.mark.filterwarnings("ignore::tokenizers_vis.data.pipeline.CorruptSampleWarning")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_dict_resumes_the_train_stream_exactly(tmp_path, num_workers):
    shards = _corrupt_shards(tmp_path)
    dm = make_dm(shards, num_workers=num_workers, batch_size=3)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    for _ in range(5):  # what Lightning does with each batch a training step takes
        dm.on_before_batch_transfer(next(it), 0)
    state = dm.state_dict()
    # Prefetched batches that no step took are not part of the position.
    later = [next(it) for _ in range(4)]
    assert state["epoch"] == 1 and state["consumed_batches"] == 5
    assert state["num_workers"] == max(1, num_workers) and state["world_size"] == 1
    assert len(state["positions"]) == 1 and state["skipped"][0] == dm.skipped_samples()["train"]

    resumed = make_dm(shards, num_workers=num_workers, batch_size=3)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    again_it = iter(resumed.train_dataloader())
    again = [resumed.on_before_batch_transfer(next(again_it), 0) for _ in range(4)]
    for a, b in zip(again, later):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    assert resumed.state_dict()["consumed_batches"] == 9
    # The garbage sample is counted once over the whole run, resumed or not.
    straight = make_dm(shards, num_workers=num_workers, batch_size=3)
    straight_it = iter(straight.train_dataloader())
    for _ in range(9):
        straight.on_before_batch_transfer(next(straight_it), 0)
    assert resumed.skipped_samples()["train"] == straight.skipped_samples()["train"] >= 1
    assert resumed.state_dict()["positions"] == straight.state_dict()["positions"]


def test_other_worker_count_starts_a_new_pass(shard_dir):
    dm = make_dm(shard_dir, num_workers=0)
    it = iter(dm.train_dataloader())
    dm.on_before_batch_transfer(next(it), 0)
    state = dm.state_dict()
    other = make_dm(shard_dir, num_workers=2)
    other.load_state_dict(state)
    with pytest.warns(UserWarning, match="new pass"):
        loader = other.train_dataloader()
    assert next(iter(loader))["stream"].epoch == state["epoch"] + 1
    # A checkpoint of the earlier format (epoch only) also starts the next pass.
    old = make_dm(shard_dir)
    old.load_state_dict({"train_epoch": 3})
    assert next(iter(old.train_dataloader()))["stream"].epoch == 4


def test_missing_train_shards_fail_in_check_sources(tmp_path, shard_dir):
    dm = make_dm(shard_dir, train_shards=str(tmp_path / "nowhere" / "*.tar"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dm.check_sources()


class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.train_shapes, self.val_keys = [], []

    def training_step(self, batch, batch_idx):
        self.train_shapes.append(tuple(batch["image"].shape))
        return (batch["image"].mean() - self.weight) ** 2

    def validation_step(self, batch, batch_idx):
        self.val_keys += batch["key"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_runs_train_and_full_val(tmp_path, shard_dir):
    dm = make_dm(shard_dir, num_workers=1)
    model = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        val_check_interval=3,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert model.train_shapes == [(4, 3, RES, RES)] * 3
    assert sorted(model.val_keys) == [f"img{i:03d}" for i in range(NUM_IMAGES)]


def _compose_data(tmp_path, option, overrides=()):
    (tmp_path / "conf").mkdir(exist_ok=True)
    (tmp_path / "conf" / "main.yaml").write_text(
        "defaults:\n  - data: demo\n  - _self_\n"
        f"paths:\n  data_dir: {tmp_path}\n"
        f"hydra:\n  searchpath:\n    - file://{CONF_DIR}\n"
    )
    with initialize_config_dir(config_dir=str(tmp_path / "conf"), version_base="1.3"):
        return compose(config_name="main", overrides=[f"data={option}", *overrides])


def test_data_configs_compose_and_instantiate(tmp_path):
    write_shards(make_samples(6), tmp_path / "demo", "train", 4)
    write_shards(make_samples(6, seed=1), tmp_path / "demo", "val", 4)
    cfg = _compose_data(tmp_path, "demo")
    dm = instantiate(cfg.data)
    assert isinstance(dm, ImageDataModule)
    assert (dm.resolution, dm.batch_size, dm.num_workers, dm.shuffle_buffer, dm.val_max_images) == (64, 16, 2, 256, 32)
    dm.setup("fit")
    assert len(dm.train_urls) == 2 and len(dm.val_urls) == 2

    generic = _compose_data(tmp_path, "webdataset").data
    assert OmegaConf.is_missing(generic, "train_shards") and OmegaConf.is_missing(generic, "val_shards")
    assert (generic.resolution, generic.batch_size, generic.num_workers, generic.shuffle_buffer) == (256, 32, 8, 10000)

    imagenet = _compose_data(tmp_path, "imagenet", ["+seed=7"]).data
    assert imagenet.train_shards == f"{tmp_path}/imagenet/train-{{000000..001281}}.tar"
    assert imagenet.val_shards == f"{tmp_path}/imagenet/val-{{000000..000049}}.tar"
    assert imagenet.resolution == 256 and imagenet.seed == 7 and imagenet.num_workers == 8
    with pytest.raises(FileNotFoundError, match="imagenet/train"):
        instantiate(imagenet).setup("fit")
