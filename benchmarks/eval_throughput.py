r"""Evaluation throughput of a tokenizer: images/sec of encode, decode and the full evaluation.

    python benchmarks/eval_throughput.py --experiment demo               # random weights
    python benchmarks/eval_throughput.py --experiment titok_b --tiny --batch 8
    python benchmarks/eval_throughput.py --tokenizer outputs/demo/checkpoints/last.ckpt
    python benchmarks/eval_throughput.py --experiment titok_bl64_vq8k --resolution 256 \
        --batch 64 --device cuda --precision bf16-mixed --metrics full

Three timings over the same random batch, in eval mode without autograd:
  encode   images -> tokens
  decode   token ids -> images (latents for continuous models), the generation-side path
  full     encode + decode + clamp + `ReconstructionMetrics.update`, per batch, as the
           validation loop and the evaluator do; the one final `compute()` (all-reduce, rFID's
           matrix square root) is timed apart, in seconds
`--metrics basic` measures PSNR, SSIM and codebook usage; `full` adds LPIPS and rFID (their
weights must be available locally); `random` adds them with random-weight networks (same
cost as `full`, meaningless values), for timing offline.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import common

COLUMNS = [
    ("label", "model"), ("resolution", "res"), ("tokens", "tokens"), ("batch", "batch"),
    ("precision", "precision"), ("metrics", "metrics"), ("params_m", "params M"),
    ("encode_images_per_sec", "encode img/s"), ("decode_images_per_sec", "decode img/s"),
    ("full_images_per_sec", "full eval img/s"), ("compute_seconds", "compute s"),
    ("peak_mem_mb", "peak MB"),
]


class RandomInceptionFeatures(torch.nn.Module):
    """Inception-v3 pool features at 299 px with random weights: the rFID extractor's cost."""

    num_features = 2048

    def __init__(self):
        super().__init__()
        from torchvision.models import inception_v3

        self.net = inception_v3(weights=None, aux_logits=False, init_weights=False)
        self.net.fc = torch.nn.Identity()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if not images.is_floating_point() else images
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x)


def build_metrics(args: argparse.Namespace, codebook_size: int | None, device: torch.device):
    from tokenizers_vis.metrics import ReconstructionMetrics

    kind = args.metrics
    if kind == "basic":
        metrics = ReconstructionMetrics(codebook_size=codebook_size, fid=False, lpips=False)
    elif kind == "full":
        metrics = ReconstructionMetrics(codebook_size=codebook_size, inception_weights=args.inception_weights,
                                        lpips_weights=args.lpips_weights, strict_fid=True, strict_lpips=True)
    else:
        metrics = ReconstructionMetrics(codebook_size=codebook_size, fid=RandomInceptionFeatures(),
                                        lpips=True, lpips_random_backbone=True)
    return metrics.to(device)


def load_tokenizer(args: argparse.Namespace):
    """The tokenizer to measure and a label for it."""
    if args.tokenizer:
        from tokenizers_vis import load_tokenizer as load

        return load(args.tokenizer), str(args.tokenizer)
    import hydra

    cfg = common.compose_config(args.experiment, args.tiny, args.overrides, common.model_updates(args),
                                tokens=args.tokens)
    torch.manual_seed(0)
    tokenizer = hydra.utils.instantiate(cfg.model.tokenizer)
    if args.batch is None:
        args.batch = int(cfg.data.batch_size)
    return tokenizer, f"{args.experiment} tiny" if args.tiny else args.experiment


def timed(fn, device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        common.synchronize(device)
        start = time.perf_counter()
        fn()
        common.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.quiet()
    device = common.resolve_device(args.device)
    tokenizer, label = load_tokenizer(args)
    batch = args.batch or 16
    resolution = args.resolution or int(tokenizer.image_size)
    tokenizer = tokenizer.to(device).eval().requires_grad_(False)
    if args.compile:
        tokenizer.compile()
    images = common.random_images(batch, resolution, device)

    def amp():
        return common.autocast(device, args.precision)

    with torch.inference_mode(), amp():
        encoded = tokenizer.encode(images)
    tokens = encoded.ids if encoded.ids is not None else encoded.latents
    metrics = build_metrics(args, tokenizer.codebook_size, device)

    def encode():
        with torch.inference_mode(), amp():
            tokenizer.encode(images)

    def decode():
        with torch.inference_mode(), amp():
            tokenizer.decode(tokens)

    def update():
        with torch.inference_mode():
            with amp():
                enc = tokenizer.encode(images)
                recon = tokenizer.decode(enc)
            metrics.update(images, recon.float().clamp(0, 1), enc.ids)

    with common.MemoryMeter(device) as memory:
        times = {name: timed(fn, device, args.repeats, args.warmup)
                 for name, fn in (("encode", encode), ("decode", decode), ("full", update))}
        # The final reduction (rFID's matrix square root) is paid once per evaluation.
        compute_seconds = timed(metrics.compute, device, 1, 0)[0]
    result = {
        "label": args.label or label,
        "device": device.type,
        "resolution": resolution,
        "tokens": int(tokenizer.num_tokens),
        "batch": batch,
        "precision": args.precision,
        "compile": bool(args.compile),
        "metrics": args.metrics,
        "params_m": round(common.count_parameters(tokenizer) / 1e6, 3),
        "peak_mem_mb": round(memory.peak_mb, 1),
        "memory": memory.as_dict(),
    }
    for name, seconds in times.items():
        result[f"{name}_images_per_sec"] = round(batch / statistics.median(seconds), 2)
        result[f"{name}_ms_per_batch"] = round(1000 * statistics.median(seconds), 2)
    result["compute_seconds"] = round(compute_seconds, 3)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_arguments(parser)
    parser.add_argument("--tokenizer", default=None, help="a checkpoint, saved folder or hub id (else --experiment)")
    parser.add_argument("--metrics", choices=("basic", "full", "random"), default="basic")
    parser.add_argument("--inception-weights", default=None, help="with --metrics full: the FID Inception file")
    parser.add_argument("--lpips-weights", default=None, help="with --metrics full: the LPIPS VGG weights")
    parser.add_argument("--repeats", type=int, default=10, help="timed encode / decode calls (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    parser.add_argument("--label", default=None, help="name shown in the table")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.set_threads(args.threads)
    machine = common.machine_info(common.resolve_device(args.device))
    result = run(args)
    payload = {"benchmark": "eval_throughput", "machine": machine, "results": result}
    common.write_json(args.json, payload)
    print(f"Evaluation throughput ({result['device']}); {common.describe_machine(payload['machine'])}")
    common.warn_if_busy(machine, [result])
    print(common.format_table([result], COLUMNS, markdown=args.markdown))
    return payload


if __name__ == "__main__":
    main()
