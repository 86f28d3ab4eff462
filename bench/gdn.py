"""Gated DeltaNet against GLA and softmax attention: step time by length, and quality.

    efflm bench gdn [--lengths 512,4096] [--tokens 8192] [--steps 3] [--warmup 1]
                    [--train-steps 300] [--out FILE] [key=value ...]

Side by side in one run. First, the train-step time of `tiny` (softmax), `tiny_gla`
and `tiny_gdn` at each length, with the batch set so that every step holds `--tokens`
tokens (compiled once, run `--warmup` times, median of `--steps`), its ratio to
softmax's at the same length, and the compiled step's temp memory. Then `tiny`,
`tiny_gla`, `tiny_gdn` and `tiny_gdn_hybrid` (gated_deltanet x 3, softmax) are each
trained for `--train-steps` steps on the default corpus from the same seed and data
order and evaluated: validation bits per byte over `train.eval_batches` batches and
the median logged step time; `--train-steps 0` skips that part. `key=value`
overrides apply to every run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from efflm.bench.mfu import measure
from efflm.bench.report import emit, header, train_and_evaluate
from efflm.config import load_config

TIMED = ("tiny", "tiny_gla", "tiny_gdn")
TRAINED = ("tiny", "tiny_gla", "tiny_gdn", "tiny_gdn_hybrid")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="efflm bench gdn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="gdn", choices=["gdn"])
    p.add_argument("--lengths", default="512,4096")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per timed step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--out", default="", help="also write the tables to this markdown file")
    p.add_argument("overrides", nargs="*", help="key=value applied to every run")
    args = p.parse_intermixed_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    lines = [*header("gdn", argv if argv is not None else sys.argv[1:]),
             f"Train-step time, {args.tokens} tokens per step.", "",
             "| preset | seq len | batch | step s | vs tiny (softmax) | temp MiB |",
             "|---|---|---|---|---|---|"]
    for length in lengths:
        batch = max(1, args.tokens // length)
        softmax = None
        for preset in TIMED:
            cfg = load_config(preset, ["logging.progress=false",
                                       f"model.max_seq_len={max(lengths)}",
                                       f"data.seq_len={length}", f"train.batch_size={batch}",
                                       *args.overrides])
            r = measure(cfg, args.steps, args.warmup)
            softmax = softmax or r["step_time"]
            lines.append(f"| {preset} | {length} | {batch} | {r['step_time']:.3f} | "
                         f"{r['step_time'] / softmax:.2f}x | {r['temp_bytes'] / 2**20:.0f} |")
            print(lines[-1], flush=True)
    if args.train_steps:
        lines += ["", f"Validation after {args.train_steps} steps (pycode, from the same "
                  "seed and data order).", "",
                  "| preset | mixers | val bits/byte | median step s |", "|---|---|---|---|"]
        with tempfile.TemporaryDirectory() as root:
            for preset in TRAINED:
                r = train_and_evaluate(preset, list(args.overrides), args.train_steps,
                                       os.path.join(root, preset))
                cfg = r.pop("restored")[0]
                a = cfg.model.attention
                mixers = a.pattern or a.kind
                lines.append(f"| {preset} | {mixers} | {r['bpb']:.4f} | "
                             f"{r['step_time']:.3f} |")
                print(lines[-1], flush=True)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
