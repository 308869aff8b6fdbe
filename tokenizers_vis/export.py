"""Export a training checkpoint as a Hugging Face model folder, optionally pushing it to the Hub.

    python -m tokenizers_vis.export CKPT OUT_DIR [--repo-id ORG/NAME] [--push] [--private]
                                    [--raw-weights] [--license ID] [--metrics FILE ...]

OUT_DIR receives `model.safetensors` (the EMA weights unless --raw-weights), `config.json` (enough
for `load_tokenizer(OUT_DIR)` to rebuild the model without Hydra), `README.md` (the model card) and
`reconstructions.png` when the run folder holds a reconstruction grid. CKPT is a `.ckpt` of
`TokenizerModule` or a run folder (its `checkpoints/last.ckpt`). The card reads the run folder
around the checkpoint: `config.yaml`, `summary.json`, and `metrics.json` in it or in `eval*/`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import tokenizers_vis
from tokenizers_vis.card import DEFAULT_LICENSE, CardInfo, format_count, parameter_count, render_model_card
from tokenizers_vis.hub import HubTokenError, hub_token, push_to_hub
from tokenizers_vis.models.base import Tokenizer
from tokenizers_vis.models.loading import (
    CONFIG_NAME,
    EMA_PREFIX,
    WEIGHTS_NAME,
    CheckpointError,
    load_folder,
    read_checkpoint,
    save_pretrained,
    tokenizer_from_checkpoint,
)

CARD_NAME = "README.md"
GRID_NAME = "reconstructions.png"
VIDEO_NAME = "reconstructions.mp4"  # video tokenizers: the run's clip grid (originals above, reconstructions below)
EXPORT_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, GRID_NAME, VIDEO_NAME)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass
class Exported:
    """What `export_checkpoint` wrote: the folder, the exported model, and which weights."""

    out_dir: Path
    tokenizer: Tokenizer
    weights: str
    step: int | None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the `checkpoints/last.ckpt` of a run folder."""
    path = Path(path)
    if path.is_dir():
        last = path / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(f"{path} is a folder without checkpoints/last.ckpt; pass a .ckpt file")
        return last
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {str(path)!r}")
    return path


def find_run_dir(checkpoint_path: Path) -> Path | None:
    """The run folder of `<run>/checkpoints/x.ckpt` (or of a checkpoint lying in the run folder itself)."""
    parent = checkpoint_path.resolve().parent
    run_dir = parent.parent if parent.name == "checkpoints" else parent
    markers = ("config.yaml", "summary.json", "reconstructions")
    return run_dir if any((run_dir / m).exists() for m in markers) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        warnings.warn(f"skipping unreadable {path}: {err}", stacklevel=2)
        return None


def read_run_config(run_dir: Path | None) -> dict[str, Any] | None:
    path = run_dir / "config.yaml" if run_dir else None
    if path is None or not path.is_file():
        return None
    import yaml  # PyYAML comes with omegaconf; run configs are written resolved, so plain YAML

    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        warnings.warn(f"skipping unreadable {path}: {err}", stacklevel=2)
        return None
    return config if isinstance(config, dict) else None


def find_metrics(run_dir: Path | None, extra: Iterable[str | Path] = ()) -> list[dict[str, Any]]:
    """metrics.json of the run folder and of its `eval*/` subfolders, then the files in `extra`."""
    paths: list[Path] = []
    if run_dir is not None:
        paths += [p for p in [run_dir / "metrics.json"] if p.is_file()]
        paths += sorted(run_dir.glob("eval*/metrics.json"))
    for path in map(Path, extra):
        if not path.is_file():
            raise FileNotFoundError(f"no metrics file at {str(path)!r}")
        paths.append(path)
    entries, seen = [], set()
    for path in paths:
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        data = _read_json(path)
        if isinstance(data, dict):
            entries.append(data)
    return entries


def checkpoint_step(checkpoint: dict[str, Any]) -> int | None:
    """The module's own step counter (saved as the `step` buffer), else Lightning's global_step."""
    step = checkpoint.get("state_dict", {}).get("step")
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        return int(step)
    return int(checkpoint["global_step"]) if "global_step" in checkpoint else None


def find_grid(run_dir: Path | None, step: int | None, suffix: str = ".png") -> Path | None:
    """The reconstruction grid (`.png`, or `.mp4` for video) logged at `step`, else the newest one."""
    grids = sorted(run_dir.glob(f"reconstructions/step_*{suffix}")) if run_dir else []
    if not grids:
        return None
    exact = run_dir / "reconstructions" / f"step_{step:07d}{suffix}" if step is not None else None
    return exact if exact is not None and exact.is_file() else grids[-1]


def _grid_step(path: Path) -> int | None:
    match = re.fullmatch(r"step_(\d+)", path.stem)
    return int(match.group(1)) if match else None


def _prepare_out_dir(out_dir: Path) -> None:
    # Refuse folders holding anything else: `--push` uploads the whole folder.
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES)
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise FileExistsError(f"{out_dir} holds files an export does not write ({shown}); "
                                  f"choose an empty or new folder")
    out_dir.mkdir(parents=True, exist_ok=True)


def _verify(out_dir: Path, tokenizer: Tokenizer) -> None:
    """Reload the folder the way `load_tokenizer` does and compare every tensor."""
    reloaded = load_folder(out_dir).state_dict()
    for name, value in tokenizer.state_dict().items():
        if not torch.equal(reloaded[name], value):
            raise RuntimeError(f"the exported folder does not reproduce the checkpoint ({name} differs)")


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    repo_id: str | None = None,
    use_ema: bool = True,
    license: str = DEFAULT_LICENSE,
    metrics_files: Iterable[str | Path] = (),
) -> Exported:
    """Write the model folder for `checkpoint` into `out_dir` (see the module doc)."""
    checkpoint_path = resolve_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    state = read_checkpoint(checkpoint_path)
    try:
        tokenizer = tokenizer_from_checkpoint(state, use_ema=use_ema)
    except RuntimeError as err:  # strict load_state_dict: the model code changed since training
        model_type = state["tokenizer_config"].get("model_type")
        raise CheckpointError(f"the weights in {checkpoint_path} do not fit the current `{model_type}` model "
                              f"code (saved by another version of tokenizers_vis?): {err}") from err
    has_ema = any(k.startswith(EMA_PREFIX) for k in state.get("state_dict", {}))
    weights = "EMA" if use_ema and has_ema else "raw"
    step = checkpoint_step(state)

    run_dir = find_run_dir(checkpoint_path)
    run_config = read_run_config(run_dir)
    summary = _read_json(run_dir / "summary.json") if run_dir and (run_dir / "summary.json").is_file() else None
    summary = summary if isinstance(summary, dict) else {}
    experiment = (run_config or {}).get("name") or summary.get("name")
    # The end-of-training validation describes the final weights only.
    validation = summary.get("val_after") if step is not None and summary.get("steps") == step else None
    grid = find_grid(run_dir, step)
    video = find_grid(run_dir, step, ".mp4") if tokenizer.input_kind == "video" else None
    metrics = find_metrics(run_dir, metrics_files)

    _prepare_out_dir(out_dir)
    save_pretrained(tokenizer, out_dir, extra_config={
        "_tokenizers_vis_version": tokenizers_vis.__version__, "_weights": weights.lower(), "_step": step,
    })
    _verify(out_dir, tokenizer)
    for source, name in ((grid, GRID_NAME), (video, VIDEO_NAME)):
        if source is not None:
            shutil.copyfile(source, out_dir / name)
        else:
            (out_dir / name).unlink(missing_ok=True)  # left by an earlier export of another run
    info = CardInfo(
        repo_id=repo_id, weights=weights, experiment=experiment, run_config=run_config, step=step,
        metrics=metrics, validation=validation,
        grid=GRID_NAME if grid is not None else None, grid_step=_grid_step(grid) if grid is not None else None,
        video=VIDEO_NAME if video is not None else None,
        license=license,
    )
    (out_dir / CARD_NAME).write_text(render_model_card(tokenizer, info))
    return Exported(out_dir=out_dir, tokenizer=tokenizer, weights=weights, step=step)


def _repo_id(text: str) -> str:
    if not REPO_ID.match(text):
        raise argparse.ArgumentTypeError(f"expected ORG/NAME, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tokenizers_vis.export",
        description="Export a tokenizers_vis training checkpoint as a Hugging Face model folder "
                    "(model.safetensors, config.json, README.md model card) and optionally push it.",
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="a .ckpt of TokenizerModule, or a run folder")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (new, empty, or an earlier export)")
    parser.add_argument("--repo-id", type=_repo_id, metavar="ORG/NAME",
                        help="Hub repository (names the card and its usage snippet; required by --push)")
    parser.add_argument("--push", action="store_true", help="create the Hub repo and upload OUT_DIR to it")
    parser.add_argument("--private", action="store_true", help="with --push: create the repo as private")
    parser.add_argument("--raw-weights", action="store_true",
                        help="export the raw training weights instead of the EMA weights")
    parser.add_argument("--license", default=DEFAULT_LICENSE, help=f"license id of the weights ({DEFAULT_LICENSE})")
    parser.add_argument("--metrics", action="append", default=[], metavar="FILE",
                        help="a metrics.json to add to the card (repeatable); the run folder's are found anyway")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.push and not args.repo_id:
        parser.error("--push needs --repo-id ORG/NAME")
    if args.private and not args.push:
        parser.error("--private applies only with --push")
    try:
        token = hub_token() if args.push else None  # fail before the export, not after it
        exported = export_checkpoint(args.checkpoint, args.out_dir, repo_id=args.repo_id,
                                     use_ema=not args.raw_weights, license=args.license, metrics_files=args.metrics)
        tokenizer = exported.tokenizer
        print(f"exported the {exported.weights} weights of a {tokenizer.model_type} tokenizer "
              f"({format_count(parameter_count(tokenizer))} parameters, step {exported.step}) to {exported.out_dir}")
        if args.push:
            url = push_to_hub(exported.out_dir, args.repo_id, private=args.private, token=token)
            print(f"pushed to {url}")
    except (OSError, CheckpointError, HubTokenError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
