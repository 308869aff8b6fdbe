"""Lightning DDP with 2 CPU processes: train batches differ by rank (even with shards that do not
divide evenly), val sees each image once, and a checkpoint holds every rank's data position."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tokenizers_vis.data import write_shards

from .conftest import make_samples

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning as L
    import torch
    from tokenizers_vis.data import ImageDataModule

    shards, out = sys.argv[1], sys.argv[2]

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.train_keys, self.val_keys = [], []

        def training_step(self, batch, batch_idx):
            self.train_keys.append(batch["key"])
            return (batch["image"].mean() - self.weight) ** 2

        def validation_step(self, batch, batch_idx):
            self.val_keys += batch["key"]

        def on_train_end(self):
            with open(f"{out}/rank{self.global_rank}.json", "w") as f:
                json.dump({"train": self.train_keys, "val": self.val_keys}, f)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    if __name__ == "__main__":
        dm = ImageDataModule(f"{shards}/train-*.tar", f"{shards}/val-*.tar", resolution=16, batch_size=3,
                             num_workers=1, shuffle_buffer=8, val_max_images=9)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, val_check_interval=4,
                            num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(Recorder(), datamodule=dm)
        trainer.save_checkpoint(f"{out}/ddp.ckpt")  # on every rank, as Lightning requires
    """
)


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    # 3 train shards (5 + 5 + 2 samples) over 2 ranks: rank 0 reads two, rank 1 one.
    write_shards(make_samples(), tmp_path, "train", 5)
    write_shards(make_samples(), tmp_path, "val", 100)  # one shard, split by sample
    (tmp_path / "run.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    result = subprocess.run(
        [sys.executable, "run.py", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["val"] == [f"img{i:03d}" for i in range(0, 9, 2)]
    assert ranks[1]["val"] == [f"img{i:03d}" for i in range(1, 9, 2)]
    assert all(len(r["train"]) == 4 and all(len(b) == 3 for b in r["train"]) for r in ranks)
    # Each rank reads its own shards: the two ranks never see the same train key.
    train = [set(sum(r["train"], [])) for r in ranks]
    assert not train[0] & train[1]
    assert train[1] <= {f"img{i:03d}" for i in range(5, 10)}
    # The checkpoint (written by rank 0) holds both ranks' positions in their streams.
    state = torch.load(tmp_path / "ddp.ckpt", weights_only=False)["ImageDataModule"]
    assert state["world_size"] == 2 and state["consumed_batches"] == 4 and len(state["positions"]) == 2
    assert all(sum(p) == 12 for p in state["positions"])  # 4 batches of 3, no unreadable sample
