"""Train-step time and memory of Mixture-of-Experts against the dense model.

    efflm bench moe [--steps 10] [--warmup 2] [--out FILE] [key=value ...]

Side by side in one run: `tiny` (dense) and `tiny_moe` (8 experts, top-2, equal
active parameters) with each dropless backend and with capacity dispatch at factors
1.0 and 1.25. Each step is compiled once, run `--warmup` times, then timed over
`--steps` runs (median); temp memory is the compiled step's `memory_analysis()`.
The ratio is step time over the dense model's.
"""

from __future__ import annotations

import argparse
import sys

from efflm.bench.mfu import measure
from efflm.bench.report import emit, header
from efflm.config import load_config

VARIANTS = [
    ("dense (tiny)", "tiny", []),
    ("moe dropless xla (row blocks)", "tiny_moe", ["model.moe.impl=xla"]),
    ("moe dropless ragged_dot", "tiny_moe", ["model.moe.impl=ragged"]),
    ("moe capacity 1.0", "tiny_moe", ["model.moe.dispatch=capacity",
                                      "model.moe.capacity_factor=1.0"]),
    ("moe capacity 1.25", "tiny_moe", ["model.moe.dispatch=capacity",
                                       "model.moe.capacity_factor=1.25"]),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="efflm bench moe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="moe", choices=["moe"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="", help="also write the table to this markdown file")
    p.add_argument("overrides", nargs="*", help="key=value applied to every config")
    args = p.parse_intermixed_args(argv)
    rows = []
    for label, preset, extra in VARIANTS:
        cfg = load_config(preset, ["logging.progress=false", *args.overrides, *extra])
        rows.append((label, measure(cfg, args.steps, args.warmup)))
    dense = rows[0][1]["step_time"]
    lines = [*header("moe", argv if argv is not None else sys.argv[1:]),
             "| variant | params | active GFLOP/step | step s | vs dense | tokens/s | "
             "temp MiB |", "|---|---|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(f"| {label} | {r['params'] / 1e6:.1f}M | {r['model_flops'] / 1e9:.1f} | "
                     f"{r['step_time']:.3f} | {r['step_time'] / dense:.2f}x | "
                     f"{r['tokens_per_sec']:.0f} | {r['temp_bytes'] / 2**20:.0f} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
