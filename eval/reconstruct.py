"""Reconstruction metrics of a tokenizer: rFID, PSNR, SSIM, LPIPS, codebook usage.

    python eval/reconstruct.py tokenizer=outputs/demo/checkpoints/last.ckpt data=demo
    python eval/reconstruct.py tokenizer=DIR data='/x/val-{000000..000049}.tar' inception_weights=PATH
    python eval/reconstruct.py tokenizer=DIR data=imagenet devices=8          # 8 processes, one node
    python eval/reconstruct.py tokenizer=outputs/flextok_demo/checkpoints/last.ckpt data=demo tokens=[1,2,4,8,16]
    python eval/reconstruct.py tokenizer=outputs/demo/checkpoints/last.ckpt data=demo_video frames=16 resolution=64
    python eval/reconstruct.py tokenizer=DIR data=/x/videos frames=16 fps=8 i3d_weights=PATH   # a folder of videos
    torchrun --nproc-per-node 8 eval/reconstruct.py tokenizer=DIR data=imagenet hydra.run.dir=DIR

Writes `<output_dir>/metrics.json` and `<output_dir>/grid.png` (conf/eval.yaml; the logic is
tokenizers_vis/evaluation.py); with several token counts (`tokens=[1,2,4,8,16]`, variable-length
tokenizers) also `per_k.png` (metrics against the count) and `k_grid.png` (images decoded at
each). Video data (a video preset, a folder of videos, video shards, or `frames=N`) goes to
tokenizers_vis/video_evaluation.py: metrics.json with rFVD, temporal error and per-video lists,
`grid.mp4` and `frames.png`; an image tokenizer is applied frame by frame. Exits non-zero when
strict_fid / strict_lpips / strict_fvd is set and the weights are missing.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tokenizers_vis.evaluation import run_evaluation
from tokenizers_vis.nn.weights import MissingWeightsError
from tokenizers_vis.video_evaluation import is_video_config, run_video_evaluation

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def data_as_value(argv: list[str]) -> list[str]:
    """`data=X` -> `data_source='X'`.

    Hydra reads `data=X` as picking a file of the config group conf/data/, but X may also be a
    folder or a shard pattern, so it is passed as a plain value; quoted, because Hydra's override
    grammar would read the braces of `/x/val-{000000..000009}.tar` as a dict. Values already
    quoted, and lists (`data=[a,b]`), are left as they are.
    """
    out = []
    for arg in argv:
        if arg.startswith("data="):
            value = arg[len("data="):]
            if not value.startswith(("'", '"', "[")):
                value = f"'{value}'" if "'" not in value else f'"{value}"'
            arg = f"data_source={value}"
        out.append(arg)
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    try:
        run = run_video_evaluation if is_video_config(cfg, CONF_DIR) else run_evaluation
        run(cfg, conf_dir=CONF_DIR)
    except MissingWeightsError as err:
        # A plain message and exit status 1, not Hydra's traceback: this is a setup problem.
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    sys.argv = data_as_value(sys.argv)  # in place: processes launched by devices=N re-run sys.argv
    main()
