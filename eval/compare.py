"""Compare tokenizers side by side on one image set: a leaderboard, rate-distortion curves and a
visual grid, every number from the evaluator of eval/reconstruct.py.

    python eval/compare.py tokenizers=[outputs/demo/checkpoints/last.ckpt,outputs/tokenflow_demo/RUN/checkpoints/last.ckpt] data=demo resolution=64
    python eval/compare.py 'tokenizers=[DIR_A,{path:DIR_B,label:FlexTok,steps:10,tokens:[1,4,16,64]}]' data=/x/photos resolution=256
    python eval/compare.py tokenizers=[...] data='/x/val-{000000..000049}.tar' resolution=256 inception_weights=PATH

Quote entries with braces (mappings) in the shell, or bash expands them. Writes into
`<output_dir>` (conf/compare.yaml; the logic is tokenizers_vis/comparison.py): leaderboard.md,
.csv and .json, rate_distortion.png, compare_grid.png, and models/<label>/ with each model's
metrics.json and grid.png. Finished models are cached (cache_dir), so adding one to a comparison
evaluates only the new one. Exits non-zero with a message naming the entry when an entry cannot be
used; a missing path is found before any model runs.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval/reconstruct.py, also when imported by path
from reconstruct import data_as_value  # noqa: E402  (the same `data=` handling)

from tokenizers_vis.comparison import EntryError, run_comparison  # noqa: E402
from tokenizers_vis.nn.weights import MissingWeightsError  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@hydra.main(version_base="1.3", config_path="../conf", config_name="compare.yaml")
def main(cfg: DictConfig) -> None:
    try:
        run_comparison(cfg, conf_dir=CONF_DIR)
    except (EntryError, MissingWeightsError) as err:
        # A plain message and exit status 1, not Hydra's traceback: the command line needs fixing.
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    sys.argv = data_as_value(sys.argv)
    main()
