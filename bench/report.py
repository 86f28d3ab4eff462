"""Printing a benchmark's markdown table and recording it under bench/results/."""

import datetime
import json
import os
import platform
import statistics

import jax


def emit(lines: list[str], out: str = "", append: bool = False) -> None:
    """Print the table; also write (or append) it to `out` when given."""
    table = "\n".join(lines) + "\n"
    print(table)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "a" if append else "w", encoding="utf-8") as f:
            f.write(table + ("\n" if append else ""))


def header(name: str, argv: list[str]) -> list[str]:
    """Title (date, device, jax version) and the command that reproduces the table."""
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    cpu = platform.processor() or platform.machine()
    return [f"efflm bench {name} — {datetime.date.today()} — {jax.device_count()} x {kind} "
            f"({cpu}, {os.cpu_count()} cores), jax {jax.__version__}",
            f"command: efflm bench {' '.join(argv)}", ""]


def train_and_evaluate(preset: str, overrides: list[str], steps: int, workdir: str) -> dict:
    """Train `preset` for `steps` steps in `workdir`, then evaluate the final state.

    Returns validation bits per byte over `train.eval_batches` batches, the median step
    time from metrics.jsonl (the compiling first step is not logged there), and the
    `(cfg, program, state)` restored from the final checkpoint for further reporting.
    """
    from efflm.config import load_config
    from efflm.train.trainer import evaluate, restore_run, train

    cfg = load_config(preset, ["logging.progress=false", "logging.tensorboard=false",
                               f"train.steps={steps}", f"train.workdir={workdir}",
                               "train.eval_every=0", f"checkpoint.every={steps}",
                               *overrides])
    train(cfg)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r]
    cfg, program, state, tokenizer, _ = restore_run(workdir)
    return {"bpb": evaluate(program, state, tokenizer,
                            cfg.train.eval_batches)["eval_bits_per_byte"],
            "step_time": statistics.median(times) if times else float("nan"),
            "restored": (cfg, program, state)}
