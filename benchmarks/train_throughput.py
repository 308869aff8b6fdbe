r"""Throughput of the real training step: images/sec, peak memory, parameters, FLOPs per image.

    python benchmarks/train_throughput.py --experiment demo --resolution 64 --steps 20
    python benchmarks/train_throughput.py --experiment titok_b --tiny --json out.json
    python benchmarks/train_throughput.py --experiment titok_bl64_vq8k --resolution 256 --batch 32 \
        --device cuda --precision bf16-mixed --compile
    python benchmarks/train_throughput.py --sweep cpu          # `make bench`: one table
    python benchmarks/train_throughput.py --experiment demo --profile   # top ops of the step

The step is `TokenizerModule.training_step` run by a `lightning.Trainer` (generator and
discriminator losses, one backward, clipping, both optimizers, EMA), fed one synthetic batch
from memory so data loading is excluded (`data_throughput.py` measures that). A callback
timestamps each step after the warm-up, synchronizing CUDA at both ends; img/s is the batch
over the median step time, and the time the Trainer spends between steps is the loop overhead.
Perceptual networks always get random weights (same cost, nothing to download) and, by default,
the GAN phase is on (`--gan config` keeps the experiment's `gan_start_step`).

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one forward + backward of the step's loss
(generator with its perceptual and adversarial terms, plus the discriminator's loss when the GAN
phase is on), and of the tokenizer alone ("tok"). It counts matmuls, convolutions and attention
only (not norms, activations or the optimizer), so achieved FLOP/s is a lower bound of what the
hardware does.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import common

# `--sweep cpu` (`make bench`): a few minutes on 2 cores. (label, arguments); a row's own
# --steps / --warmup win over the command line's.
NO_PERCEPTUAL = ["--set", "model.objective.lpips_weight=0", "--set", "model.objective.convnext_weight=0"]
CPU_SWEEP: list[tuple[str, list[str]]] = [
    ("demo", ["--experiment", "demo", "--resolution", "32"]),
    ("demo", ["--experiment", "demo", "--resolution", "64"]),
    ("demo", ["--experiment", "demo", "--resolution", "96"]),
    ("demo", ["--experiment", "demo", "--resolution", "64", "--tokens", "16"]),
    ("demo", ["--experiment", "demo", "--resolution", "64", "--tokens", "64"]),
    ("demo", ["--experiment", "demo", "--resolution", "64", "--precision", "bf16-mixed"]),
    ("titok_b tiny, GAN", ["--experiment", "titok_b", "--tiny", "--resolution", "64", "--batch", "16",
                           *NO_PERCEPTUAL]),
    # The full one-stage objective: ConvNeXt-S runs at 224 px whatever the image size.
    ("titok_b tiny, GAN+LPIPS+ConvNeXt", ["--experiment", "titok_b", "--tiny", "--resolution", "64",
                                          "--batch", "4", "--steps", "3", "--warmup", "1"]),
    # TokenFlow: CLIP tower + VQGAN CNN + multi-scale shared-mapping quantizer + distillation teacher.
    ("tokenflow_demo", ["--experiment", "tokenflow_demo", "--resolution", "64", "--steps", "5", "--warmup", "1"]),
]

# `--sweep gpu`: the released sizes at 256 px on one GPU, and the speed switches on one of them.
GPU_BASE = ["--resolution", "256", "--batch", "32", "--precision", "bf16-mixed"]
FUSED = ["--set", "++model.optimizer.fused=true", "--set", "++model.disc_optimizer.fused=true"]
GPU_SWEEP: list[tuple[str, list[str]]] = [
    ("titok_bl64_vq8k", ["--experiment", "titok_bl64_vq8k", *GPU_BASE]),
    ("titok_bl64_vq8k, fused AdamW", ["--experiment", "titok_bl64_vq8k", *GPU_BASE, *FUSED]),
    ("titok_bl64_vq8k, fused, channels_last", ["--experiment", "titok_bl64_vq8k", *GPU_BASE, *FUSED,
                                               "--channels-last"]),
    ("titok_bl64_vq8k, fused", ["--experiment", "titok_bl64_vq8k", *GPU_BASE, *FUSED, "--compile"]),
    ("titok_sl256_vq8k, fused", ["--experiment", "titok_sl256_vq8k", *GPU_BASE, *FUSED]),
    ("titok_ll32_vae, fused", ["--experiment", "titok_ll32_vae", *GPU_BASE, *FUSED]),
]

COLUMNS = [
    ("label", "model"), ("resolution", "res"), ("tokens", "tokens"), ("batch", "batch"), ("steps", "steps"),
    ("precision", "precision"), ("compile", "compile"), ("gan", "GAN"), ("params_m", "params M"),
    ("images_per_sec", "img/s"), ("step_ms", "step ms"), ("graph_breaks", "graph breaks"),
    ("host_syncs_per_step", "syncs/step"), ("tokenizer_gflop_per_image", "tok GFLOP/img"),
    ("gflop_per_image", "GFLOP/img"),
    ("achieved_gflops", "GFLOP/s"), ("peak_mem_mb", "peak MB"), ("delta_mem_mb", "+MB"),
    ("loop_overhead_pct", "loop %"),
]


class SyntheticBatches(torch.utils.data.IterableDataset):
    """The same in-memory batch forever: the step is measured without data loading."""

    def __init__(self, batch: dict[str, Any]):
        super().__init__()
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def step_timer_class():
    import lightning as L

    class StepTimer(L.Callback):
        """Times each training step after `warmup` steps; CUDA is synchronized at both ends.

        With `profile` the measured steps run under `torch.profiler` (which slows them).
        """

        def __init__(self, warmup: int, device: torch.device, profile: bool = False, steps: int | None = None):
            super().__init__()
            self.warmup = warmup
            self.last = warmup + steps if steps is not None else None  # steps after it are not timed
            self.device = device
            self.seen = 0
            self.step_seconds: list[float] = []
            self.first_start: float | None = None
            self.last_end: float | None = None
            self.gan_steps = 0
            self.profiler = None
            if profile:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if device.type == "cuda":
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities, record_shapes=False)

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if self.seen < self.warmup or (self.last is not None and self.seen >= self.last):
                return
            objective = module.objective
            self.gan_steps += bool(objective.discriminator is not None
                                   and objective.discriminator_active(int(module.step)))
            if self.first_start is None and self.profiler is not None:
                self.profiler.__enter__()
            common.synchronize(self.device)
            self._start = time.perf_counter()
            if self.first_start is None:
                self.first_start = self._start

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.seen += 1
            if self.seen <= self.warmup or (self.last is not None and self.seen > self.last):
                return
            common.synchronize(self.device)
            self.last_end = time.perf_counter()
            self.step_seconds.append(self.last_end - self._start)

        def on_train_end(self, trainer, module) -> None:
            if self.profiler is not None and self.first_start is not None:
                self.profiler.__exit__(None, None, None)

    return StepTimer


# Ops that read a device value back to the host on a GPU: scalar reads (item, bool, int, float), and
# ops whose output size depends on the data (boolean-mask indexing, nonzero, bincount, unique).
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "bincount", "_unique", "_unique2",
                      "unique_dim", "unique_consecutive", "masked_scatter"})


def _is_sync(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave":  # with a tensor of repeats and no output_size
        return isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None and \
            (len(args) < 2 or isinstance(args[1], torch.Tensor))
    if name in ("index", "index_put", "index_put_"):  # boolean-mask indices
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
    return False


class HostSyncs(TorchDispatchMode):
    """Counts the ops that would read back from a GPU, with the innermost repository frame of each."""

    def __init__(self):
        super().__init__()
        self.sites: dict[str, int] = {}
        self.paused = 0

    def record(self) -> None:
        import traceback

        frames = [f for f in traceback.extract_stack()[:-2]
                  if "/tokenizers_vis/" in f.filename or "/lightning/" in f.filename]
        site = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        self.sites[site] = self.sites.get(site, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused and _is_sync(func, args, kwargs):
            self.record()
        return func(*args, **kwargs)


def _host_step_counts(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer keeps its step counts in host tensors (not fused, not capturable)."""
    return not (optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))


@contextlib.contextmanager
def counting_host_syncs():
    """Count, in the enclosed code, the ops that read a value back from a GPU (`SYNC_OPS`, boolean-mask
    indexing, `Tensor.tolist`); yields the `HostSyncs` mode whose `sites` hold the counts. Not counted: the
    step of an optimizer that keeps its step counts on the host (its `.item()`s read no device memory)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    mode = HostSyncs()
    original = torch.Tensor.tolist

    def tolist(tensor):
        if not mode.paused:
            mode.record()
        return original(tensor)

    def pause(optimizer, args, kwargs):
        mode.paused += _host_step_counts(optimizer)

    def resume(optimizer, args, kwargs):
        mode.paused -= _host_step_counts(optimizer)

    hooks = [register_optimizer_step_pre_hook(pause), register_optimizer_step_post_hook(resume)]
    torch.Tensor.tolist = tolist
    try:
        with mode:
            yield mode
    finally:
        torch.Tensor.tolist = original
        for hook in hooks:
            hook.remove()


def sync_counter_class():
    import lightning as L

    class SyncCounter(L.Callback):
        """Counts host syncs in `count` steps after the first `skip` (each one's whole Lightning step:
        training_step and the loop around it). On a GPU: `torch.cuda.set_sync_debug_mode`, whose warnings
        are counted. On a CPU nothing synchronizes, so the ops that would are counted (`SYNC_OPS`,
        `Tensor.tolist`). Not counted: a non-fused optimizer's own step, whose step counts are host
        tensors on a GPU as well (its `.item()`s read no device memory)."""

        def __init__(self, skip: int, count: int, device: torch.device):
            super().__init__()
            self.skip, self.count, self.device = skip, count, device
            self.seen = 0
            self.sites: dict[str, int] = {}
            self.steps_counted = 0
            self._active = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if not self.skip <= self.seen < self.skip + self.count:
                return
            if self.device.type == "cuda":
                self._warnings = warnings.catch_warnings(record=True)
                self._records = self._warnings.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                self._active = "cuda"
            else:
                self._counting = counting_host_syncs()
                self._mode = self._counting.__enter__()
                self._active = "cpu"

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.seen += 1
            if self._active is None:
                return
            if self._active == "cuda":
                torch.cuda.set_sync_debug_mode("default")
                self._warnings.__exit__(None, None, None)
                for record in self._records:
                    if "synchroniz" in str(record.message):
                        site = f"{Path(record.filename).name}:{record.lineno}"
                        self.sites[site] = self.sites.get(site, 0) + 1
            else:
                self._counting.__exit__(None, None, None)
                for site, n in self._mode.sites.items():
                    self.sites[site] = self.sites.get(site, 0) + n
            self._active = None
            self.steps_counted += 1

        @property
        def per_step(self) -> float | None:
            return sum(self.sites.values()) / self.steps_counted if self.steps_counted else None

    return SyncCounter


def graph_breaks() -> tuple[int, int]:
    """(graph breaks, graphs compiled) that dynamo recorded in this process."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), int(counters["stats"]["unique_graphs"])


def training_flops(module, images: torch.Tensor, step: int) -> tuple[int, int]:
    """Counted FLOPs of one forward + backward on `images`: (the step's whole loss, the tokenizer alone).

    The step's loss is the generator objective (tokenizer, perceptual networks, discriminator
    logits) plus the discriminator's loss when the GAN phase is on; the tokenizer alone is its own
    forward and the backward through it. Gradients are cleared afterwards.
    """
    from torch.utils.flop_counter import FlopCounterMode

    objective, tokenizer = module.objective, module.tokenizer
    module.train()
    # Count the eager ops even when the tokenizer was compiled (set_stance: torch >= 2.6).
    eager = getattr(torch.compiler, "set_stance", None)
    with eager("force_eager") if eager else contextlib.nullcontext():
        with FlopCounterMode(display=False) as whole:
            loss, _, output = objective(tokenizer, images, step)
            if objective.discriminator is not None and objective.discriminator_active(step):
                d_loss, _ = objective.discriminator_loss(images, output.reconstruction.detach(), step)
                loss = loss + d_loss
            loss.backward()
        with FlopCounterMode(display=False) as alone:
            output = tokenizer(images)
            loss = output.aux_loss.float()
            if output.reconstruction is not None:
                loss = loss + output.reconstruction.float().square().mean()
            loss.backward()
    module.zero_grad(set_to_none=True)
    return whole.get_total_flops(), alone.get_total_flops()


def top_ops(profiler, device: torch.device, steps: int, limit: int = 15) -> list[dict[str, Any]]:
    """The ops with the most self time (CPU, or CUDA on a GPU), per step."""
    events = profiler.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:limit]
    return [{"op": e.key, "self_ms_per_step": round(getattr(e, attr) / 1000 / steps, 3),
             "self_pct": round(100 * getattr(e, attr) / total, 1), "calls_per_step": round(e.count / steps, 1)}
            for e in ranked]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import hydra
    import lightning as L

    common.quiet()
    device = common.resolve_device(args.device)
    load_before = common.load_average()
    updates = common.model_updates(args)
    updates["model.compile"] = bool(args.compile)
    cfg = common.compose_config(args.experiment, args.tiny, args.overrides, updates, tokens=args.tokens)
    objective_cfg = cfg.model.objective
    if "random_perceptual_weights" in objective_cfg:
        objective_cfg.random_perceptual_weights = True
    has_gan = objective_cfg.get("discriminator") is not None and objective_cfg.get("gan_weight", 0) > 0
    if has_gan and args.gan != "config":
        objective_cfg.gan_start_step = 0 if args.gan == "on" else 2**62
    batch_size, resolution = int(cfg.data.batch_size), int(cfg.data.resolution)

    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model)
    tokenizer = module.tokenizer
    images = common.random_images(batch_size, resolution, device)
    if args.channels_last:
        module.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    loader = torch.utils.data.DataLoader(
        SyntheticBatches({"image": images, "label": torch.zeros(batch_size, dtype=torch.long, device=device)}),
        batch_size=None, num_workers=0)

    timer = step_timer_class()(args.warmup, device, profile=args.profile, steps=args.steps)
    # Host syncs are counted in extra steps after the timed ones (the counting slows a step), and one
    # more step ends the run: the module reads its skip counters back at the last step and every
    # log_every_n_steps (here never in between), not in the steps counted.
    syncs = sync_counter_class()(args.warmup + args.steps, args.sync_steps, device)
    torch._dynamo.reset()  # graph-break counters of this run only
    torch._dynamo.utils.counters.clear()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=args.precision,
        max_steps=args.warmup + args.steps + args.sync_steps + 1, max_epochs=-1, limit_val_batches=0,
        num_sanity_val_steps=0, log_every_n_steps=10**9,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer, syncs], use_distributed_sampler=False, benchmark=device.type == "cuda",
        default_root_dir=tempfile.gettempdir())
    with common.MemoryMeter(device) as memory:
        trainer.fit(module, train_dataloaders=loader)

    module.to(device)  # Lightning may move it back to the CPU at teardown
    flop_batch = images[: min(2, batch_size)]
    flops, tokenizer_flops = (f / flop_batch.shape[0] for f in training_flops(module, flop_batch, int(module.step)))

    breaks, graphs = graph_breaks()
    measured = sum(timer.step_seconds)
    wall = (timer.last_end - timer.first_start) if timer.step_seconds else 0.0
    # The median step: robust to the odd step slowed by other processes; the mean is kept too.
    images_per_sec = batch_size / statistics.median(timer.step_seconds)
    discriminator = module.objective.discriminator
    result = {
        "label": args.label or (f"{args.experiment} tiny" if args.tiny else args.experiment),
        "experiment": args.experiment,
        "tiny": args.tiny,
        "device": device.type,
        "resolution": resolution,
        "tokens": int(tokenizer.num_tokens),
        "batch": batch_size,
        "precision": args.precision,
        "compile": bool(args.compile),
        "channels_last": bool(args.channels_last),
        "gan": "partial" if 0 < timer.gan_steps < args.steps else timer.gan_steps == args.steps,
        "warmup_steps": args.warmup,
        "steps": args.steps,
        "params_m": round(common.count_parameters(tokenizer) / 1e6, 3),
        "disc_params_m": round(common.count_parameters(discriminator) / 1e6, 3),
        "frozen_params_m": round(common.count_parameters(getattr(module.objective, "frozen", None)) / 1e6, 3),
        "images_per_sec": round(images_per_sec, 2),
        "images_per_sec_mean": round(args.steps * batch_size / measured, 2),
        "step_ms": round(1000 * statistics.median(timer.step_seconds), 2),
        "step_ms_min": round(1000 * min(timer.step_seconds), 2),
        "step_ms_max": round(1000 * max(timer.step_seconds), 2),
        "loop_overhead_pct": round(100 * max(0.0, wall - measured) / wall, 1) if wall else 0.0,
        # What `model.compile` compiled: the objective (tokenizer forward + losses) or the tokenizer alone.
        "compiled": ("objective" if discriminator is None else "tokenizer") if args.compile else None,
        "graph_breaks": breaks if args.compile else None,
        "graphs": graphs if args.compile else None,
        "host_syncs_per_step": None if syncs.per_step is None else round(syncs.per_step, 2),
        "host_sync_sites": dict(sorted(syncs.sites.items())),
        "fused_optimizer": bool(trainer.optimizers[0].defaults.get("fused")),
        "gflop_per_image": round(flops / 1e9, 4),
        "tokenizer_gflop_per_image": round(tokenizer_flops / 1e9, 4),
        "achieved_gflops": round(flops * images_per_sec / 1e9, 2),
        "peak_mem_mb": round(memory.peak_mb, 1),
        "delta_mem_mb": round(memory.delta_mb, 1),
        "memory": memory.as_dict(),
        "load_average_1min": load_before,
        "overrides": list(args.overrides),
    }
    if args.profile:
        result["profiled"] = True  # times above include the profiler's overhead
        result["top_ops"] = top_ops(timer.profiler, device, args.steps, args.profile_rows)
        if args.trace:
            timer.profiler.export_chrome_trace(str(args.trace))
    return result


def run_sweep(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each configuration in a fresh process, so peak memory and caches are its own."""
    sweep = CPU_SWEEP if name == "cpu" else GPU_SWEEP
    rows = []
    script = Path(__file__).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, extra) in enumerate(sweep):
            out = Path(tmp) / f"{i}.json"
            command = [sys.executable, str(script), "--device", "cpu" if name == "cpu" else "cuda",
                       "--steps", str(args.steps), "--warmup", str(args.warmup),
                       *extra, "--label", label, "--json", str(out), "--quiet"]
            # CPU rows run on one thread unless told otherwise: per-core numbers that stay
            # comparable on a shared machine, where waiting threads make steps many times slower.
            threads = args.threads or (1 if name == "cpu" else None)
            if threads:
                command += ["--threads", str(threads)]
            print(f"[{i + 1}/{len(sweep)}] {' '.join(extra)}", file=sys.stderr, flush=True)
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"benchmark failed: {' '.join(command)}\n{done.stderr[-4000:]}")
            rows.append(common.read_json(out)["results"])
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="measured steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (default 3)")
    parser.add_argument("--sync-steps", type=int, default=2,
                        help="steps after the timed ones in which host syncs are counted (default 2)")
    parser.add_argument("--gan", choices=("on", "off", "config"), default="on",
                        help="GAN phase when the experiment has a discriminator (default: on from step 0)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last weights and images")
    parser.add_argument("--profile", action="store_true", help="torch.profiler over the measured steps")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--trace", type=Path, default=None, help="with --profile: write a Chrome trace here")
    parser.add_argument("--sweep", choices=("cpu", "gpu"), default=None,
                        help="run a preset list of configurations (one process each) and print one table; "
                             "the CPU sweep uses one torch thread unless --threads is given")
    parser.add_argument("--label", default=None, help="name shown in the table")
    parser.add_argument("--quiet", action="store_true", help="no table (used by --sweep)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1 (the first step allocates optimizer state)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.set_threads(args.threads)
    if args.sweep:
        device = common.resolve_device("cuda" if args.sweep == "gpu" else "cpu")
        machine = common.machine_info(device)
        if args.sweep == "cpu":
            machine["torch_threads"] = args.threads or 1
        rows = run_sweep(args.sweep, args)
        payload = {"benchmark": "train_throughput", "sweep": args.sweep, "machine": machine, "results": rows}
    else:
        machine = common.machine_info(common.resolve_device(args.device))
        result = run(args)
        rows = [result]
        payload = {"benchmark": "train_throughput", "machine": machine, "results": result}
    common.write_json(args.json, payload)
    if not args.quiet:
        where = f"sweep {args.sweep}" if args.sweep else rows[0]["device"]
        print(f"Training step throughput ({where}); {common.describe_machine(payload['machine'])}")
        common.warn_if_busy(payload["machine"], rows)
        print(common.format_table(rows, COLUMNS, markdown=args.markdown))
        for row in rows:
            if row.get("top_ops"):
                print(f"\nTop ops by self {'CUDA' if row['device'] == 'cuda' else 'CPU'} time per step "
                      f"({row['label']}, under the profiler):")
                print(common.format_table(row["top_ops"], [("op", "op"), ("self_ms_per_step", "ms/step"),
                                                           ("self_pct", "%"), ("calls_per_step", "calls/step")],
                                          markdown=args.markdown))
    return payload


if __name__ == "__main__":
    main()
