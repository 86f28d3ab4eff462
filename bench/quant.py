"""Validation bits per byte, step time and exported size of each number format.

    efflm bench quant [--config tiny] [--formats ...] [--steps 300] [--out FILE]
                      [key=value ...]

Side by side in one run: `--config` (default `tiny`) on `pycode` trained for `--steps`
steps in float32, bfloat16 compute, int8, ternary, with 2:4 sparsity and in fp8
(delayed and current scaling), mxfp4, qat at 4 and 2 bits, and qat's scale-only phase
(float32 for `--steps`, then `--phase-steps` training qat's step sizes alone at a
constant learning rate of 1e-4), or the `--formats` named (model.quant.targets at its
default: attention, MLP and routed experts, but fp8's; the head stays float32), each
from the same seed and data order. Then its
validation bits per byte over `train.eval_batches` batches, its median step time (from
metrics.jsonl, which leaves out the compiling first step) and, for the quantised
formats, the size of `efflm export` against the same weights in bf16 (routed experts are
exported in float32 and quantised again when loaded). The latent
weights stay float32 while training, so training memory does not fall; on a CPU int8
and ternary are simulated with int32 accumulation and fp8 with XLA's emulated f8 dots,
not run on faster hardware units.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from efflm.bench.report import emit, header, train_and_evaluate

VARIANTS = [
    ("float32", []),
    ("bfloat16", ["model.dtype=bfloat16"]),
    ("int8", ["model.quant.kind=int8"]),
    ("ternary", ["model.quant.kind=ternary"]),
    ("2:4 sparse (float32)", ["model.sparsity.nm=2:4"]),
    ("fp8 delayed", ["model.quant.kind=fp8"]),
    ("fp8 current", ["model.quant.kind=fp8", "model.quant.fp8.scaling=current"]),
    ("mxfp4", ["model.quant.kind=mxfp4"]),
    ("qat 4-bit", ["model.quant.kind=qat", "model.quant.qat.bits=4"]),
    ("qat 2-bit", ["model.quant.kind=qat", "model.quant.qat.bits=2"]),
    ("qat 4-bit scales only", []),  # float32, then PHASE
]
# Rows trained in float32 for --steps, then resumed for --phase-steps more with these:
# EfficientQAT's end-to-end phase, the step sizes alone.
PHASE = {"qat 4-bit scales only": [
    "model.quant.kind=qat", "model.quant.qat.bits=4", "train.trainable=quant_scales",
    "optimizer.schedule=constant", "optimizer.warmup_steps=0", "optimizer.lr=1e-4"]}


def _run(preset: str, label: str, overrides: list[str], steps: int, root: str,
         phase_steps: int) -> dict:
    from efflm.train.export import export_quantized

    workdir = os.path.join(root, label.replace(" ", "_").replace(":", "_").replace(",", ""))
    result = train_and_evaluate(preset, overrides, steps, workdir)
    if label in PHASE:
        result = train_and_evaluate(preset, [*overrides, *PHASE[label]], steps + phase_steps,
                                    workdir)
    cfg, program, state = result.pop("restored")
    if cfg.model.quant.kind != "none":
        result["export"] = export_quantized(program, state,
                                            os.path.join(workdir, "export.npz"))
    return result


def targets_line(overrides: list[str]) -> str:
    """The quantised targets as the overrides set them."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("model.quant.targets=")]
    return f"targets {given[-1]}" if given else "the default targets"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="efflm bench quant", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="quant", choices=["quant"])
    p.add_argument("--config", default="tiny", help="the preset or YAML file to train")
    p.add_argument("--formats", default="",
                   help=f"comma-separated subset of: {', '.join(v for v, _ in VARIANTS)} "
                        "(the first is the baseline)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--phase-steps", type=int, default=20,
                   help="steps of the scales-only phase after --steps in float32")
    p.add_argument("--out", default="", help="also write the table to this markdown file")
    p.add_argument("overrides", nargs="*", help="key=value applied to every config")
    args = p.parse_intermixed_args(argv)
    named = dict(VARIANTS)
    chosen = [f.strip() for f in args.formats.split(",") if f.strip()] or list(named)
    unknown = [f for f in chosen if f not in named]
    if unknown:
        p.error(f"--formats: unknown {unknown}; choose from {', '.join(named)}")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for label in chosen:
            rows.append((label, _run(args.config, label, [*args.overrides, *named[label]],
                                     args.steps, root, args.phase_steps)))
    base = rows[0][1]["step_time"]
    lines = [*header("quant", argv if argv is not None else sys.argv[1:]),
             f"`{args.config}` on pycode, {args.steps} steps; {targets_line(args.overrides)}"
             + (f"; the scales-only row: {args.steps} in float32, then {args.phase_steps} "
                "training qat's step sizes alone" if any(c in PHASE for c in chosen) else "")
             + ".", "",
             f"| format | val bits/byte | step s | vs {chosen[0]} | exported targets | "
             "vs bf16 | whole file | vs all bf16 |", "|---|---|---|---|---|---|---|---|"]
    for label, r in rows:
        e = r.get("export")
        size = (f"{e['quantized_bytes'] / 2**20:.2f} MiB | "
                f"{e['quantized_bytes'] / max(e['quantized_as_bf16_bytes'], 1):.3f} | "
                f"{e['file_bytes'] / 2**20:.2f} MiB | {e['ratio_vs_bf16']:.3f}"
                if e else "— | — | — | —")
        lines.append(f"| {label} | {r['bpb']:.4f} | {r['step_time']:.3f} | "
                     f"{r['step_time'] / base:.2f}x | {size} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
