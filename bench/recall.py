"""Recall per mixer kind: multi-query associative recall (MQAR, `data.source=mqar`).

    efflm bench recall [--kinds softmax,linear,...] [--widths 64,128]
                       [--settings 64:4,128:8] [--steps 300] [--vocab 32]
                       [--lr 2e-3] [--tokens 4096] [--out FILE.md] [--plot FILE.png]
                       [key=value ...]

A 2-layer model of each causal mixer kind registered (default: all of them), at each
width (d_model; heads of 32 dimensions, MLP 2x the width), is trained from the same
seed for `--steps` steps at each (length, pairs) setting with a constant learning rate
after 20 warmup steps, `--tokens` tokens per step (so every setting trains on the same
number of answers per step), then its recall accuracy is measured on 512 held-out
examples. A cell whose accuracy still rose by more than 0.02 over the second half of
its steps is marked `*` (not converged). Windowed kinds run at the windows given by
WINDOWED (stated in the table). A model that sees later tokens (`not_causal`) is
refused: it would see the answers.

Writes a Markdown table (`--out`) and a plot of accuracy against width, one line per
kind, one panel per length (`--plot`, matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from efflm.bench.report import emit, header
from efflm.config import load_config
from efflm.errors import ConfigError
from efflm.layers.attention import ATTENTION
from efflm.layers.plan import not_causal

# Settings of the kinds whose reach is a window or a pattern, so that the longer
# settings test recall past it.
WINDOWED = {"sliding": ["model.attention.sliding.window=32", "model.attention.sliding.sinks=0"],
            "power": ["model.attention.power.block_size=16"]}
EVAL_EXAMPLES = 512
RISE = 0.02  # accuracy gained over the second half above which a cell is marked


def cell_config(kind: str, width: int, length: int, pairs: int, args, workdir: str):
    batch = max(8, args.tokens // length)
    return load_config("tiny", [
        "logging.progress=false", "logging.tensorboard=false", f"train.workdir={workdir}",
        f"model.attention.kind={kind}", *WINDOWED.get(kind, []), "model.num_layers=2",
        f"model.d_model={width}", f"model.attention.num_heads={max(1, width // 32)}",
        f"model.mlp.d_ff={2 * width}", f"model.max_seq_len={length}",
        "data.source=mqar", f"data.seq_len={length}", f"data.mqar.vocab={args.vocab}",
        f"data.mqar.pairs={pairs}", f"data.mqar.val_examples={EVAL_EXAMPLES}",
        f"train.batch_size={batch}", f"train.steps={args.steps}",
        f"train.eval_every={args.steps // 2}", f"train.eval_batches={-(-EVAL_EXAMPLES // batch)}",
        f"checkpoint.every={args.steps}", "checkpoint.keep=1", f"optimizer.lr={args.lr}",
        "optimizer.schedule=constant", "optimizer.warmup_steps=20", *args.overrides])


def still_rising(r: dict) -> bool:
    """Whether a cell's accuracy rose by more than RISE over its second half."""
    return r["accuracy"] - r["half"] > RISE


def run_cell(cfg) -> dict:
    """Train one cell; its final and half-way recall accuracy and median step time."""
    from efflm.train.trainer import train

    train(cfg)
    with open(os.path.join(cfg.train.workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    evals = [r["eval_recall_accuracy"] for r in rows if "eval_recall_accuracy" in r]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r]
    return {"accuracy": evals[-1], "half": evals[0],
            "step_time": statistics.median(times) if times else float("nan")}


def plot(results: dict, widths: list[int], settings: list[tuple[int, int]], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.5),
                             sharey=True, squeeze=False)
    for ax, (length, pairs) in zip(axes[0], settings):
        for kind, cells in results.items():
            ax.plot(widths, [cells[(w, length)]["accuracy"] for w in widths], marker="o",
                    label=kind)
        ax.set(title=f"length {length}, {pairs} pairs", xlabel="width (d_model)",
               xticks=widths, ylim=(0, 1.02))
    axes[0][0].set_ylabel("recall accuracy")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="efflm bench recall", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="recall", choices=["recall"])
    p.add_argument("--kinds", default=",".join(ATTENTION))
    p.add_argument("--widths", default="64,128")
    p.add_argument("--settings", default="64:4,128:8", help="length:pairs, ...")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--vocab", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step")
    p.add_argument("--out", default="", help="also write the table to this markdown file")
    p.add_argument("--plot", default="", help="write the plot to this PNG file")
    p.add_argument("overrides", nargs="*", help="key=value applied to every run")
    args = p.parse_intermixed_args(argv)
    argv = argv if argv is not None else sys.argv[1:]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    widths = [int(w) for w in args.widths.split(",")]
    try:
        settings = [tuple(int(n) for n in s.split(":")) for s in args.settings.split(",")]
    except ValueError:
        raise ConfigError(f"--settings {args.settings!r}: give length:pairs pairs, e.g. "
                          "64:4,128:8") from None
    if args.steps < 2 or any(len(s) != 2 for s in settings):
        raise ConfigError("--steps must be >= 2 and --settings a list of length:pairs")
    with tempfile.TemporaryDirectory() as root:
        for kind in kinds:  # every cell is checked before the first trains
            for width in widths:
                for length, pairs in settings:
                    cfg = cell_config(kind, width, length, pairs, args, root)
                    reasons = not_causal(cfg.model)
                    if reasons:
                        raise ConfigError(f"{kind}: {reasons[0]}; a model that sees later "
                                          "tokens sees the answers, so recall does not "
                                          "measure it")
        lines = [*header("recall", argv),
                 f"{args.steps} steps per cell, {args.tokens} tokens per step, vocabulary "
                 f"{args.vocab}, learning rate {args.lr} (constant after 20 warmup steps), "
                 f"2 layers, heads of 32 dims; accuracy on {EVAL_EXAMPLES} held-out "
                 f"examples. Windowed kinds: "
                 + "; ".join(f"{k}: {' '.join(v)}" for k, v in WINDOWED.items())
                 + f". `*`: still rising (more than +{RISE} over the second half).", "",
                 "| kind | width | " + " | ".join(f"len {n}, {k} pairs" for n, k in settings)
                 + " | step s (longest) |",
                 "|---|---|" + "---|" * len(settings) + "---|"]
        results: dict = {}
        for kind in kinds:
            results[kind] = {}
            for width in widths:
                row = []
                for length, pairs in settings:
                    workdir = os.path.join(root, f"{kind}-{width}-{length}")
                    r = run_cell(cell_config(kind, width, length, pairs, args, workdir))
                    results[kind][(width, length)] = r
                    mark = "*" if still_rising(r) else ""
                    row.append(f"{r['accuracy']:.3f}{mark}")
                lines.append(f"| {kind} | {width} | " + " | ".join(row)
                             + f" | {r['step_time']:.3f} |")
                print(lines[-1], flush=True)
    emit(lines, args.out)
    if args.plot:
        plot(results, widths, settings, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
