"""Train-step time and memory of Mixture-of-Experts against the dense model.

    efflm bench moe [--steps 10] [--warmup 2] [--out FILE] [key=value ...]
    efflm bench moe --ep [--steps 10] [--out FILE]      (needs 8 devices)
    efflm bench moe --quality [--train-steps 300] [--out FILE] [key=value ...]
    efflm bench moe --capacity [--train-steps 100] [--out FILE] [key=value ...]

Side by side in one run: `tiny` (dense) and `tiny_moe` (8 experts, top-2, equal
active parameters) with each dropless backend, with capacity dispatch at factors
1.0 and 1.25, and with the expert_choice (factor 1.0) and relu (2 rows per token)
routers at the same expert rows. Each step is compiled once, run `--warmup` times,
then timed over `--steps` runs (median); temp memory is the compiled step's `memory_analysis()`.
The ratio is step time over the dense model's.

`--ep`: `tiny_moe` on 8 devices (`mesh.expert=4 mesh.data=2`; on a CPU run with
XLA_FLAGS=--xla_force_host_platform_device_count=8) with each expert-parallel
exchange, against data parallelism alone (`mesh.data=8`): step time and the bytes each
kind of collective moves per step, read from the compiled step's HLO (the result
shapes of its all-to-all, all-gather, reduce-scatter and all-reduce ops).

`--quality`: each router against the dense model at equal active parameters (`tiny`,
d_ff 1024, against `tiny_moe`, 8 experts of width 512, top-2), each trained for
`--train-steps` steps on the default corpus (pycode) from the same seed and data order,
one run each: validation bits per byte over `train.eval_batches` batches, the median
step time (the compiling first step left out), and the expert load's coefficient of
variation and largest share (1 = even) at the last step.

`--capacity`: `tiny_moe` dropless against the capacity dispatch (causal policy at
factors 1.0 and 1.25, the batch policy at 1.0), each trained for `--train-steps` steps
on pycode from the same seed: the mean over the logged steps of the second half of the
fraction of pairs dropped, of the tokens left with no expert and of the largest expert's
processed load (1 = an even share of the requested pairs), the median step time and
validation bits per byte; and the fraction of padding in the training batches.
"""

from __future__ import annotations

import argparse
import sys

from efflm.bench.mfu import measure
from efflm.bench.report import collective_bytes, emit, header
from efflm.config import load_config

VARIANTS = [
    ("dense (tiny)", "tiny", []),
    ("moe dropless xla (row blocks)", "tiny_moe", ["model.moe.impl=xla"]),
    ("moe dropless ragged_dot", "tiny_moe", ["model.moe.impl=ragged"]),
    ("moe capacity 1.0", "tiny_moe", ["model.moe.dispatch=capacity",
                                      "model.moe.capacity_factor=1.0"]),
    ("moe capacity 1.25", "tiny_moe", ["model.moe.dispatch=capacity",
                                       "model.moe.capacity_factor=1.25"]),
    ("moe expert_choice 1.0", "tiny_moe", ["model.moe.router=expert_choice",
                                           "model.moe.dispatch=capacity",
                                           "model.moe.capacity_policy=batch",
                                           "model.moe.capacity_factor=1.0"]),
    ("moe relu, 2 rows/token", "tiny_moe", ["model.moe.router=relu",
                                            "model.moe.relu.rows_per_token=2"]),
]

# --quality: dense against each router, all at tiny's active parameters.
QUALITY_VARIANTS = [
    ("dense (tiny)", "tiny", []),
    ("moe topk", "tiny_moe", ["model.moe.router=topk"]),
    ("moe sigmoid_bias", "tiny_moe", ["model.moe.router=sigmoid_bias"]),
    ("moe relu, 2 rows/token", "tiny_moe", ["model.moe.router=relu",
                                            "model.moe.relu.rows_per_token=2"]),
]

# --capacity: dropless against the capacity policies.
CAPACITY_VARIANTS = [
    ("dropless", []),
    ("capacity 1.0, causal", ["model.moe.dispatch=capacity", "model.moe.capacity_factor=1.0"]),
    ("capacity 1.25, causal", ["model.moe.dispatch=capacity",
                               "model.moe.capacity_factor=1.25"]),
    ("capacity 1.0, batch", ["model.moe.dispatch=capacity", "model.moe.capacity_factor=1.0",
                             "model.moe.capacity_policy=batch"]),
]

EP_COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce")


def _ep_table(args, argv) -> list[str]:
    import jax

    from efflm import mesh as mesh_lib
    from efflm.bench.mfu import random_batch
    from efflm.train.step import build_program

    if jax.device_count() < 8:
        raise SystemExit("efflm bench moe --ep needs 8 devices; on a CPU set "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=8")
    variants = [("data parallel (mesh.data=8)", ["mesh.data=8"]),
                ("ep gather_scatter", ["mesh.expert=4", "mesh.data=2",
                                       "model.moe.ep_exchange=gather_scatter"]),
                ("ep all_to_all", ["mesh.expert=4", "mesh.data=2",
                                   "model.moe.ep_exchange=all_to_all"])]
    lines = [*header("moe", argv), "tiny_moe on 8 devices; MiB per step moved by each "
             "collective (result sizes summed over the ops in the compiled step)", "",
             "| variant | step s | " + " | ".join(EP_COLLECTIVES) + " |",
             "|---|---|" + "---|" * len(EP_COLLECTIVES)]
    for label, extra in variants:
        cfg = load_config("tiny_moe", ["logging.progress=false", *args.overrides, *extra])
        program = build_program(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:8]))
        with program.context():
            state = program.init(jax.random.key(0))
            batch = mesh_lib.global_batch(random_batch(cfg), program.mesh)
            moved = collective_bytes(program.train_step.lower(state, batch).compile().as_text())
        r = measure(cfg, args.steps, args.warmup, program)
        lines.append(f"| {label} | {r['step_time']:.3f} | "
                     + " | ".join(f"{moved[op] / 2**20:.1f}" for op in EP_COLLECTIVES) + " |")
    return lines


def _quality_table(args, argv) -> list[str]:
    import json
    import os
    import tempfile

    from efflm.bench.report import train_and_evaluate
    from efflm.flops import inactive_params
    from efflm.train.step import count_params

    rows = []
    with tempfile.TemporaryDirectory() as root:
        for i, (label, preset, extra) in enumerate(QUALITY_VARIANTS):
            workdir = os.path.join(root, f"run{i}")
            r = train_and_evaluate(preset, [*args.overrides, *extra], args.train_steps,
                                   workdir)
            cfg, _, state = r.pop("restored")
            params = count_params(state.params)
            r.update(params=params, active=params - inactive_params(cfg.model))
            with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
                loads = [row for row in map(json.loads, f) if "expert_load_cv" in row]
            r["load"] = (f"{loads[-1]['expert_load_cv']:.3f} | "
                         f"{loads[-1]['expert_load_max']:.2f}" if loads else "— | —")
            rows.append((label, r))
    dense = rows[0][1]
    lines = [*header("moe", argv),
             f"Trained {args.train_steps} steps each on pycode, one run each; load at the "
             "last step (coefficient of variation, largest expert's share; 1 = even).", "",
             "| variant | params | active params | val bits/byte | step s | vs dense | "
             "load CV | load max |", "|---|---|---|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(f"| {label} | {r['params'] / 1e6:.2f}M | {r['active'] / 1e6:.2f}M | "
                     f"{r['bpb']:.4f} | {r['step_time']:.3f} | "
                     f"{r['step_time'] / dense['step_time']:.2f}x | {r['load']} |")
    return lines


def padding_fraction(preset: str, overrides: list[str], batches: int) -> float:
    """The fraction of positions that are padding in the first `batches` training
    batches of `preset`."""
    import numpy as np

    from efflm.data import data_tokenizer, make_train_iterator

    cfg = load_config(preset, overrides)
    it = make_train_iterator(cfg.data, data_tokenizer(cfg.data),
                             global_batch=cfg.train.batch_size, seed=cfg.train.seed)
    return float(np.mean([np.mean(next(it)["segment_ids"] == 0) for _ in range(batches)]))


def _capacity_table(args, argv) -> list[str]:
    import json
    import os
    import statistics
    import tempfile

    from efflm.bench.report import train_and_evaluate

    keys = ("moe_dropped_fraction", "moe_tokens_without_expert", "expert_processed_load_max")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for i, (label, extra) in enumerate(CAPACITY_VARIANTS):
            workdir = os.path.join(root, f"run{i}")
            r = train_and_evaluate("tiny_moe", [*args.overrides, *extra], args.train_steps,
                                   workdir)
            with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
                logged = [row for row in map(json.loads, f)
                          if "loss" in row and row["step"] > args.train_steps // 2]
            r.update({k: statistics.mean(row[k] for row in logged) for k in keys})
            rows.append((label, r))
    padding = padding_fraction("tiny_moe", list(args.overrides), 20)
    base = rows[0][1]["step_time"]
    lines = [*header("moe", argv),
             f"tiny_moe trained {args.train_steps} steps each on pycode, one run each; "
             "statistics are means over the logged steps of the second half. Padding is "
             f"{padding:.1%} of the positions of the first 20 training batches.", "",
             "| variant | dropped | tokens without expert | processed load max | step s | "
             "vs dropless | val bits/byte |", "|---|---|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(f"| {label} | {r[keys[0]]:.2%} | {r[keys[1]]:.2%} | {r[keys[2]]:.2f} | "
                     f"{r['step_time']:.3f} | {r['step_time'] / base:.2f}x | "
                     f"{r['bpb']:.4f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="efflm bench moe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="moe", choices=["moe"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="", help="also write the table to this markdown file")
    p.add_argument("--ep", action="store_true", help="expert parallelism on 8 devices")
    p.add_argument("--quality", action="store_true",
                   help="train each router and the dense model; validation bits per byte")
    p.add_argument("--capacity", action="store_true",
                   help="train dropless and each capacity policy; dropped pairs, step time")
    p.add_argument("--train-steps", type=int, default=0,
                   help="steps per run (--quality: 300, --capacity: 100)")
    p.add_argument("overrides", nargs="*", help="key=value applied to every config")
    args = p.parse_intermixed_args(argv)
    if args.ep:
        emit(_ep_table(args, argv if argv is not None else sys.argv[1:]), args.out)
        return 0
    if args.quality:
        args.train_steps = args.train_steps or 300
        emit(_quality_table(args, argv if argv is not None else sys.argv[1:]), args.out)
        return 0
    if args.capacity:
        args.train_steps = args.train_steps or 100
        emit(_capacity_table(args, argv if argv is not None else sys.argv[1:]), args.out)
        return 0
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
