"""Side-by-side comparison of tokenizers on one image set: a leaderboard, rate-distortion curves
and a visual grid, with every number measured by the one evaluator (evaluation.py).

- `compare_tokenizers(entries, source, resolution, output_dir, ...)`: the library call.
- `run_comparison(cfg)`: the body of `eval/compare.py` (conf/compare.yaml).

Every model reads the same images: the same loader (`make_eval_loader`: one resize, one centre
crop, one order), and a SHA-256 of the uint8 pixels it saw is kept per model; the comparison
refuses to put models side by side whose hashes differ. Each model's `metrics.json` is built the
way `run_evaluation` builds it, so it equals what `eval/reconstruct.py` writes for that model alone
(`seconds` aside).

Bits per image come from the `Tokenizer` attributes only: `k * log2(codebook_size)` for k token
ids (VQ, FSQ, multi-scale prefixes alike: every id indexes one codebook of `codebook_size`
entries), "continuous" when `codebook_size` is None. Token counts other than the full
`num_tokens` are measured only for variable-length models (`decode` takes `num_tokens`), limited
to `token_prefixes` when the model has them (multi-scale: whole scales).

Video data (what `eval/reconstruct.py` routes to video_evaluation.py) is measured per model by
`run_video_evaluation` itself: rFVD, temporal error and per-frame metrics, tokens and bits per
clip; no speeds, parameter split or comparison grid there (each model keeps its grid.mp4).

Results are cached per model under `cache_dir`, keyed by the tokenizer file (path, size and
modification time) and every setting that changes its numbers, so adding a model to a comparison
evaluates only the new one.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from tqdm.auto import tqdm

from tokenizers_vis.evaluation import (
    GRID_FILE,
    K_GRID_FILE,
    METRICS_FILE,
    PER_K_PLOT_FILE,
    PSNR_SSIM_SETTINGS,
    MetricsFactory,
    evaluate_reconstruction,
    expected_images,
    is_variable_length,
    json_ready,
    metrics_factory,
    resolve_data_source,
    token_counts,
    write_per_k_plot,
)
from tokenizers_vis.metrics import to_uint8

__all__ = [
    "COMPARE_GRID_FILE",
    "LEADERBOARD_FILES",
    "RATE_DISTORTION_FILE",
    "EntryError",
    "ModelEntry",
    "bits_per_image",
    "compare_tokenizers",
    "parse_entries",
    "run_comparison",
    "write_compare_grid",
    "write_leaderboard",
    "write_rate_distortion",
]

log = logging.getLogger(__name__)

COMPARE_GRID_FILE = "compare_grid.png"
RATE_DISTORTION_FILE = "rate_distortion.png"
LEADERBOARD_FILES = ("leaderboard.md", "leaderboard.csv", "leaderboard.json")
RESULT_FILE = "result.json"  # a cache entry is complete once this is written
TILES_FILE = "tiles.pt"
MODELS_DIR = "models"
# Bump when what a cache entry holds changes meaning.
CACHE_VERSION = 1
ENTRY_KEYS = ("path", "label", "tokens", "steps", "guidance", "use_ema")
# Decode settings an entry may give, passed to `decode` under the same names.
DECODE_SETTINGS = ("steps", "guidance")
# Rate-distortion panels, in order, and whether lower is better.
RD_METRICS = {"psnr": ("PSNR (dB)", False), "ssim": ("SSIM", False), "lpips": ("LPIPS", True),
              "rfid": ("rFID", True), "rfvd": ("rFVD", True), "temporal_error": ("temporal error", True)}
# Video metrics (video_evaluation.py), added to the rows and tables of a comparison on video data.
VIDEO_METRICS = ("rfvd", "temporal_error")
# Figure geometry in pixels at RD_DPI: one panel per metric, plus a legend strip of rows.
RD_DPI = 100
RD_PANEL_PX = (400, 340)
RD_LEGEND_ROW_PX = 25
RD_LEGEND_COLUMNS = 4
GRID_PADDING = 2
GRID_LABEL_HEIGHT = 18


class EntryError(ValueError):
    """A `tokenizers` entry that cannot be compared; the message names the entry."""


# -- entries --------------------------------------------------------------------------------------
@dataclass
class ModelEntry:
    """One model of a comparison: what `load_tokenizer` takes, its label and decode settings."""

    path: str
    label: str
    index: int
    tokens: Any = None  # None: the comparison's `tokens`; else an int or a list of counts
    decode: dict[str, Any] = field(default_factory=dict)  # steps / guidance
    use_ema: bool | None = None

    def describe(self) -> str:
        return f"tokenizers[{self.index}] ({self.label}: {self.path})"


def parse_entries(tokenizers: Sequence[Any]) -> list[ModelEntry]:
    """Entries from strings (a path, preset name or Hub id) or mappings with `path` and optional
    `label`, `tokens`, `steps`, `guidance`, `use_ema`; checks every path before anything runs."""
    if isinstance(tokenizers, (str, Mapping)) or not tokenizers:
        raise EntryError("tokenizers must be a non-empty list, e.g. tokenizers=[DIR_A,DIR_B]")
    entries = []
    for i, raw in enumerate(tokenizers):
        raw = _plain(raw)
        spec = {"path": raw} if isinstance(raw, (str, os.PathLike)) else raw
        if not isinstance(spec, Mapping) or "path" not in spec:
            raise EntryError(f"tokenizers[{i}] = {raw!r}: give a path (or preset / Hub id), or a mapping with 'path'")
        unknown = sorted(set(spec) - set(ENTRY_KEYS))
        if unknown:
            raise EntryError(f"tokenizers[{i}] ({spec['path']}): unknown keys {unknown}; allowed {list(ENTRY_KEYS)}")
        path = str(spec["path"])
        path = os.path.expanduser(path) if path.startswith("~") else path  # a quoted ~ reaches us unexpanded
        label = str(spec.get("label") or default_label(path))
        decode = {k: spec[k] for k in DECODE_SETTINGS if spec.get(k) is not None}
        entries.append(ModelEntry(path, label, i, spec.get("tokens"), decode, spec.get("use_ema")))
    given = [str(e["label"]) for e in map(_plain, tokenizers) if isinstance(e, Mapping) and e.get("label")]
    repeated = sorted({x for x in given if given.count(x) > 1})
    if repeated:
        raise EntryError(f"labels {repeated} are given to more than one entry; labels must be unique")
    seen: dict[str, int] = {}
    for entry in entries:  # default labels that collide get a suffix: run, run-2, ...
        n = seen[entry.label] = seen.get(entry.label, 0) + 1
        if n > 1:
            entry.label = f"{entry.label}-{n}"
    for entry in entries:
        check_source(entry)
    return entries


def default_label(path: str) -> str:
    """The run name for a training checkpoint (`outputs/<run>/checkpoints/last.ckpt`), else the
    folder or file name."""
    p = Path(path)
    if p.suffix == ".ckpt" and p.parent.name == "checkpoints" and p.parent.parent.name:
        return p.parent.parent.name
    return p.stem if p.suffix == ".ckpt" else (p.name or path)


def check_source(entry: ModelEntry) -> None:
    """Fail early, naming the entry, when `load_tokenizer` would find nothing at its path: not a
    file or folder, not a released-checkpoint name, and not a Hub id (or one not cached offline)."""
    from tokenizers_vis.models.loading import download
    from tokenizers_vis.models.official import find_preset

    text = entry.path
    if Path(text).expanduser().exists() or find_preset(text) is not None:
        return
    if text.endswith(".ckpt") or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise EntryError(f"{entry.describe()}: no such file or folder, and not a released checkpoint name or a "
                         "Hub id (owner/name)")
    try:
        download(text)  # a Hub id: fetched (or found in the cache) now, not halfway through the run
    except Exception as err:
        raise EntryError(f"{entry.describe()}: {err}") from err


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


# -- rate ---------------------------------------------------------------------------------------
def bits_per_image(num_tokens: int, codebook_size: int | None) -> float | None:
    """`num_tokens * log2(codebook_size)`: the bits to store an image's ids without entropy
    coding; None for continuous models (no codebook)."""
    if codebook_size is None:
        return None
    return float(num_tokens) * math.log2(int(codebook_size))


def model_counts(tokenizer: nn.Module, tokens: Any, entry: ModelEntry) -> list[int]:
    """The token counts to measure for one model.

    `tokens` "auto": a curve for variable-length models (their `token_prefixes`, else the powers
    of two up to `num_tokens`, and `num_tokens`), the full length for the others. None / "full":
    the full length. A list given for the whole comparison: the counts each variable-length model
    can decode (others dropped, with a note in the log); fixed-length models take their full
    length. An entry's own `tokens` must all be decodable (checked by `token_counts`).
    """
    full = int(tokenizer.num_tokens)
    variable = is_variable_length(tokenizer)
    prefixes = getattr(tokenizer, "token_prefixes", None)
    try:
        if entry.tokens is not None:
            return token_counts(entry.tokens, tokenizer)
        if tokens is None or tokens == "full" or not variable:
            return [full]
        if tokens == "auto":
            if prefixes is not None:
                return sorted(int(k) for k in prefixes)
            return sorted({2**i for i in range(full.bit_length()) if 2**i <= full} | {full})
        wanted = [tokens] if isinstance(tokens, (int, str)) else list(tokens)
        allowed = set(prefixes) if prefixes is not None else set(range(1, full + 1))
        counts = sorted({int(k) for k in wanted} & allowed)
        dropped = sorted({int(k) for k in wanted} - allowed)
        if dropped:
            log.info("%s: tokens %s cannot be decoded (allowed: %s); measuring %s", entry.label, dropped,
                     sorted(allowed) if prefixes is not None else f"1..{full}", counts or [full])
        return counts or [full]
    except ValueError as err:
        raise EntryError(f"{entry.describe()}: {err}") from err


# -- measuring one model ----------------------------------------------------------------------------
class _ParameterReads(TorchFunctionMode):
    """Records which parameters the torch calls inside it read (as arguments of any op)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, nn.Parameter] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in tree_flatten((args, kwargs))[0]:
            if isinstance(value, nn.Parameter):
                self.seen[id(value)] = value
        return func(*args, **kwargs)


def _count(params: Iterable[nn.Parameter], owned: set[int]) -> int:
    return sum(p.numel() for p in params if id(p) in owned)


class _Probe(nn.Module):
    """The tokenizer as `evaluate_reconstruction` sees it: the same encode and decode calls, with
    the entry's decode settings added; it also times each call (images/s per token count), keeps
    the first full-length reconstructions for the comparison grid (uint8, as the metrics see
    them), and on the first batch finds the parameters that encode and decode read."""

    def __init__(self, tokenizer: nn.Module, decode_settings: Mapping[str, Any], keep: int, device: torch.device):
        super().__init__()
        self.inner = tokenizer
        self.num_tokens = tokenizer.num_tokens
        self.codebook_size = tokenizer.codebook_size
        self.token_prefixes = getattr(tokenizer, "token_prefixes", None)
        self.settings = dict(decode_settings)
        self.keep = keep
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.rng_devices = [device] if device.type == "cuda" else []
        self.kept: list[Tensor] = []
        # Per batch: images, encode seconds, {count: decode seconds}; the first batch is dropped
        # from the speeds when there are more (it pays for lazy initialisation and warm-up).
        self.timings: list[tuple[int, float, dict[int, float]]] = []
        self.params: dict[str, int] | None = None

    def encode(self, images: Tensor):
        if self.params is None:
            self.params = self._trace(images[:1])
        self.timings.append((images.shape[0], 0.0, {}))
        self.sync()
        start = time.perf_counter()
        encoded = self.inner.encode(images)
        self.sync()
        n, _, decodes = self.timings[-1]
        self.timings[-1] = (n, time.perf_counter() - start, decodes)
        return encoded

    def decode(self, encoded, num_tokens: int | None = None) -> Tensor:
        kwargs = dict(self.settings)
        if num_tokens is not None:
            kwargs["num_tokens"] = num_tokens
        self.sync()
        start = time.perf_counter()
        recon = self.inner.decode(encoded, **kwargs)
        self.sync()
        count = int(self.num_tokens if num_tokens is None else num_tokens)
        self.timings[-1][2][count] = time.perf_counter() - start
        if num_tokens is None and sum(t.shape[0] for t in self.kept) < self.keep:
            take = self.keep - sum(t.shape[0] for t in self.kept)
            self.kept.append(to_uint8(recon[:take].float()).cpu())
        return recon

    def _trace(self, image: Tensor) -> dict[str, int]:
        """Parameters read by encode, and by decode from what a user stores (the ids; the latents
        for continuous models), counted on one image."""
        params = list(self.inner.parameters())
        # Samplers on the global RNG (SEED's unCLIP) must draw what they draw in eval/reconstruct.py.
        with torch.random.fork_rng(devices=self.rng_devices):
            with _ParameterReads() as encode_reads:
                encoded = self.inner.encode(image)
            with _ParameterReads() as decode_reads:
                self.inner.decode(encoded.ids if encoded.ids is not None else encoded, **self.settings)
        return {"encoder": _count(params, set(encode_reads.seen)), "decoder": _count(params, set(decode_reads.seen)),
                "total": sum(p.numel() for p in params)}

    def extra_metrics(self, images: Tensor, encoded) -> dict[str, Tensor]:
        """The tokenizer's own per-image numbers (SEED's embedding cosine), as the evaluator asks them."""
        own = getattr(self.inner, "extra_metrics", None)
        return own(images, encoded) if own is not None else {}

    def speeds(self) -> tuple[float | None, dict[int, float]]:
        rows = self.timings[1:] if len(self.timings) > 1 else self.timings
        images = sum(n for n, _, _ in rows)
        encode_seconds = sum(s for _, s, _ in rows)
        decode = {}
        for k in sorted({k for _, _, d in rows for k in d}):
            seconds = sum(d.get(k, 0.0) for _, _, d in rows)
            decode[k] = images / seconds if seconds > 0 else None
        return (images / encode_seconds if encode_seconds > 0 else None), decode


class _Images:
    """The loader as every model reads it: a progress bar named after the model, the first images
    kept for the grid, and a SHA-256 of all pixels (uint8) in order, to prove the sets equal."""

    def __init__(self, loader: Iterable, label: str, keep: int, total: int | None, progress: bool):
        self.loader, self.label, self.keep, self.total, self.progress = loader, label, keep, total, progress
        self.kept: list[Tensor] = []
        self.digest = hashlib.sha256()
        self.count = 0

    def __iter__(self) -> Iterator:
        bar = tqdm(total=self.total, unit="img", desc=self.label, disable=not self.progress, dynamic_ncols=True)
        try:
            for batch in self.loader:
                images = batch["image"] if isinstance(batch, Mapping) else batch
                pixels = to_uint8(images)
                self.digest.update(pixels.contiguous().numpy().tobytes())
                self.count += pixels.shape[0]
                if sum(t.shape[0] for t in self.kept) < self.keep:
                    self.kept.append(pixels[: self.keep - sum(t.shape[0] for t in self.kept)])
                yield batch
                bar.update(images.shape[0])
        finally:
            bar.close()


@dataclass
class Settings:
    """What every model of a comparison is measured with (and what the cache key holds)."""

    data: str
    source: Any
    resolution: int
    batch_size: int = 32
    num_workers: int = 0
    max_images: int | None = None
    interpolation: str = "bicubic"
    tokens: Any = "auto"
    use_ema: bool = True
    precision: str = "32"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fid: bool = True
    lpips: bool = True
    inception_weights: str | None = None
    lpips_weights: str | None = None
    strict_fid: bool = False
    strict_lpips: bool = False
    grid_images: int = 6
    model_grid_images: int = 8
    k_grid_images: int = 4
    k_grid_min_tile: int = 96
    progress: bool = True
    # Video data: {frames, fps, fvd, i3d_weights, strict_fvd, grid_videos}; each model is then
    # measured by video_evaluation.run_video_evaluation, which resolves `data` with these two.
    video: dict[str, Any] | None = None
    conf_dir: str | None = None
    paths: dict[str, Any] | None = None


def _fingerprint(path: str) -> Any:
    """What identifies a tokenizer's weights on disk: a file's size and modification time, or those
    of each file in a folder; a preset name or Hub id stands for itself."""
    p = Path(path).expanduser()
    if p.is_file():
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return [str(p.resolve())] + [[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return path


def cache_key(entry: ModelEntry, s: Settings) -> dict[str, Any]:
    return json_ready({
        "version": CACHE_VERSION,
        "tokenizer": _fingerprint(entry.path),
        "use_ema": s.use_ema if entry.use_ema is None else bool(entry.use_ema),
        "tokens": s.tokens if entry.tokens is None else entry.tokens,
        "decode": entry.decode,
        "source": s.source, "resolution": s.resolution, "interpolation": s.interpolation,
        "max_images": s.max_images,
        "batch_size": s.batch_size,  # seeded samplers draw their noise per batch
        "precision": s.precision, "device": s.device.type,
        "fid": s.fid, "lpips": s.lpips, "inception_weights": s.inception_weights, "lpips_weights": s.lpips_weights,
        "video": s.video,
    })


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def evaluate_entry(entry: ModelEntry, s: Settings, out: Path,
                   metrics_builder: Callable[[int | None], tuple[MetricsFactory, dict[str, str]]]) -> dict[str, Any]:
    """Load, check and evaluate one model into the folder `out`; returns its cache record."""
    from tokenizers_vis.data import make_eval_loader
    from tokenizers_vis.models.loading import load_tokenizer

    start = time.perf_counter()
    use_ema = s.use_ema if entry.use_ema is None else bool(entry.use_ema)
    try:
        tokenizer = load_tokenizer(entry.path, use_ema=use_ema)
    except Exception as err:
        raise EntryError(f"{entry.describe()}: could not be loaded: {err}") from err
    size = getattr(tokenizer, "image_size", None)
    if size and int(size) != s.resolution:
        raise EntryError(f"{entry.describe()} takes {size} px images, the comparison is at resolution={s.resolution}; "
                         "compare models of one image size")
    accepted = inspect.signature(tokenizer.decode).parameters
    refused = sorted(k for k in entry.decode if k not in accepted)
    if refused:
        raise EntryError(f"{entry.describe()}: its {type(tokenizer).__name__} decode takes no {refused}")
    counts = model_counts(tokenizer, s.tokens, entry)
    tokenizer = tokenizer.to(s.device)
    factory, notes = metrics_builder(tokenizer.codebook_size)
    loader = make_eval_loader(s.source, s.resolution, s.batch_size, num_workers=s.num_workers,
                              max_images=s.max_images, interpolation=s.interpolation)
    images = _Images(loader, entry.label, s.grid_images, expected_images(s.source, s.max_images), s.progress)
    probe = _Probe(tokenizer, entry.decode, s.grid_images, s.device)
    full = int(tokenizer.num_tokens)
    tokens = None if counts == [full] and entry.tokens is None else counts  # as reconstruct.py without tokens=
    results = evaluate_reconstruction(
        probe, images, factory, tokens=tokens, device=s.device, precision=s.precision,
        grid_path=out / GRID_FILE, grid_images=s.model_grid_images, k_grid_path=out / K_GRID_FILE,
        k_grid_images=s.k_grid_images, k_grid_min_tile=s.k_grid_min_tile, progress=False)
    # The record of run_evaluation (eval/reconstruct.py), key for key.
    record = {
        **results,
        "tokenizer": entry.path,
        "data": s.data,
        "source": s.source,
        "resolution": s.resolution,
        "max_images": s.max_images,
        "batch_size": s.batch_size,
        "world_size": 1,
        "precision": s.precision,
        "skipped_samples": int(loader.skip_counter.skipped),
        "seconds": round(time.perf_counter() - start, 2),
        "psnr_ssim": PSNR_SSIM_SETTINGS,
    }
    if entry.decode:
        record["decode"] = dict(entry.decode)
    record = json_ready(record, notes)
    record["notes"] = notes
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if tokens is not None and len(counts) > 1:
        write_per_k_plot(record["tokens"], out / PER_K_PLOT_FILE, title=entry.label)
    torch.save({"originals": torch.cat(images.kept) if images.kept else None,
                "reconstructions": torch.cat(probe.kept) if probe.kept else None}, out / TILES_FILE)
    encode_speed, decode_speed = probe.speeds()
    return {
        "family": getattr(tokenizer, "model_type", None) or type(tokenizer).__name__,
        "params": probe.params,
        "num_tokens": full,
        "codebook_size": tokenizer.codebook_size,
        "counts": counts,
        "encode_images_per_s": encode_speed,
        "decode_images_per_s": {str(k): v for k, v in decode_speed.items()},
        "images_sha256": images.digest.hexdigest(),
        "num_images": images.count,
        "device": _device_name(s.device),  # the speeds' device, which a cached entry keeps
    }


def evaluate_video_entry(entry: ModelEntry, s: Settings, out: Path) -> dict[str, Any]:
    """One model on video clips: `run_video_evaluation` itself (eval/reconstruct.py's video path)
    writes metrics.json, grid.mp4 and frames.png into `out`; returns its cache record. Tokens and
    bits count per clip (an image tokenizer codes each frame)."""
    from omegaconf import OmegaConf

    from tokenizers_vis.models.loading import load_tokenizer
    from tokenizers_vis.video_evaluation import run_video_evaluation

    if entry.decode:
        raise EntryError(f"{entry.describe()}: decode settings {sorted(entry.decode)} are not passed on video data")
    use_ema = s.use_ema if entry.use_ema is None else bool(entry.use_ema)
    try:
        tokenizer = load_tokenizer(entry.path, use_ema=use_ema)
    except Exception as err:
        raise EntryError(f"{entry.describe()}: could not be loaded: {err}") from err
    video = dict(s.video or {})
    cfg = OmegaConf.create({
        "tokenizer": entry.path, "use_ema": use_ema, "data_source": s.data, "paths": s.paths or {},
        "resolution": s.resolution, "interpolation": s.interpolation, "max_images": s.max_images,
        "batch_size": s.batch_size, "num_workers": s.num_workers, "tokens": entry.tokens,
        "fid": s.fid, "inception_weights": s.inception_weights, "strict_fid": s.strict_fid,
        "lpips": s.lpips, "lpips_weights": s.lpips_weights, "strict_lpips": s.strict_lpips,
        "precision": s.precision, "accelerator": s.device.type, "devices": 1, "progress": s.progress,
        "output_dir": str(out), **video,
    })
    try:
        record = run_video_evaluation(cfg, conf_dir=s.conf_dir)
    except ValueError as err:
        raise EntryError(f"{entry.describe()}: {err}") from err
    per_clip = 1 if getattr(tokenizer, "input_kind", "image") == "video" else int(record["frames"])
    torch.save({"originals": None, "reconstructions": None}, out / TILES_FILE)
    return {
        "family": getattr(tokenizer, "model_type", None) or type(tokenizer).__name__,
        "params": {"encoder": None, "decoder": None, "total": sum(p.numel() for p in tokenizer.parameters())},
        "num_tokens": int(tokenizer.num_tokens) * per_clip,
        "codebook_size": tokenizer.codebook_size,
        "counts": [int(tokenizer.num_tokens) * per_clip],
        "encode_images_per_s": None,
        "decode_images_per_s": {},
        "images_sha256": None,
        "num_images": record.get("num_images"),
        "device": _device_name(s.device),
    }


# -- the comparison ---------------------------------------------------------------------------------
def compare_tokenizers(
    entries: Sequence[ModelEntry],
    settings: Settings,
    output_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    recompute: bool = False,
    metrics_builder: Callable[[int | None], tuple[MetricsFactory, dict[str, str]]] | None = None,
    grid_min_tile: int = 128,
    grid_zoom: int = 4,
) -> dict[str, Any]:
    """Evaluate each entry (or take it from the cache) and write the leaderboard, the
    rate-distortion plot, the grid and each model's files into `output_dir`; returns the
    leaderboard record (leaderboard.json).

    `metrics_builder(codebook_size) -> (factory, notes)` makes each model's metrics; default
    `metrics_factory` with the settings' FID / LPIPS options (tests inject a feature network).
    """
    output_dir = Path(output_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else output_dir / "cache"
    if metrics_builder is None:
        def metrics_builder(codebook_size):
            return metrics_factory(codebook_size, fid=settings.fid, lpips=settings.lpips,
                                   inception_weights=settings.inception_weights,
                                   lpips_weights=settings.lpips_weights, strict_fid=settings.strict_fid,
                                   strict_lpips=settings.strict_lpips)
    models: dict[str, dict[str, Any]] = {}
    for position, entry in enumerate(entries, 1):
        key = cache_key(entry, settings)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        slot = cache_dir / digest  # not by label: a relabelled model is the same model
        tiles = settings.grid_images if settings.video is None else 0  # no compare grid for video
        cached = _read_cache(slot, key, tiles) if not recompute else None
        if cached is None:
            log.info("[%d/%d] %s: evaluating %s", position, len(entries), entry.label, entry.path)
            if slot.exists():
                shutil.rmtree(slot)
            partial = slot.with_name(slot.name + ".partial")
            if partial.exists():
                shutil.rmtree(partial)
            if settings.video is not None:
                summary = evaluate_video_entry(entry, settings, partial)
            else:
                summary = evaluate_entry(entry, settings, partial, metrics_builder)
            (partial / RESULT_FILE).write_text(json.dumps({"key": key, **json_ready(summary)}, indent=2) + "\n")
            partial.rename(slot)  # whole entries only: an interrupted model is evaluated again
            cached = _read_cache(slot, key, tiles)
        else:
            log.info("[%d/%d] %s: cached in %s", position, len(entries), entry.label, slot)
        model_dir = output_dir / MODELS_DIR / _slug(entry.label)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(slot, model_dir, ignore=shutil.ignore_patterns(RESULT_FILE, TILES_FILE))
        models[entry.label] = {**cached, "entry": entry, "dir": model_dir}

    hashes = {label: m["images_sha256"] for label, m in models.items() if m["images_sha256"] is not None}
    if len(set(hashes.values())) > 1:
        raise RuntimeError(f"the models did not see the same images (pixel hashes {hashes}); "
                           "rerun with recompute=true")
    rows = leaderboard_rows(models)
    first = next(iter(models.values()))
    meta = {
        "data": settings.data, "source": json_ready(settings.source), "resolution": settings.resolution,
        "num_images": first["metrics"]["num_images"], "images_sha256": first["images_sha256"],
        "precision": settings.precision,
        "device": ", ".join(dict.fromkeys(str(row["device"]) for row in rows)),
        "notes": first["metrics"].get("notes", {}),
        "unit": "image" if settings.video is None else "clip",
        **({} if settings.video is None else {"frames": first["metrics"].get("frames"),
                                              "num_videos": first["metrics"].get("num_videos")}),
    }
    record = {"meta": meta, "rows": rows,
              "models": {label: {"tokenizer": m["entry"].path, "dir": str(m["dir"]), "family": m["family"],
                                 "metrics": str(m["dir"] / METRICS_FILE)} for label, m in models.items()}}
    write_leaderboard(record, output_dir)
    write_rate_distortion(rows, output_dir / RATE_DISTORTION_FILE, unit=meta["unit"])
    originals = first["tiles"]["originals"]
    if originals is not None and settings.grid_images > 0:
        write_compare_grid(originals[: settings.grid_images],
                           {label: m["tiles"]["reconstructions"][: settings.grid_images] for label, m in models.items()},
                           output_dir / COMPARE_GRID_FILE, min_tile=grid_min_tile, zoom=grid_zoom)
    return record


def _read_cache(slot: Path, key: Mapping, grid_images: int) -> dict[str, Any] | None:
    """A complete cache entry with this key (and enough grid tiles), else None."""
    try:
        result = json.loads((slot / RESULT_FILE).read_text())
        metrics = json.loads((slot / METRICS_FILE).read_text())
        tiles = torch.load(slot / TILES_FILE, weights_only=True)
    except (OSError, ValueError, RuntimeError):
        return None
    if result.pop("key", None) != json.loads(json.dumps(key)):
        return None
    kept = tiles["reconstructions"]
    if grid_images > 0 and (kept is None or kept.shape[0] < min(grid_images, metrics.get("num_images") or 0)):
        return None
    return {**result, "metrics": metrics, "tiles": tiles}


def leaderboard_rows(models: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per model and measured token count (fixed-length models: one row)."""
    rows = []
    for label, m in models.items():
        metrics, counts, full = m["metrics"], m["counts"], m["num_tokens"]
        per_k = metrics.get("tokens") or {}
        for k in counts:
            values = per_k.get(str(k), metrics) if k != full else metrics
            bits = bits_per_image(k, m["codebook_size"])
            rows.append({
                "model": label if len(counts) == 1 else f"{label} k={k}",
                "label": label,
                "family": m["family"],
                "tokenizer": m["entry"].path,
                "params_encoder": (m["params"] or {}).get("encoder"),
                "params_decoder": (m["params"] or {}).get("decoder"),
                "params_total": (m["params"] or {}).get("total"),
                "tokens": k,
                "variable_length": len(counts) > 1,
                "codebook_size": m["codebook_size"],
                "bits_per_image": "continuous" if bits is None else round(bits, 2),
                **{name: values.get(name) for name in ("rfid", "psnr", "ssim", "lpips", "codebook_usage",
                                                        "codebook_entropy", *VIDEO_METRICS, "psnr_flat_baseline")},
                "encode_images_per_s": _round(m["encode_images_per_s"]),
                "decode_images_per_s": _round(m["decode_images_per_s"].get(str(k))),
                "num_images": values.get("num_images"),
                "device": m.get("device"),
                **({"decode": m["entry"].decode} if m["entry"].decode else {}),
            })
    return rows


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 2)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads != 1 else ''})"


# -- outputs ------------------------------------------------------------------------------------------
CSV_COLUMNS = ("model", "family", "tokenizer", "params_encoder", "params_decoder", "params_total", "tokens",
               "codebook_size", "bits_per_image", "rfid", "psnr", "ssim", "lpips", "codebook_usage",
               "codebook_entropy", *VIDEO_METRICS, "encode_images_per_s", "decode_images_per_s", "num_images",
               "device", "psnr_flat_baseline")
# Markdown columns: (header, key, format, better: "max" / "min" / None).
MD_COLUMNS = (("model", "model", str, None), ("family", "family", str, None),
              ("params enc / dec", None, None, None), ("tokens", "tokens", str, None),
              ("codebook", "codebook_size", str, None), ("bits / image", "bits_per_image", None, None),
              ("rFID", "rfid", "{:.2f}", "min"), ("PSNR", "psnr", "{:.2f}", "max"), ("SSIM", "ssim", "{:.3f}", "max"),
              ("LPIPS", "lpips", "{:.3f}", "min"), ("usage", "codebook_usage", "{:.3f}", "max"),
              ("entropy (bits)", "codebook_entropy", "{:.2f}", None),
              ("rFVD", "rfvd", "{:.2f}", "min"), ("temporal error", "temporal_error", "{:.4f}", "min"),
              ("encode img/s", "encode_images_per_s", "{:.1f}", None),
              ("decode img/s", "decode_images_per_s", "{:.1f}", None))


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def write_leaderboard(record: Mapping[str, Any], output_dir: str | os.PathLike) -> list[Path]:
    """leaderboard.md (best value per metric in bold), leaderboard.csv (raw numbers, empty for
    not measured) and leaderboard.json (`record`)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows, meta = record["rows"], record["meta"]
    md, csv_path, json_path = (output_dir / name for name in LEADERBOARD_FILES)
    json_path.write_text(json.dumps(json_ready(record), indent=2) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS} for row in rows)

    # The video columns only for video data; "bits / clip" there.
    columns = [c for c in MD_COLUMNS if c[1] not in VIDEO_METRICS or any(row.get(c[1]) is not None for row in rows)]
    unit = meta.get("unit", "image")
    columns = [(f"bits / {unit}", *c[1:]) if c[1] == "bits_per_image" else c for c in columns]
    best = {}
    for _, key, _, better in columns:
        values = [row[key] for row in rows if key and isinstance(row.get(key), (int, float))]
        if better and len(values) > 1:
            best[key] = max(values) if better == "max" else min(values)
    size = (f"{meta['num_images']} images" if unit == "image"
            else f"{meta.get('num_videos')} clips of {meta.get('frames')} frames")
    lines = [f"Data: `{meta['data']}` ({size}, {meta['resolution']} px, centre crops), "
             f"device: {meta['device']}, precision {meta['precision']}.", "",
             "| " + " | ".join(h for h, *_ in columns) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|"]
    for row in rows:
        cells = []
        for header, key, fmt, _ in columns:
            if key is None:
                split = row["params_encoder"] is not None or row["params_decoder"] is None and row["params_total"] is None
                cells.append(f"{_params(row['params_encoder'])} / {_params(row['params_decoder'])}" if split
                             else f"{_params(row['params_total'])} in all")
                continue
            value = row.get(key)
            if value is None:
                cells.append("-")
            elif fmt is None or fmt is str or isinstance(value, str):
                cells.append(str(value) if key != "bits_per_image" or isinstance(value, str) else f"{value:g}")
            else:
                text = fmt.format(value)
                text = text.lstrip("-") if float(text) == 0 else text  # no "-0.00" for a rounding error
                cells.append(f"**{text}**" if key in best and value == best[key] else text)
        lines.append("| " + " | ".join(cells) + " |")
    flat = flat_baseline(rows)
    if flat is not None:
        lines += ["", f"Flat-colour baseline (each image painted its own mean colour): PSNR {flat:.2f} dB."]
    notes = meta.get("notes") or {}
    if notes:
        lines += [""] + [f"- {name}: {text}" for name, text in notes.items()]
    md.write_text("\n".join(lines) + "\n")
    return [md, csv_path, json_path]


def flat_baseline(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """The PSNR of painting each image its mean colour (the same images for every row), or None."""
    return next((v for v in (_finite(row.get("psnr_flat_baseline")) for row in rows) if v is not None), None)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def rd_layout(num_panels: int, num_models: int) -> tuple[int, int]:
    """(width, height) in pixels of rate_distortion.png."""
    legend_rows = -(-num_models // RD_LEGEND_COLUMNS)
    return RD_PANEL_PX[0] * max(num_panels, 1), RD_PANEL_PX[1] + RD_LEGEND_ROW_PX * legend_rows


def write_rate_distortion(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, unit: str = "image") -> list[str]:
    """rate_distortion.png: one panel per measured metric against bits per image (per clip for
    video data; log2 axis).
    Variable-length models are curves (points labelled with their token count), fixed-length ones
    single points, continuous models (no bits) a dashed horizontal line. Returns the metrics drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    labels = list(dict.fromkeys(row["label"] for row in rows))
    panels = [m for m in RD_METRICS if any(_finite(row.get(m)) is not None for row in rows)]
    width, height = rd_layout(len(panels), len(labels))
    fig = Figure(figsize=(width / RD_DPI, height / RD_DPI), dpi=RD_DPI)
    FigureCanvasAgg(fig)
    colors = [f"C{i % 10}" for i in range(len(labels))]
    markers = "osD^vP*Xh<>p"
    legend_height = (height - RD_PANEL_PX[1]) / height
    bits_all = [row["bits_per_image"] for row in rows if not isinstance(row["bits_per_image"], str)]
    flat = flat_baseline(rows)
    for i, name in enumerate(panels):
        # Panels placed by hand (not constrained layout) so the file's size is exactly rd_layout's.
        ax = fig.add_axes([(i + 0.17) / len(panels), legend_height + 0.14 * (1 - legend_height),
                           0.78 / len(panels), 0.74 * (1 - legend_height)])
        for j, label in enumerate(labels):
            points = [(row["bits_per_image"], _finite(row.get(name)), row["tokens"]) for row in rows
                      if row["label"] == label]
            style = dict(color=colors[j], marker=markers[j % len(markers)])
            discrete = [(b, v, k) for b, v, k in points if not isinstance(b, str) and v is not None]
            if discrete:
                ax.plot([b for b, _, _ in discrete], [v for _, v, _ in discrete], markersize=6,
                        linestyle="-" if len(discrete) > 1 else "none", **style)
                if len(discrete) > 1:
                    for b, v, k in discrete:
                        ax.annotate(str(k), (b, v), textcoords="offset points", xytext=(3, 4), fontsize=7,
                                    color=colors[j])
            for b, v, _ in points:
                if isinstance(b, str) and v is not None:
                    ax.axhline(v, color=colors[j], linestyle="--", linewidth=1.2)
        if name == "psnr" and flat is not None:
            ax.axhline(flat, color="0.5", linestyle=":", linewidth=1.2)
            ax.annotate("flat mean colour", (0.02, flat), xycoords=("axes fraction", "data"),
                        textcoords="offset points", xytext=(0, 3), fontsize=7, color="0.4")
        ax.set_xscale("log", base=2)
        if bits_all:
            lo, hi = min(bits_all), max(bits_all)
            ax.set_xlim(lo / 1.6, hi * 1.6)
        else:
            ax.set_xlim(1, 2**20)
        ax.set_xlabel(f"bits per {unit}", fontsize=9)
        title, lower = RD_METRICS[name]
        ax.set_title(f"{title} ({'lower' if lower else 'higher'} is better)", fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(True, which="major", alpha=0.3)
    handles = []
    for j, label in enumerate(labels):
        continuous = all(isinstance(row["bits_per_image"], str) for row in rows if row["label"] == label)
        handles.append(Line2D([], [], color=colors[j], marker=None if continuous else markers[j % len(markers)],
                              linestyle="--" if continuous else "-",
                              label=f"{label} (continuous)" if continuous else label))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(RD_LEGEND_COLUMNS, len(handles)), fontsize=9,
                   frameon=False, bbox_to_anchor=(0.5, 0.0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=RD_DPI)
    return panels


def grid_layout(num_images: int, num_models: int, side: int, min_tile: int, zoom: int) -> tuple[int, int]:
    """(width, height) in pixels of compare_grid.png."""
    tile = side * max(1, -(-min_tile // side))
    rows = num_images * (2 if zoom > 1 else 1)
    columns = 1 + num_models
    return columns * tile + (columns + 1) * GRID_PADDING, GRID_LABEL_HEIGHT + rows * tile + (rows + 1) * GRID_PADDING


def write_compare_grid(originals: Tensor, reconstructions: Mapping[str, Tensor], path: str | os.PathLike,
                       min_tile: int = 128, zoom: int = 4) -> Path:
    """compare_grid.png: one row per image, the original in the first column and each model's
    reconstruction in the next, labelled on top. Tiles smaller than `min_tile` are enlarged
    (nearest, integer factor); with `zoom` > 1 each row is followed by the centre 1/zoom of every
    tile enlarged to full size (marked by a box on the row above). Images are uint8 or [0, 1]."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    columns = [to_uint8(originals)] + [to_uint8(r) for r in reconstructions.values()]
    n, side = columns[0].shape[0], columns[0].shape[-1]
    for label, t in zip(["original", *reconstructions], columns):
        if t.shape[0] < n or t.shape[1:] != columns[0].shape[1:]:
            raise ValueError(f"{label}: tiles {tuple(t.shape)} do not match the originals {tuple(columns[0].shape)}")
    scale = max(1, -(-min_tile // side))
    crop = max(1, side // zoom) if zoom > 1 else side
    top = (side - crop) // 2
    tiles = []
    for i in range(n):
        row = torch.stack([c[i] for c in columns])
        tiles.append(row)
        if zoom > 1:
            part = row[:, :, top:top + crop, top:top + crop].float()
            tiles.append(nn.functional.interpolate(part, size=(side, side), mode="nearest").round().to(torch.uint8))
    stacked = torch.cat(tiles)
    if scale > 1:
        stacked = stacked.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    tile = side * scale
    grid = make_grid(stacked.float() / 255, nrow=len(columns), padding=GRID_PADDING, pad_value=1.0)
    body = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    canvas = Image.new("RGB", (body.width, body.height + GRID_LABEL_HEIGHT), "white")
    canvas.paste(body, (0, GRID_LABEL_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    for c, label in enumerate(["original", *reconstructions]):
        text = label
        while len(text) > 1 and draw.textlength(text, font=font) > tile:
            text = text[:-2] + "…"
        draw.text((GRID_PADDING + c * (tile + GRID_PADDING), 2), text, fill="black", font=font)
    if zoom > 1:
        box = crop * scale
        for r in range(0, len(tiles), 2):  # the full-size rows
            y = GRID_LABEL_HEIGHT + GRID_PADDING + r * (tile + GRID_PADDING) + top * scale
            for c in range(len(columns)):
                x = GRID_PADDING + c * (tile + GRID_PADDING) + top * scale
                draw.rectangle([x, y, x + box - 1, y + box - 1], outline=(255, 40, 40))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes: the fixed bitmap font
        return ImageFont.load_default()


# -- the command --------------------------------------------------------------------------------------
def run_comparison(cfg: Mapping, conf_dir: str | os.PathLike | None = None, metrics_builder=None) -> dict[str, Any]:
    """`eval/compare.py` (conf/compare.yaml): check every entry, then evaluate (or take from the
    cache) each model and write the comparison into `cfg.output_dir`; returns leaderboard.json's record."""
    entries = parse_entries(cfg.tokenizers)  # every path checked before any model runs
    accelerator = str(cfg.get("accelerator", "auto"))
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("accelerator=cuda but CUDA is not available")
    device = torch.device("cuda" if accelerator != "cpu" and torch.cuda.is_available() else "cpu")
    source = resolve_data_source(str(cfg.data_source), conf_dir, cfg.get("paths"))
    video = _video_settings(cfg, conf_dir)
    max_images = cfg.get("max_images")
    tokens = _plain(cfg.get("tokens", "auto"))
    settings = Settings(
        data=str(cfg.data_source), source=source, resolution=int(cfg.resolution),
        batch_size=int(cfg.get("batch_size", 32)), num_workers=int(cfg.get("num_workers", 0)),
        max_images=None if max_images is None else int(max_images),
        interpolation=str(cfg.get("interpolation", "bicubic")), tokens=tokens,
        use_ema=bool(cfg.get("use_ema", True)), precision=str(cfg.get("precision", "32")), device=device,
        fid=bool(cfg.get("fid", True)), lpips=bool(cfg.get("lpips", True)),
        inception_weights=_optional_str(cfg.get("inception_weights")),
        lpips_weights=_optional_str(cfg.get("lpips_weights")),
        strict_fid=bool(cfg.get("strict_fid", False)), strict_lpips=bool(cfg.get("strict_lpips", False)),
        grid_images=int(cfg.get("grid_images", 6)), model_grid_images=int(cfg.get("model_grid_images", 8)),
        k_grid_images=int(cfg.get("k_grid_images", 4)), k_grid_min_tile=int(cfg.get("k_grid_min_tile", 96)),
        progress=bool(cfg.get("progress", True)),
        video=video, conf_dir=None if conf_dir is None else str(conf_dir),
        paths=_plain_unresolved(cfg.get("paths")),
    )
    record = compare_tokenizers(
        entries, settings, cfg.output_dir, cache_dir=_optional_str(cfg.get("cache_dir")),
        recompute=bool(cfg.get("recompute", False)), metrics_builder=metrics_builder,
        grid_min_tile=int(cfg.get("grid_min_tile", 128)), grid_zoom=int(cfg.get("grid_zoom", 4)),
    )
    log.info("wrote the comparison of %d models to %s:\n%s", len(entries), cfg.output_dir,
             (Path(str(cfg.output_dir)) / LEADERBOARD_FILES[0]).read_text())
    return record


def _video_settings(cfg: Mapping, conf_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """The clip settings when `data` is video (the test of eval/reconstruct.py), else None."""
    # No ImportError fallback: a broken video evaluator must not turn video data into images.
    # (It imports PyAV only when it reads clips.)
    from tokenizers_vis.video_evaluation import is_video_config, video_clip_settings

    if not is_video_config(cfg, conf_dir):
        return None
    frames, fps = video_clip_settings(cfg, conf_dir)
    return {"frames": frames, "fps": fps, "fvd": bool(cfg.get("fvd", True)),
            "i3d_weights": _optional_str(cfg.get("i3d_weights")), "strict_fvd": bool(cfg.get("strict_fvd", False)),
            "grid_videos": int(cfg.get("grid_videos", 4))}


def _plain_unresolved(value: Any) -> Any:
    # paths.* hold interpolations (${hydra:...}) that resolve only inside the Hydra app.
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)
