"""Adaptive depth against the dense model: FLOPs, step time, parameters and quality.

    efflm bench depth [--steps 10] [--warmup 2] [--train-steps 300] [--out FILE]

Side by side in one run: `tiny` (dense), `tiny_mod` at capacity 1.0, 0.5 and 0.25,
`tiny_recursive` (2 unique blocks x 2 recursions) and `tiny_mor` (a first and last
block around one shared block that 1, 2/3 and 1/3 of the tokens run: 4 blocks a token
on average, dense's depth). For each: parameters, the train step's model FLOPs
(analytic, what MFU uses) and XLA's `cost_analysis()` of the compiled step (unrolled
layers; the recursive stack is a scan, whose body XLA:CPU counts once, so its XLA
figure is marked), the median step time, and ratios to dense. Then dense, mod at 0.5,
recursive and mor are trained at equal training FLOPs: the cheapest for
`--train-steps` steps, each other for as many steps as that many FLOPs buy it (the
schedule over its own steps), on the default corpus, and evaluated (in-run sample,
`eval_bits_per_byte`); `--train-steps 0` skips that.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from efflm.bench.mfu import measure
from efflm.bench.report import emit, header
from efflm.config import load_config
from efflm.train.trainer import train

VARIANTS = [
    ("dense (tiny)", "tiny", []),
    ("mod c=1.0", "tiny_mod", ["model.depth.mod.capacity=1.0"]),
    ("mod c=0.5", "tiny_mod", ["model.depth.mod.capacity=0.5"]),
    ("mod c=0.25", "tiny_mod", ["model.depth.mod.capacity=0.25"]),
    ("recursive 2x2", "tiny_recursive", []),
    ("mor 1, 2/3, 1/3", "tiny_mor", []),
]
TRAINED = ("dense (tiny)", "mod c=0.5", "recursive 2x2", "mor 1, 2/3, 1/3")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="efflm bench depth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="depth", choices=["depth"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--out", default="", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    rows = []
    for label, preset, extra in VARIANTS:
        cfg = load_config(preset, ["logging.progress=false", *extra])
        r = measure(cfg, args.steps, args.warmup)
        r["bpb"] = r["train_steps"] = None
        rows.append((label, preset, extra, r))
    trained = [row for row in rows if row[0] in TRAINED]
    cheapest = min(r["model_flops"] for *_, r in trained)
    for _, preset, extra, r in trained if args.train_steps else ():
        steps = max(1, round(args.train_steps * cheapest / r["model_flops"]))
        with tempfile.TemporaryDirectory() as workdir:
            last = train(load_config(preset, [
                "logging.progress=false", "logging.tensorboard=false", *extra,
                f"train.steps={steps}", f"train.eval_every={steps}", "checkpoint.every=0",
                f"train.workdir={workdir}"]))
        r["bpb"], r["train_steps"] = last["eval_bits_per_byte"], steps
    dense = rows[0][3]
    lines = [*header("depth", argv if argv is not None else sys.argv[1:]),
             "| variant | params | model GFLOP/step | vs dense | XLA GFLOP/step | vs dense | "
             "step s | vs dense | train steps (equal FLOPs) | eval bits/byte |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, preset, _, r in rows:
        scan = " (scan body once)" if preset == "tiny_recursive" else ""
        bpb = f"{r['bpb']:.4f}" if r["bpb"] is not None else ""
        lines.append(
            f"| {label} | {r['params'] / 1e6:.2f}M | {r['model_flops'] / 1e9:.1f} | "
            f"{r['model_flops'] / dense['model_flops']:.3f} | {r['xla_flops'] / 1e9:.1f}{scan} | "
            f"{r['xla_flops'] / dense['xla_flops']:.3f} | {r['step_time']:.3f} | "
            f"{r['step_time'] / dense['step_time']:.2f}x | {r['train_steps'] or ''} | {bpb} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
