"""Train a tokenizer.

    python train.py experiment=titok_b                       # one GPU
    python train.py experiment=titok_b trainer=ddp trainer.devices=8 trainer.num_nodes=4
    python train.py experiment=titok_b debug=smoke           # tiny CPU run of any experiment
    python train.py experiment=demo hydra.run.dir=outputs/demo ckpt_path=last   # resume

Composes `conf/train.yaml`, then fits, validates the final EMA weights and writes
`<run>/summary.json` (see tokenizers_vis/training/run.py). On SIGTERM / SIGUSR1 it saves
`<run>/checkpoints/last.ckpt` and exits with 128 + the signal number (143, 138), the shell's
code for "stopped by a signal", so a retry loop or scheduler knows to resume it.
"""

import json
import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tokenizers_vis.config import register_resolvers
from tokenizers_vis.training.run import run_training

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train.yaml")
def main(cfg: DictConfig) -> None:
    summary = run_training(cfg, cli_overrides=HydraConfig.get().overrides.task)
    print(json.dumps(summary, indent=2))
    if "preempted" in summary:
        sys.exit(128 + signal.Signals[summary["preempted"]])


if __name__ == "__main__":
    main()
