"""Helpers shared by the benchmark scripts: config composition, devices, memory, tables, JSON.

The scripts import this as `common` (their own folder is first on `sys.path` when run as
`python benchmarks/<script>.py`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"


def quiet() -> None:
    """Keep benchmark output to the table: no Lightning banners or data-loader hints."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", category=UserWarning, message=".*IterableDataset.*")


# -- configs -------------------------------------------------------------------------------------
# Config keys that hold a tokenizer's number of tokens (TiTok latent tokens, FlexTok registers).
TOKEN_KEYS = ("num_latent_tokens", "num_registers")


def compose_config(experiment: str, tiny: bool = False, overrides: Sequence[str] = (),
                   updates: dict[str, Any] | None = None, tokens: int | None = None):
    """`conf/train.yaml` with `experiment=NAME` (and `debug=smoke` when `tiny`), composed in-process.

    `overrides` are Hydra overrides applied at compose time; `updates` (dotted key -> value) and
    `tokens` (the model's token count) are applied after the smoke block is merged, so they win.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from tokenizers_vis.config import prepare_config, register_resolvers

    register_resolvers()
    base = [f"experiment={experiment}", f"paths.root_dir={REPO_ROOT}",
            f"paths.output_dir={Path(tempfile.gettempdir()) / 'tokenizers_vis_bench'}"]
    if tiny:
        base.append("debug=smoke")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train.yaml", overrides=base + list(overrides))
    cfg = prepare_config(cfg)
    with open_dict(cfg):
        for key, value in (updates or {}).items():
            OmegaConf.update(cfg, key, value, force_add=True)
        if tokens is not None:
            key = next((k for k in TOKEN_KEYS if k in cfg.model.tokenizer), None)
            if key is None:
                raise SystemExit(f"--tokens: model.tokenizer of {experiment} has none of {', '.join(TOKEN_KEYS)}")
            cfg.model.tokenizer[key] = tokens
    return cfg


def add_model_arguments(parser) -> None:
    """The options that pick a model from the configs (shared by the train and eval benchmarks)."""
    parser.add_argument("--experiment", default="demo", help="conf/experiment/NAME (default: demo)")
    parser.add_argument("--tiny", action="store_true", help="the model config's smoke block (debug=smoke)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override (repeatable); with --tiny the smoke block wins for the keys "
                             "it sets: override those as model.smoke.KEY")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default: the config's)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="number of tokens: TiTok latent tokens, FlexTok registers (default: the config's)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the config's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--precision", choices=("32", "bf16-mixed"), default="32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the tokenizer")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")


def model_updates(args) -> dict[str, Any]:
    updates: dict[str, Any] = {}
    if args.resolution is not None:
        updates["data.resolution"] = args.resolution
    if args.batch is not None:
        updates["data.batch_size"] = args.batch
    return updates


# -- devices, memory -------------------------------------------------------------------------------
def set_threads(num: int | None) -> None:
    if num:
        torch.set_num_threads(num)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemoryMeter:
    """Peak memory over a region: process RSS on CPU, allocator peak on GPU, plus the baseline."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline_mb = 0.0
        self.peak_mb = 0.0

    def __enter__(self) -> MemoryMeter:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.baseline_mb = peak_rss_mb()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mb = peak_rss_mb()

    @property
    def delta_mb(self) -> float:
        return max(0.0, self.peak_mb - self.baseline_mb)

    def as_dict(self) -> dict[str, Any]:
        kind = "cuda_max_memory_allocated" if self.device.type == "cuda" else "process_max_rss"
        return {"kind": kind, "peak_mb": round(self.peak_mb, 1), "baseline_mb": round(self.baseline_mb, 1),
                "delta_mb": round(self.delta_mb, 1)}


def random_images(batch: int, resolution: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, resolution, resolution, generator=generator).to(device)


def count_parameters(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


# -- machine and output ----------------------------------------------------------------------------
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    import lightning

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": _cpu_model(),
        "cpu_cores": cores,
        "torch_threads": torch.get_num_threads(),
        # Other processes on the machine skew CPU numbers: keep the load next to them.
        "load_average_1min": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
    }
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def describe_machine(info: dict[str, Any]) -> str:
    text = f"{info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads)"
    if "gpu" in info:
        text += f", {info['gpu']} ({info['gpu_memory_gb']} GB, CUDA {info['cuda']})"
    text += f"; torch {info['torch']}, lightning {info['lightning']}, Python {info['python']}"
    if info.get("load_average_1min") is not None:
        text += f"; load average {info['load_average_1min']}"
    return text


def warn_if_busy(info: dict[str, Any], rows: Sequence[dict[str, Any]]) -> None:
    """Say so when other processes held the CPU: its numbers are then not the machine's."""
    load, cores = info.get("load_average_1min"), info.get("cpu_cores") or 1
    if load is None or load < 0.5 * cores or not any(row.get("device") == "cpu" for row in rows):
        return
    print(f"note: the machine was busy (load average {load} on {cores} cores); CPU numbers are low and noisy. "
          f"Torch's threads wait on each other when cores are taken, so small models can be many times slower; "
          f"--threads 1 is steadier on a shared machine.", file=sys.stderr)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], markdown: bool = False) -> str:
    """A plain-text (or Markdown) table; `columns` are (key in the row, header) pairs."""
    header = [title for _, title in columns]
    body = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    # Text left-aligned, numbers right-aligned (a column is numeric when its first cell is).
    numeric = [bool(body) and _is_number(body[0][i]) for i in range(len(header))]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(cells[i]) for cells in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
