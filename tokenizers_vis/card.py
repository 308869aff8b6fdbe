"""Model cards (the README.md of an exported tokenizer folder): YAML front matter the Hub reads
(license, library, tags, metrics as a model-index) and a Markdown body describing the model, its
training recipe, its evaluation and how to load it.

Everything about the model comes from the `Tokenizer` contract (model_type, num_tokens,
codebook_size, config), so every model type gets a card without code of its own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from tokenizers_vis.models.base import Tokenizer

LIBRARY_NAME = "tokenizers_vis"
DEFAULT_LICENSE = "apache-2.0"

# metrics.json key -> (display name, format). Keys outside this table are shown with "{:.4g}".
METRICS = {
    "rfid": ("rFID", "{:.2f}"),
    "psnr": ("PSNR (dB)", "{:.2f}"),
    "ssim": ("SSIM", "{:.4f}"),
    "lpips": ("LPIPS", "{:.4f}"),
    "codebook_usage": ("codebook usage", "{:.1%}"),
    "codebook_entropy": ("codebook entropy", "{:.2f}"),
    "codebook_perplexity": ("codebook perplexity", "{:.1f}"),
}


@dataclass
class CardInfo:
    """What a card says beyond the model itself; every field may be missing.

    repo_id:    the Hub id the folder is meant for (titles the card and the usage snippet).
    weights:    which weights were exported ("EMA" or "raw").
    experiment: the run's experiment name (config.yaml `name`).
    run_config: the run's composed Hydra config (config.yaml) as a plain dict.
    step:       the training step of the exported checkpoint.
    metrics:    contents of the metrics.json files found (the evaluation CLI's records).
    validation: the end-of-training validation metrics of summary.json (`val/...` keys).
    grid:       file name, inside the exported folder, of a sample reconstruction grid.
    grid_step:  the training step at which that grid was logged.
    video:      file name, inside the exported folder, of a sample reconstruction video (video tokenizers).
    license:    the license id of the weights (front matter `license`).
    """

    repo_id: str | None = None
    weights: str = "EMA"
    experiment: str | None = None
    run_config: dict[str, Any] | None = None
    step: int | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    validation: dict[str, float] | None = None
    grid: str | None = None
    grid_step: int | None = None
    video: str | None = None
    license: str = DEFAULT_LICENSE


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_metric(key: str, value: Any) -> str:
    if not _is_number(value):
        return "–"
    return METRICS.get(key, (key, "{:.4g}"))[1].format(value)


def format_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.2f}M" if n < 1e7 else f"{n / 1e6:.1f}M"


def short_path(value: Any) -> str:
    """The last two parts of a path-like value: enough to name a data set without a machine's layout."""
    if isinstance(value, (list, tuple)):
        return ", ".join(short_path(v) for v in value)
    text = str(value)
    if "/" not in text:
        return text
    return "/".join(PurePath(text).parts[-2:])


def describe_data(data: dict[str, Any] | None) -> str | None:
    """'ImageDataModule: imagenet/train-{000000..001281}.tar, 256 px' from a run's `data` config."""
    if not data:
        return None
    kind = str(data.get("_target_", "")).rsplit(".", 1)[-1]
    source = next((data[k] for k in ("train_shards", "demo_dir", "root", "path") if data.get(k)), None)
    text = ": ".join(p for p in (kind, short_path(source) if source is not None else "") if p)
    if data.get("resolution"):
        text = f"{text}, {data['resolution']} px" if text else f"{data['resolution']} px"
    return text or None


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in rows if value not in (None, "")]
    return lines


def _get(config: dict[str, Any] | None, dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def parameter_count(tokenizer: Tokenizer) -> int:
    return sum(p.numel() for p in tokenizer.parameters())


def codebook_text(tokenizer: Tokenizer) -> str:
    token_dim = getattr(tokenizer, "token_dim", None)
    if tokenizer.codebook_size:
        dim = f" x {token_dim}" if token_dim else ""
        return f"{tokenizer.codebook_size} codes{dim} (discrete ids)"
    dim = f", {token_dim} channels per token" if token_dim else ""
    return f"none: continuous tokens{dim}"


def model_title(tokenizer: Tokenizer, info: CardInfo) -> str:
    if info.repo_id:
        return info.repo_id.rsplit("/", 1)[-1]
    return f"{tokenizer.model_type} tokenizer" + (f" ({info.experiment})" if info.experiment else "")


def _metrics_data_name(entry: dict[str, Any]) -> str:
    data = entry.get("data")
    if isinstance(data, dict):
        data = data.get("name") or describe_data(data)
    return short_path(data) if data else "unknown"


def front_matter(tokenizer: Tokenizer, info: CardInfo) -> str:
    """The YAML header: license, library_name, tags, metric names and a model-index of the values."""
    from huggingface_hub import EvalResult, ModelCardData

    tags = [LIBRARY_NAME, "visual-tokenizer", f"{tokenizer.input_kind}-tokenizer", tokenizer.model_type,
            "discrete-tokens" if tokenizer.codebook_size else "continuous-tokens"]
    results, names = [], []
    for entry in info.metrics:
        data = _metrics_data_name(entry)
        resolution = entry.get("resolution")
        for key, (display, _) in METRICS.items():
            value = entry.get(key)
            if not _is_number(value):
                continue
            if key not in names:
                names.append(key)
            results.append(EvalResult(
                task_type="image-to-image", task_name="Image reconstruction",
                dataset_type=data, dataset_name=f"{data} ({resolution} px)" if resolution else data,
                metric_type=key, metric_name=display, metric_value=float(value),
            ))
    card_data = ModelCardData(
        license=info.license, library_name=LIBRARY_NAME, tags=tags, metrics=names or None,
        model_name=model_title(tokenizer, info) if results else None, eval_results=results or None,
    )
    return card_data.to_yaml()


def _model_section(tokenizer: Tokenizer, info: CardInfo) -> list[str]:
    size = getattr(tokenizer, "image_size", None)
    n_params = parameter_count(tokenizer)
    rows = [
        ("model type", f"`{tokenizer.model_type}`"),
        ("variant", f"`{info.experiment}`" if info.experiment else None),
        ("image size", f"{size} x {size}" if size else None),
        ("tokens per image", getattr(tokenizer, "num_tokens", None)),
        ("codebook", codebook_text(tokenizer)),
        ("parameters", f"{format_count(n_params)} ({n_params:,})"),
        ("weights", info.weights),
    ]
    config = json.dumps(tokenizer.config, indent=2, sort_keys=True)
    return ["## Model", "", *_table(rows), "",
            "<details><summary>Architecture (<code>config.json</code>)</summary>", "",
            "```json", config, "```", "", "</details>", ""]


def _recipe_text(config: dict[str, Any] | None) -> str | None:
    """The non-zero `*_weight` terms of the objective, e.g. 'pixel_weight 1.0, lpips_weight 1.0'."""
    objective = _get(config, "model.objective")
    if not isinstance(objective, dict):
        return None
    gan = _is_number(objective.get("gan_weight")) and objective["gan_weight"] > 0
    terms = []
    for key, value in objective.items():
        if not key.endswith("_weight") or not _is_number(value) or not value:
            continue
        if key == "lecam_weight" and not gan:  # a GAN regulariser: meaningless without the GAN
            continue
        start = objective.get("gan_start_step") if key == "gan_weight" else None
        terms.append(f"{key} {value}" + (f" (from step {start})" if start else ""))
    return ", ".join(terms) or None


def _training_section(info: CardInfo) -> list[str]:
    cfg = info.run_config
    optimizer = _get(cfg, "model.optimizer")
    optimizer_text = None
    if isinstance(optimizer, dict):
        name = str(optimizer.get("_target_", "")).rsplit(".", 1)[-1] or "optimizer"
        details = [f"{k} {optimizer[k]}" for k in ("lr", "weight_decay") if optimizer.get(k) is not None]
        optimizer_text = f"{name} ({', '.join(details)})" if details else name
    schedule = _get(cfg, "model.schedule")
    schedule_text = None
    if isinstance(schedule, dict):
        schedule_text = f"{schedule.get('name', '?')}, warmup {schedule.get('warmup_steps', 0)} steps"
    rows = [
        ("experiment", f"`{info.experiment}`" if info.experiment else None),
        ("data", describe_data(_get(cfg, "data"))),
        ("steps", f"{info.step:,}" if info.step is not None else None),
        ("batch size per device", _get(cfg, "data.batch_size")),
        ("devices", _get(cfg, "trainer.devices")),
        ("precision", _get(cfg, "trainer.precision")),
        ("optimizer", optimizer_text),
        ("schedule", schedule_text),
        ("EMA decay", _get(cfg, "model.ema_decay")),
        ("objective", _recipe_text(cfg)),
    ]
    if all(value in (None, "") for _, value in rows):
        return []
    return ["## Training", "", *_table(rows), ""]


def _evaluation_section(info: CardInfo) -> list[str]:
    lines: list[str] = []
    if info.metrics:
        keys = [k for k in METRICS if any(_is_number(e.get(k)) for e in info.metrics)]
        header = ["data", "resolution", "images", "weights evaluated"] + [METRICS[k][0] for k in keys]
        lines += ["## Evaluation", "",
                  "Reconstruction metrics of the evaluation runs (`metrics.json`): rFID on Inception-v3 "
                  "features with float64 statistics, PSNR and SSIM on [0, 1].", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for entry in info.metrics:
            tokenizer = entry.get("tokenizer")
            cells = [_metrics_data_name(entry), entry.get("resolution") or "–", entry.get("num_images") or "–",
                     PurePath(str(tokenizer)).name if tokenizer else "–"]
            cells += [format_metric(k, entry.get(k)) for k in keys]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    if info.validation:
        values = {k.split("/", 1)[-1]: v for k, v in info.validation.items() if _is_number(v)}
        if values:
            lines += ["## Validation at the end of training", "",
                      "| " + " | ".join(METRICS.get(k, (k, ""))[0] for k in values) + " |",
                      "|" + "---|" * len(values),
                      "| " + " | ".join(format_metric(k, v) for k, v in values.items()) + " |", ""]
    return lines


def _input_text(tokenizer: Tokenizer) -> str:
    """'a 256 x 256 image', or 'a clip of 16 frames of 256 x 256' for video tokenizers."""
    size = getattr(tokenizer, "image_size", None)
    if tokenizer.input_kind == "video":
        frames = getattr(tokenizer, "num_frames", None)
        return f"a clip of {frames or 'T'} frames" + (f" of {size} x {size}" if size else "")
    return f"a {size} x {size} image" if size else "an image"


def _usage_section(tokenizer: Tokenizer, info: CardInfo) -> list[str]:
    size = getattr(tokenizer, "image_size", None) or 256
    k = getattr(tokenizer, "num_tokens", "K")
    location = info.repo_id or "path/to/this/folder"
    shape = (f"4, {getattr(tokenizer, 'num_frames', 16)}, 3, {size}, {size}" if tokenizer.input_kind == "video"
             else f"4, 3, {size}, {size}")
    code = [
        "import torch",
        "from tokenizers_vis import load_tokenizer",
        "",
        f'tokenizer = load_tokenizer("{location}")  # a Hub id or a local folder; eval mode',
        f"images = torch.rand({shape})  # RGB in [0, 1]",
        "with torch.no_grad():",
        "    encoded = tokenizer.encode(images)",
    ]
    if tokenizer.codebook_size:
        code += [f"    ids = encoded.ids  # (4, {k}) token ids in [0, {tokenizer.codebook_size})",
                 "    reconstructions = tokenizer.decode(ids).clamp(0, 1)"]
    else:
        code += [f"    latents = encoded.latents  # (4, {k}, C) continuous tokens",
                 "    reconstructions = tokenizer.decode(encoded).clamp(0, 1)"]
    return ["## Usage", "", "With `tokenizers_vis` installed:", "", "```python", *code, "```", ""]


def render_model_card(tokenizer: Tokenizer, info: CardInfo | None = None) -> str:
    """The full README.md text of an exported tokenizer folder."""
    info = info or CardInfo()
    kind = (f"{tokenizer.codebook_size}-entry codebook" if tokenizer.codebook_size
            else "continuous tokens")
    intro = (f"A `{tokenizer.model_type}` visual tokenizer trained with `tokenizers_vis`: it turns "
             f"{_input_text(tokenizer)} into "
             f"{getattr(tokenizer, 'num_tokens', 'a sequence of')} tokens ({kind}) and decodes them back to pixels.")
    lines = ["---", front_matter(tokenizer, info).rstrip("\n"), "---", "", f"# {model_title(tokenizer, info)}", "",
             intro, ""]
    lines += _model_section(tokenizer, info)
    lines += _training_section(info)
    lines += _evaluation_section(info)
    if info.grid:
        when = f" at step {info.grid_step:,}" if info.grid_step is not None else ""
        lines += ["## Sample reconstructions", "", "Validation images (top row) and their reconstructions "
                  f"(bottom row), logged during training{when}.", "", f"![reconstructions]({info.grid})", ""]
    if info.video:
        lines += [f"[`{info.video}`]({info.video}): validation clips with their reconstructions below, as a "
                  "video.", ""]
    lines += _usage_section(tokenizer, info)
    lines += ["## License", "", f"The weights are released under `{info.license}`. The terms of the training "
              "data may also apply.", ""]
    return "\n".join(lines)
