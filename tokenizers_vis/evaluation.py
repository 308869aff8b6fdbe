"""Reconstruction evaluation of any tokenizer on any image set: rFID, PSNR, SSIM, LPIPS and
codebook usage, written as `metrics.json` plus `grid.png` (originals above reconstructions).
With more than one token count (variable-length tokenizers, `tokens=[1, 2, 4, ...]`) also
`per_k.png` (each metric against the number of tokens) and `k_grid.png` (a few images decoded
at each count, next to the original).

- `evaluate_reconstruction(tokenizer, loader, metrics)`: the loop, usable from Python with any
  `ReconstructionMetrics` (tests inject a small feature network for FID).
- `run_evaluation(cfg)`: the body of `eval/reconstruct.py` (conf/eval.yaml): sets up the
  processes, resolves the data, builds the metrics, writes the files.

Sharding: under torchrun (or `devices=N`, which launches N processes through Lightning Fabric)
each rank reads a disjoint share of the images (`make_eval_loader(rank, world_size)`) and every
metric's state is summed over ranks when computed, so each image counts exactly once. Only
rank 0 writes files. The real side of every metric is the very centre crop fed to the model;
`ReconstructionMetrics` rounds both sides to uint8 before measuring.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from tokenizers_vis.metrics import InceptionFeatures, LPIPSMetric, MissingWeightsError, ReconstructionMetrics, quantize
from tokenizers_vis.metrics.distributed import all_reduce_sum

__all__ = [
    "GRID_FILE",
    "K_GRID_FILE",
    "METRICS_FILE",
    "PER_K_PLOT_FILE",
    "Processes",
    "evaluate_reconstruction",
    "json_ready",
    "metrics_factory",
    "resolve_data_source",
    "run_evaluation",
    "setup_processes",
    "token_counts",
    "write_grid",
    "write_k_grid",
    "write_per_k_plot",
]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
GRID_FILE = "grid.png"
PER_K_PLOT_FILE = "per_k.png"
K_GRID_FILE = "k_grid.png"
# Metrics drawn in per_k.png, in panel order, when measured (None / non-finite values are left out).
PER_K_METRICS = {"psnr": "PSNR (dB)", "rfid": "rFID", "ssim": "SSIM", "lpips": "LPIPS"}
# Autocast dtype around encode/decode, by Lightning's precision names; metrics stay float32/64.
PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16}
# How PSNR/SSIM are measured (tokenizers_vis/metrics/image.py), recorded in every metrics.json.
PSNR_SSIM_SETTINGS = (
    "both images rounded to uint8, then per image on [0, 1] with data_range 1 and averaged over images; "
    "SSIM: Gaussian window sigma 1.5 (11 px), K1 0.01, K2 0.03, per channel, border pixels excluded "
    "(equal to scikit-image with gaussian_weights=True, use_sample_covariance=False)"
)

MetricsFactory = Callable[[], ReconstructionMetrics]


# -- token counts (variable-length tokenizers) ---------------------------------------------------
def is_variable_length(tokenizer: nn.Module) -> bool:
    """Variable-length tokenizers (FlexTok) name `num_tokens` in their `decode` signature."""
    return "num_tokens" in inspect.signature(tokenizer.decode).parameters


def token_counts(tokens: int | Sequence[int] | None, tokenizer: nn.Module) -> list[int]:
    """The sorted token counts to measure; checks each against what the tokenizer can decode."""
    if tokens is None:
        return []
    values = [tokens] if isinstance(tokens, (int, str)) else list(tokens)
    full = int(tokenizer.num_tokens)
    counts = sorted({int(v) for v in values})
    allowed = getattr(tokenizer, "token_prefixes", None)  # multi-scale models: whole scales only
    for k in counts:
        if not 1 <= k <= full:
            raise ValueError(f"tokens={k} is outside 1..{full} (the tokenizer's num_tokens)")
        if allowed is not None and k not in allowed:
            raise ValueError(f"tokens={k} is not a prefix of whole scales of this {type(tokenizer).__name__}; "
                             f"choose from {list(allowed)}")
        if k != full and not is_variable_length(tokenizer):
            raise ValueError(
                f"{type(tokenizer).__name__} is a fixed-length tokenizer ({full} tokens per image), so tokens={k} "
                f"cannot be decoded; drop `tokens` or pass tokens={full}. Per-length metrics need a variable-length "
                "tokenizer (one whose decode takes num_tokens)."
            )
    return counts


# -- metrics ------------------------------------------------------------------------------------
def metrics_factory(
    codebook_size: int | None,
    fid: bool | nn.Module = True,
    lpips: bool = True,
    inception_weights: str | os.PathLike | None = None,
    lpips_weights: str | os.PathLike | None = None,
    strict_fid: bool = False,
    strict_lpips: bool = False,
    download: bool = True,
) -> tuple[MetricsFactory, dict[str, str]]:
    """A factory of empty `ReconstructionMetrics` sharing one Inception and one LPIPS network
    (one accumulator per token count, one copy of each network), and notes on what is skipped.

    Weights missing from the torch hub cache are fetched there (checksum checked) unless `download`
    is False or HF_HUB_OFFLINE is set. Still missing: the metric is left out (reported as None) with
    a warning naming the file and the option to set, recorded in the notes; with `strict_fid` /
    `strict_lpips` they raise `MissingWeightsError` instead.
    """
    notes: dict[str, str] = {}
    fid_net: nn.Module | None = fid if isinstance(fid, nn.Module) else None
    if fid is True:
        try:
            fid_net = InceptionFeatures(inception_weights, download=download)
        except MissingWeightsError as err:
            if strict_fid:
                raise
            notes["rfid"] = f"not computed (rfid: null): {err}"
            if _rank() == 0:
                log.warning("rFID will not be computed (rfid: null; strict_fid=true makes this an error): %s", err)
    lpips_net: LPIPSMetric | None = None
    if lpips:
        try:
            lpips_net = LPIPSMetric(lpips_weights, download=download)
        except MissingWeightsError as err:
            if strict_lpips:
                raise
            notes["lpips"] = f"not computed (lpips: null): {err}"
            if _rank() == 0:
                log.warning("LPIPS will not be computed (lpips: null; strict_lpips=true makes this an error): %s", err)

    def build() -> ReconstructionMetrics:
        metrics = ReconstructionMetrics(codebook_size, fid=fid_net if fid_net is not None else False, lpips=False)
        metrics.lpips = lpips_net  # shared: ReconstructionMetrics would build its own copy from a flag
        return metrics

    return build, notes


# -- the loop -----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_reconstruction(
    tokenizer: nn.Module,
    loader: Iterable,
    metrics: ReconstructionMetrics | MetricsFactory,
    tokens: int | Sequence[int] | None = None,
    *,
    device: torch.device | str | None = None,
    precision: str = "32",
    grid_path: str | os.PathLike | None = None,
    grid_images: int = 8,
    k_grid_path: str | os.PathLike | None = None,
    k_grid_images: int = 4,
    k_grid_min_tile: int = 1,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, Any]:
    """Reconstruct every batch of `loader` and measure it; returns the metrics over all ranks.

    Args:
        tokenizer: anything with `encode(x) -> Encoded` and `decode(encoded)` on [0, 1] images.
        loader: batches of {"image": (B, 3, R, R) in [0, 1]} (or bare image tensors); under
            torch.distributed each rank passes its own disjoint share.
        metrics: an empty `ReconstructionMetrics`, or a factory of them (needed when `tokens`
            asks for lengths other than the full one: one accumulator per length).
        tokens: token counts to measure as well, decoded with `decode(encoded, num_tokens=k)`
            and counting codes in the first k ids; results go under `"tokens"` keyed by k.
        device: where to run; default the tokenizer's device.
        precision: "32" or "bf16-mixed" (autocast around encode/decode only).
        grid_path: rank 0 writes its first `grid_images` originals above their reconstructions here.
        k_grid_path: with more than one token count, rank 0 writes its first `k_grid_images`
            images here, one per row: the original, then the decode at each count (`write_k_grid`),
            tiles enlarged (nearest) to at least `k_grid_min_tile` pixels.
        progress: tqdm bar (rank 0) counting images; `total` is this rank's image count if known.

    Returns:
        `ReconstructionMetrics.compute()` at the full length (psnr, ssim, lpips, rfid,
        codebook_usage, codebook_entropy, codebook_perplexity, num_images; None for what was not
        computed, psnr may be inf), plus {"tokens": {k: the same}} when `tokens` is given. Every
        rank must call this (the metrics are reduced with collectives); all get the same dict.
    """
    counts = token_counts(tokens, tokenizer)
    full = int(getattr(tokenizer, "num_tokens", 0) or 0)
    partial = [k for k in counts if k != full]
    if partial and not callable(metrics):
        raise TypeError("tokens= with lengths below the full one needs `metrics` as a factory "
                        "(a callable returning a new ReconstructionMetrics), one accumulator per length")
    main = metrics() if callable(metrics) else metrics
    per_length = {k: metrics() for k in partial}
    device = torch.device(device) if device is not None else _module_device(tokenizer)
    for accumulator in (main, *per_length.values()):
        accumulator.to(device)
    autocast_dtype = _autocast_dtype(precision)
    rank = _rank()

    grid_real: list[Tensor] = []
    grid_recon: list[Tensor] = []
    kept = 0
    # k_grid: per token count, the decodes of the first images (the originals are grid_real's source).
    want_k_grid = k_grid_path is not None and rank == 0 and len(counts) > 1 and k_grid_images > 0
    k_real: list[Tensor] = []
    k_recon: dict[int, list[Tensor]] = {k: [] for k in counts}
    k_kept = 0
    was_training = tokenizer.training
    extra: dict[str, Tensor] = {}
    tokenizer.eval()
    bar = tqdm(total=total, unit="img", desc="reconstruct", disable=not progress or rank != 0, dynamic_ncols=True)
    try:
        for batch in loader:
            images = (batch["image"] if isinstance(batch, Mapping) else batch).to(device, non_blocking=True)
            with _autocast(device, autocast_dtype):
                encoded = tokenizer.encode(images)
                recon = tokenizer.decode(encoded)
                recon_k = {k: tokenizer.decode(encoded, num_tokens=k) for k in per_length}
            ids = encoded.ids
            main.update(images, recon.float(), ids)
            # Per-image numbers a model reports besides the pixel metrics (SEED: embedding cosine).
            for name, values in (tokenizer.extra_metrics(images, encoded) if hasattr(tokenizer, "extra_metrics")
                                 else {}).items():
                sums = extra.setdefault(name, torch.zeros(2, dtype=torch.float64, device=device))
                sums += torch.stack([values.double().sum(), torch.tensor(float(values.numel()), device=device)])
            for k, r in recon_k.items():
                per_length[k].update(images, r.float(), None if ids is None else ids[:, :k])
            if grid_path is not None and rank == 0 and kept < grid_images:
                take = grid_images - kept
                grid_real.append(images[:take].float().cpu())
                grid_recon.append(quantize(recon[:take].float()).cpu())  # what the metrics saw
                kept += grid_real[-1].shape[0]
            if want_k_grid and k_kept < k_grid_images:
                take = k_grid_images - k_kept
                k_real.append(images[:take].float().cpu())
                for k in counts:
                    decoded = recon if k == full else recon_k[k]
                    k_recon[k].append(quantize(decoded[:take].float()).cpu())
                k_kept += k_real[-1].shape[0]
            bar.update(images.shape[0])
    finally:
        bar.close()
        tokenizer.train(was_training)

    result: dict[str, Any] = main.compute()
    for name, sums in sorted(extra.items()):  # every rank has the same names (the same model)
        total_sum, count = all_reduce_sum(sums).tolist()
        result[name] = total_sum / count if count else None
    if counts:
        result["tokens"] = {k: dict(result) if k == full else per_length[k].compute() for k in counts}
    if grid_real:
        write_grid(torch.cat(grid_real), torch.cat(grid_recon), grid_path)
    if k_real:
        write_k_grid(torch.cat(k_real), {k: torch.cat(v) for k, v in k_recon.items()}, k_grid_path,
                     min_tile=k_grid_min_tile)
    return result


def write_grid(originals: Tensor, reconstructions: Tensor, path: str | os.PathLike) -> Path:
    """One PNG: originals in the top row, reconstructions below (2 px white padding)."""
    from torchvision.utils import save_image

    # The same layout as the training reconstruction grids.
    from tokenizers_vis.metrics.grids import reconstruction_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(reconstruction_grid(originals, reconstructions), path)
    return path


# Height of the label strip above the columns of k_grid.png (PIL's built-in bitmap font is ~11 px).
K_GRID_LABEL_HEIGHT = 14


def write_k_grid(originals: Tensor, decoded: Mapping[int, Tensor], path: str | os.PathLike,
                 padding: int = 2, min_tile: int = 1) -> Path:
    """One PNG: a row per image, the original then its decode at each token count (ascending),
    2 px white padding, under a label strip naming the columns ("original", "k=1", ...), so one
    sees the reconstructions sharpen left to right. Tiles smaller than `min_tile` are enlarged by
    the smallest integer factor s that reaches it (nearest: every pixel an s x s block, nothing
    smoothed). Size: width (1 + K) * W + (2 + K) * padding, height K_GRID_LABEL_HEIGHT + n * H +
    (n + 1) * padding, for W, H the enlarged tile."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    counts = sorted(decoded)
    # Row-major: each row is one image's [original, k_1, ..., k_K].
    tiles = torch.stack([originals.float().cpu(), *(decoded[k].float().cpu() for k in counts)], dim=1)
    scale = max(1, -(-min_tile // max(originals.shape[-2:])))
    if scale > 1:
        # A 32 px tile is too small to judge by eye; nearest keeps the decode's own pixels.
        tiles = tiles.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    n, h, w = tiles.shape[0], *tiles.shape[-2:]
    grid = make_grid(tiles.flatten(0, 1).clamp(0, 1), nrow=1 + len(counts), padding=padding, pad_value=1.0)
    body = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    canvas = Image.new("RGB", (body.width, body.height + K_GRID_LABEL_HEIGHT), "white")
    canvas.paste(body, (0, K_GRID_LABEL_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    for column, label in enumerate(["original", *(f"k={k}" for k in counts)]):
        # Narrow columns (small images) get the short label.
        if column == 0 and draw.textlength(label) > w:
            label = "orig"
        draw.text((padding + column * (w + padding), 1), label, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def write_per_k_plot(per_k: Mapping[Any, Mapping[str, Any]], path: str | os.PathLike,
                     title: str | None = None) -> list[str]:
    """`per_k.png`: one panel per measured metric (PSNR, then rFID, SSIM, LPIPS when present)
    against the number of tokens on a log2 axis. `per_k` is the `"tokens"` entry of the metrics
    ({k: metrics}); metrics that are None or non-finite at every k are left out (a non-finite
    value at one k is left out of its line). Returns the names of the metrics drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = sorted(int(k) for k in per_k)
    by_k = {int(k): v for k, v in per_k.items()}

    def finite(value: Any) -> float | None:
        value = json_ready(value)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    series = {}
    for name in PER_K_METRICS:
        points = [(k, finite(by_k[k].get(name))) for k in counts]
        points = [(k, v) for k, v in points if v is not None]
        if points:
            series[name] = points
    # Agg canvas on a bare Figure: no pyplot state, no display needed.
    fig = Figure(figsize=(3.6 * max(len(series), 1), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, points) in enumerate(series.items()):
        ax = fig.add_subplot(1, len(series), i + 1)
        ax.plot([k for k, _ in points], [v for _, v in points], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(k) for k in counts])
        ax.minorticks_off()
        ax.set_xlabel("number of tokens")
        ax.set_title(PER_K_METRICS[name])
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return list(series)


def json_ready(value: Any, notes: dict[str, str] | None = None, key: str = "") -> Any:
    """Plain JSON values: tensors and numpy scalars to numbers, dict keys to str, and non-finite
    floats to None, each noted in `notes` under its dotted key (an infinite PSNR means some
    image was reconstructed exactly)."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v, notes, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v, notes, key) for v in value]
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()  # numpy scalars
    if isinstance(value, float) and not math.isfinite(value):
        if notes is not None:
            why = " (at least one image reconstructed exactly: zero error)" if key.endswith("psnr") else ""
            notes[key] = f"{value} written as null{why}"
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# -- processes ----------------------------------------------------------------------------------
@dataclass
class Processes:
    """This process's place in the run; `close()` ends a process group this module started."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_processes(devices: int = 1, accelerator: str = "auto") -> Processes:
    """Join or start the process group of a sharded run.

    In order: an already initialised group (the caller's); `devices > 1`: Lightning Fabric
    launches the other processes on this node (re-running this command) and starts the group;
    WORLD_SIZE > 1 in the environment (torchrun): start the group from the env variables;
    else one process. The device is CUDA (this rank's local GPU) when available, unless
    `accelerator="cpu"`.
    """
    use_cuda = accelerator != "cpu" and torch.cuda.is_available()
    if accelerator == "cuda" and not use_cuda:
        raise RuntimeError("accelerator=cuda but CUDA is not available")
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        return Processes(dist.get_rank(), dist.get_world_size(), device)
    if devices > 1:
        from lightning.fabric import Fabric

        fabric = Fabric(accelerator="cuda" if use_cuda else "cpu", devices=devices, strategy="ddp")
        fabric.launch()
        return Processes(fabric.global_rank, fabric.world_size, fabric.device, owns_group=True)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        return Processes(dist.get_rank(), dist.get_world_size(), device, owns_group=True)
    return Processes(0, 1, torch.device("cuda") if use_cuda else torch.device("cpu"))


# -- data ---------------------------------------------------------------------------------------
def resolve_data_source(
    data: str,
    conf_dir: str | os.PathLike | None = None,
    paths: Mapping | None = None,
    processes: Processes | None = None,
) -> str | list[str]:
    """`data=` as make_eval_loader's source: a preset name becomes its validation shards.

    A name with a `conf_dir/data/<name>.yaml` is a preset: its `val_shards`, or for the demo
    presets (demo, demo_video) `<demo_dir>/val-*.tar` (built by rank 0 if missing). Anything else
    (a folder of images or videos, a brace pattern, a glob, a folder of shards) is returned unchanged.
    """
    data = str(data)
    preset_file = Path(conf_dir) / "data" / f"{data}.yaml" if conf_dir is not None else None
    if preset_file is None or os.sep in data or not preset_file.is_file():
        return data
    preset = _compose_data_preset(data, Path(conf_dir), paths)
    if "demo_dir" in preset:
        video = str(preset.get("_target_", "")).endswith("DemoVideoDataModule")
        return _demo_val_shards(str(preset.demo_dir), processes or Processes(0, 1, torch.device("cpu")), video)
    from omegaconf import OmegaConf

    if "val_shards" not in preset or OmegaConf.is_missing(preset, "val_shards") or preset.val_shards is None:
        raise ValueError(f"data preset {data!r} names no val_shards; pass data=<folder or shard pattern> instead")
    shards = preset.val_shards
    return list(shards) if OmegaConf.is_list(shards) else str(shards)


def _compose_data_preset(name: str, conf_dir: Path, paths: Mapping | None):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    overrides = [f"+data={name}"]
    if GlobalHydra.instance().is_initialized():  # inside the Hydra app: its config path is conf/
        composed = compose(overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
            composed = compose(overrides=overrides)
    # Presets interpolate ${paths.*}: resolve them against the evaluation's own paths (copied
    # unresolved: some entries, such as paths.output_dir, only resolve inside the Hydra app).
    if OmegaConf.is_config(paths):
        paths = OmegaConf.to_container(paths, resolve=False)
    context = OmegaConf.create({"paths": dict(paths or {})})
    return OmegaConf.merge(context, composed).data


def _demo_val_shards(demo_dir: str, processes: Processes, video: bool = False) -> str:
    from tokenizers_vis.data import ensure_demo_shards, ensure_demo_video_shards, resolve_shards

    pattern = f"{demo_dir}/val-*.tar"
    if processes.rank == 0:
        try:
            resolve_shards(pattern)
        except FileNotFoundError:
            (ensure_demo_video_shards if video else ensure_demo_shards)(demo_dir)
    processes.barrier()  # unconditional, so every rank takes part whatever rank 0 found
    return pattern


def expected_images(source: Any, max_images: int | None, rank: int = 0, world_size: int = 1,
                    list_files: Callable[[Path], list] | None = None) -> int | None:
    """This rank's image count when it is known without reading the data (a folder of image
    files); for shards, this rank's share of `max_images` as an upper bound, else None.
    `list_files` (default `list_image_files`) lets video evaluation count video files."""
    if list_files is None:
        from tokenizers_vis.data.pipeline import list_image_files as list_files

    n = None
    if isinstance(source, (str, Path)) and Path(source).expanduser().is_dir():
        folder = Path(source).expanduser()
        if not any(folder.glob("*.tar")):
            n = len(list_files(folder))
    if n is None and max_images is None:
        return None
    n = max_images if n is None else (n if max_images is None else min(n, max_images))
    return len(range(rank, n, world_size))


def metrics_factory_from_cfg(cfg: Mapping, codebook_size: int | None) -> tuple[MetricsFactory, dict[str, str]]:
    """`metrics_factory` with the metric switches and weights of an eval config (conf/eval.yaml);
    the image and video commands read them the same way."""
    return metrics_factory(
        codebook_size,
        fid=bool(cfg.get("fid", True)),
        lpips=bool(cfg.get("lpips", True)),
        inception_weights=cfg.get("inception_weights"),
        lpips_weights=cfg.get("lpips_weights"),
        strict_fid=bool(cfg.get("strict_fid", False)),
        strict_lpips=bool(cfg.get("strict_lpips", False)),
        download=bool(cfg.get("download", True)),
    )


# -- the command --------------------------------------------------------------------------------
def run_evaluation(cfg: Mapping, conf_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate `cfg.tokenizer` on `cfg.data_source` (conf/eval.yaml), write `metrics.json` and
    `grid.png` to `cfg.output_dir` (rank 0), and return the metrics record (on every rank).

    `conf_dir` is the folder holding `data/<preset>.yaml`; without it `data` must be a path.
    Raises MissingWeightsError when `strict_fid` / `strict_lpips` is set and weights are missing.
    """
    from tokenizers_vis.data import make_eval_loader
    from tokenizers_vis.models.loading import load_tokenizer

    processes = setup_processes(int(cfg.get("devices", 1)), str(cfg.get("accelerator", "auto")))
    try:
        start = time.perf_counter()
        tokenizer = load_tokenizer(str(cfg.tokenizer), use_ema=bool(cfg.get("use_ema", True)))
        tokenizer = tokenizer.to(processes.device)
        counts = token_counts(cfg.get("tokens"), tokenizer)  # fail before any heavy setup
        factory, notes = metrics_factory_from_cfg(cfg, tokenizer.codebook_size)
        resolution = int(cfg.get("resolution") or tokenizer.image_size)
        source = resolve_data_source(str(cfg.data_source), conf_dir, cfg.get("paths"), processes)
        max_images = cfg.get("max_images")
        batch_size = int(cfg.get("batch_size", 32))
        loader = make_eval_loader(
            source,
            resolution,
            batch_size,
            num_workers=int(cfg.get("num_workers", 0)),
            max_images=None if max_images is None else int(max_images),
            rank=processes.rank,
            world_size=processes.world_size,
            interpolation=str(cfg.get("interpolation", "bicubic")),
        )
        output_dir = Path(str(cfg.output_dir))
        precision = str(cfg.get("precision", "32"))
        results = evaluate_reconstruction(
            tokenizer,
            loader,
            factory,
            tokens=counts or None,
            device=processes.device,
            precision=precision,
            grid_path=output_dir / GRID_FILE,
            grid_images=int(cfg.get("grid_images", 8)),
            k_grid_path=output_dir / K_GRID_FILE,
            k_grid_images=int(cfg.get("k_grid_images", 4)),
            k_grid_min_tile=int(cfg.get("k_grid_min_tile", 1)),
            progress=bool(cfg.get("progress", True)),
            total=expected_images(source, max_images, processes.rank, processes.world_size),
        )
        skipped = all_reduce_sum(torch.tensor([loader.skip_counter.skipped], dtype=torch.int64)).item()
        seconds = time.perf_counter() - start
        record = {
            **results,
            "tokenizer": str(cfg.tokenizer),
            "data": str(cfg.data_source),
            "source": source,
            "resolution": resolution,
            "max_images": max_images,
            "batch_size": batch_size,
            "world_size": processes.world_size,
            "precision": precision,
            "skipped_samples": int(skipped),
            "seconds": round(seconds, 2),
            "psnr_ssim": PSNR_SSIM_SETTINGS,
        }
        record = json_ready(record, notes)
        record["notes"] = notes
        if processes.rank == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / METRICS_FILE).write_text(json.dumps(record, indent=2) + "\n")
            written = [output_dir / METRICS_FILE, output_dir / GRID_FILE]
            if len(counts) > 1:
                write_per_k_plot(record["tokens"], output_dir / PER_K_PLOT_FILE, title=str(cfg.tokenizer))
                written += [output_dir / PER_K_PLOT_FILE, output_dir / K_GRID_FILE]
            log.info("wrote %s:\n%s", ", ".join(map(str, written)),
                     json.dumps({k: record[k] for k in results}, indent=2))
        return record
    finally:
        processes.close()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _autocast_dtype(precision: str) -> torch.dtype | None:
    if str(precision) not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose one of {sorted(PRECISIONS)}")
    return PRECISIONS[str(precision)]


def _module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")
