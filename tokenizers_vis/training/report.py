"""Print the summary of a finished run: `python -m tokenizers_vis.training.report RUN_DIR`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def format_summary(summary: dict) -> str:
    lines = [f"run:        {summary.get('run_dir')}", f"steps:      {summary.get('steps')}",
             f"seconds:    {summary.get('seconds')}"]
    before, after = summary.get("psnr_before"), summary.get("psnr_after")
    if before is not None:
        lines.append(f"PSNR before training: {before:6.2f} dB")
    if after is not None:
        lines.append(f"PSNR after training:  {after:6.2f} dB")
    if before is not None and after is not None:
        lines.append(f"gain:                 {after - before:+6.2f} dB")
    flat = summary.get("psnr_flat_baseline")
    if flat is not None:
        lines.append(f"flat-colour baseline: {flat:6.2f} dB (each validation image painted its mean colour)")
        if after is not None:
            lines.append(f"margin over baseline: {after - flat:+6.2f} dB")
    if summary.get("grid"):
        lines.append(f"reconstructions (originals on top): {summary['grid']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tokenizers_vis.training.report RUN_DIR", file=sys.stderr)
        return 2
    path = Path(argv[0]) / "summary.json"
    if not path.is_file():
        print(f"no summary.json in {argv[0]} (did the run finish?)", file=sys.stderr)
        return 1
    print(format_summary(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
