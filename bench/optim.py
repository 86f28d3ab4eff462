"""Optimizer-state memory, step time and validation bits per byte of each optimizer.

    efflm bench optim [--steps 300] [--trained adamw,muon,apollo_mini]
                      [--time-steps 20] [--out FILE] [key=value ...]

Side by side in one run, `tiny` on `pycode` with each optimizer at its own defaults
(no tuning; every one at the preset's `optimizer.lr` and schedule, from the same seed
and data order):

- state: the optimizer state's bytes, summed exactly over its arrays, and against
  AdamW's; with it XLA's `memory_analysis()` of the compiled train step (arguments,
  which hold parameters and state, plus temporaries);
- step s: the median time of `--time-steps` compiled train steps on one batch, after
  two unmeasured ones (`efflm bench mfu`'s measurement);
- val bits/byte after `--steps` steps, for the `--trained` optimizers only.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax

from efflm.bench.report import emit, header, train_and_evaluate

NAMES = ("adamw", "lion", "adafactor", "muon", "galore", "apollo", "apollo_mini")


def state_bytes(program) -> int:
    """Bytes of the optimizer state's arrays (from the abstract state: exact)."""
    with program.context():
        state = jax.eval_shape(program.init, jax.random.key(0))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))


def main(argv: list[str] | None = None) -> int:
    from efflm.bench.mfu import measure
    from efflm.config import load_config
    from efflm.train.step import build_program

    p = argparse.ArgumentParser(prog="efflm bench optim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="optim", choices=["optim"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--trained", default="adamw,muon,apollo_mini",
                   help="comma-separated optimizers trained for --steps steps")
    p.add_argument("--time-steps", type=int, default=20)
    p.add_argument("--out", default="", help="also write the table to this markdown file")
    p.add_argument("overrides", nargs="*", help="key=value applied to every config")
    args = p.parse_intermixed_args(argv)
    trained = [n.strip() for n in args.trained.split(",") if n.strip()]
    unknown = [n for n in trained if n not in NAMES]
    if unknown or args.steps < 1 or args.time_steps < 2:
        p.error(f"--trained takes {', '.join(NAMES)}; --steps >= 1, --time-steps >= 2"
                + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name in NAMES:
            overrides = [*args.overrides, f"optimizer.name={name}"]
            cfg = load_config("tiny", overrides)
            program = build_program(cfg)
            timed = measure(cfg, args.time_steps, warmup=2, program=program)
            row = {"state": state_bytes(program), "arguments": timed["argument_bytes"],
                   "temporaries": timed["temp_bytes"], "step_time": timed["step_time"],
                   "bpb": None}
            if name in trained:
                row["bpb"] = train_and_evaluate("tiny", overrides, args.steps,
                                                os.path.join(root, name))["bpb"]
            rows.append((name, row))
    base = dict(rows)["adamw"]
    lines = [*header("optim", argv if argv is not None else sys.argv[1:]),
             f"`tiny` on pycode; each optimizer at its defaults and the preset's learning "
             f"rate; bits/byte after {args.steps} steps.", "",
             "| optimizer | state MiB | vs adamw | step arguments MiB | step temporaries "
             "MiB | step s | vs adamw | val bits/byte |", "|---|---|---|---|---|---|---|---|"]
    mib = lambda b: f"{b / 2**20:.2f}"
    for name, r in rows:
        bpb = f"{r['bpb']:.4f}" if r["bpb"] is not None else "—"
        lines.append(f"| {name} | {mib(r['state'])} | {r['state'] / base['state']:.3f} | "
                     f"{mib(r['arguments'])} | {mib(r['temporaries'])} | "
                     f"{r['step_time']:.3f} | {r['step_time'] / base['step_time']:.2f}x | "
                     f"{bpb} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
