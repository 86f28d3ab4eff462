"""Train-step time and peak memory per attention kind as the sequence grows.

    efflm bench attention [--kinds softmax,linear,gla,based] [--lengths 512,2048,8192]
                          [--tokens 8192] [--steps 3] [--out FILE] [key=value ...]

Each kind runs the `tiny` preset's widths at each length with the batch set so that
every step holds `--tokens` tokens; the step is compiled once, run `--warmup` times and
timed over `--steps` runs (median). Memory is the compiled step's temp bytes
(`memory_analysis()`). The ratio column is the step time over the same kind's at the
shortest length: at equal tokens per step, a linear kind's should stay near 1 while
softmax attention's grows with the length.
"""

from __future__ import annotations

import argparse
import sys

from efflm.bench.mfu import measure
from efflm.bench.report import emit, header
from efflm.config import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="efflm bench attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="attention", choices=["attention"])
    p.add_argument("--config", default="tiny")
    p.add_argument("--kinds", default="softmax,linear,gla,based")
    p.add_argument("--lengths", default="512,2048,8192")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="", help="also append the table to this markdown file")
    p.add_argument("overrides", nargs="*", help="key=value applied to every run")
    args = p.parse_intermixed_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    lines = [*header("attention", argv if argv is not None else sys.argv[1:]),
             "| kind | seq len | batch | step s | step / step at shortest | temp MiB |",
             "|---|---|---|---|---|---|"]
    for kind in args.kinds.split(","):
        first = None
        for length in lengths:
            batch = max(1, args.tokens // length)
            cfg = load_config(args.config, [
                "logging.progress=false", f"model.attention.kind={kind}",
                f"model.max_seq_len={max(lengths)}", f"data.seq_len={length}",
                f"train.batch_size={batch}", *args.overrides])
            r = measure(cfg, args.steps, args.warmup)
            first = first or r["step_time"]
            lines.append(f"| {kind} | {length} | {batch} | {r['step_time']:.3f} | "
                         f"{r['step_time'] / first:.2f} | {r['temp_bytes'] / 2**20:.0f} |")
            print(lines[-1], flush=True)
    emit(lines, args.out, append=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
