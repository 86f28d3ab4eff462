"""Train-step time and peak memory per attention kind as the sequence grows.

    efflm bench attention [--kinds softmax,linear,gla,based] [--lengths 512,2048,8192]
                          [--tokens 8192] [--steps 3] [--out FILE] [key=value ...]
    efflm bench attention --quality [--presets tiny,tiny_sliding,tiny_power,...]
                          [--train-steps 300] [--out FILE] [key=value ...]

Each kind runs the `tiny` preset's widths at each length with the batch set so that
every step holds `--tokens` tokens; the step is compiled once, run `--warmup` times and
timed over `--steps` runs (median). Memory is the compiled step's temp bytes
(`memory_analysis()`). The ratio column is the step time over the same kind's at the
shortest length: at equal tokens per step, a linear kind's should stay near 1 while
softmax attention's grows with the length.

`--quality`: each preset trained for `--train-steps` steps on the default corpus from
the same seed and data order, one run each: validation bits per byte over
`train.eval_batches` batches and the median step time (the compiling first step left
out).
"""

from __future__ import annotations

import argparse
import sys

from efflm.bench.mfu import measure
from efflm.bench.report import emit, header
from efflm.config import load_config

QUALITY_PRESETS = "tiny,tiny_sliding,tiny_power,tiny_sliding_hybrid"


def _quality_table(args, argv) -> list[str]:
    import os
    import tempfile

    from efflm.bench.report import train_and_evaluate

    lines = [*header("attention", argv),
             f"Trained {args.train_steps} steps each on pycode, one run each.", "",
             "| preset | attention | val bits/byte | step s |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as root:
        for preset in args.presets.split(","):
            r = train_and_evaluate(preset, list(args.overrides), args.train_steps,
                                   os.path.join(root, preset))
            attention = r["restored"][0].model.attention
            kinds = attention.pattern or attention.kind
            lines.append(f"| {preset} | {kinds} | {r['bpb']:.4f} | {r['step_time']:.3f} |")
            print(lines[-1], flush=True)
    return lines


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
    p.add_argument("--quality", action="store_true",
                   help="train each of --presets; validation bits per byte")
    p.add_argument("--presets", default=QUALITY_PRESETS)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("overrides", nargs="*", help="key=value applied to every run")
    args = p.parse_intermixed_args(argv)
    if args.quality:
        emit(_quality_table(args, argv if argv is not None else sys.argv[1:]), args.out)
        return 0
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
