"""Resident memory of the EMA copy when the tokenizer holds a large frozen part.

Builds a TiTok whose encoder (and latent tokens, quantizer) is frozen, as stage 2 of the two-stage
recipe freezes them, then measures how much the process's resident memory grows when the training
module is built: the old way (a deep copy of the whole tokenizer for EMA) against ours (`ema_copy`:
trainable parameters copied, frozen ones and buffers shared). Each variant runs in its own process
so their memory does not mix. Prints a table; `--json PATH` also writes the numbers.

    python benchmarks/ema_memory.py                        # ~0.5 B frozen parameters, CPU, ~1 min
    python benchmarks/ema_memory.py --encoder-depth 4      # smaller
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = ("no_ema", "full_copy", "trainable_only")


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc), in MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(variant: str, width: int, depth: int) -> dict:
    import copy

    import torch

    from tokenizers_vis.losses.objective import ReconstructionObjective
    from tokenizers_vis.models.titok import TiTok
    from tokenizers_vis.training.module import TokenizerModule

    tokenizer = TiTok(image_size=64, patch_size=16, num_latent_tokens=8, encoder_width=width, encoder_depth=depth,
                      encoder_heads=max(1, width // 64), decoder_width=128, decoder_depth=2, decoder_heads=2,
                      codebook_size=64, token_dim=8, frozen=["latent_tokens", "encoder", "quantize"])
    objective = ReconstructionObjective(lpips_weight=0.0, gan_weight=0.0, discriminator=None)
    frozen = sum(p.numel() for p in tokenizer.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in tokenizer.parameters() if p.requires_grad)
    gc.collect()
    before = rss_mb()
    # trainable_only is the module's own EMA (`ema_copy`); full_copy is what EMA did before.
    module = TokenizerModule(tokenizer, objective, optimizer=torch.optim.AdamW,
                             ema_decay=0.999 if variant == "trainable_only" else None)
    if variant == "full_copy":
        module.ema = copy.deepcopy(tokenizer).requires_grad_(False).eval()
    gc.collect()
    grown = rss_mb() - before
    ema_own = 0
    if module.ema is not None:
        shared = {id(p) for p in tokenizer.parameters()}
        ema_own = sum(p.numel() for p in module.ema.parameters() if id(p) not in shared)
    return {"variant": variant, "frozen_params": frozen, "trainable_params": trainable,
            "ema_own_params": ema_own, "rss_growth_mb": round(grown, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder-width", type=int, default=1024)
    parser.add_argument("--encoder-depth", type=int, default=40)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args.variant, args.encoder_width, args.encoder_depth)))
        return
    rows = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--encoder-width", str(args.encoder_width),
                              "--encoder-depth", str(args.encoder_depth)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    frozen = rows[0]["frozen_params"]
    print(f"TiTok, frozen encoder {args.encoder_width} x {args.encoder_depth}: {frozen / 1e6:.1f} M frozen "
          f"parameters ({frozen * 4 / 2**20:.0f} MB float32), {rows[0]['trainable_params'] / 1e6:.2f} M trainable")
    print(f"{'EMA':<16}{'EMA own params':>16}{'RSS growth (MB)':>18}")
    for row in rows:
        print(f"{row['variant']:<16}{row['ema_own_params'] / 1e6:>15.2f}M{row['rss_growth_mb']:>18.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
