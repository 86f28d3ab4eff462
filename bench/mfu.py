"""Tokens/s and MFU of the train step, against the matmul peak measured in the same run.

    efflm bench mfu [--configs tiny,tiny_20m] [--steps 10] [--out FILE] [key=value ...]

Each config's train step is compiled once, run `--warmup` times, then timed over
`--steps` runs (blocking after each); the median step time gives tokens/s, and
MFU = analytic model FLOPs per step / step time / peak. The peak is the datasheet
figure on a known accelerator, else a float32/bfloat16 matmul timed here. XLA's own
FLOP count and the step's peak memory are read from the compiled executable.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import numpy as np

from efflm import mesh as mesh_lib
from efflm.bench.report import emit, header
from efflm.config import load_config
from efflm.flops import PeakMeter, train_flops_per_step
from efflm.train.step import build_program, count_params


def random_batch(cfg) -> dict:
    """One batch of random tokens of `cfg`'s shape, every row one document."""
    rng = np.random.default_rng(0)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    return {"inputs": rng.integers(0, 256, (b, t), dtype=np.int32),
            "targets": rng.integers(0, 256, (b, t), dtype=np.int32),
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


def measure(cfg, steps: int, warmup: int, program=None) -> dict:
    program = program or build_program(cfg)
    with program.context():
        state = program.init(jax.random.key(0))
        batch = mesh_lib.global_batch(random_batch(cfg), program.mesh)
        compiled = program.train_step.lower(state, batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        memory = compiled.memory_analysis()
        for _ in range(warmup):
            state, m = compiled(state, batch)
            jax.block_until_ready(m)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = compiled(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    step_time = statistics.median(times)
    flops = train_flops_per_step(cfg.model, cfg.data.seq_len, cfg.train.batch_size)
    return {"params": count_params(state.params), "step_time": step_time,
            "tokens_per_sec": cfg.train.batch_size * cfg.data.seq_len / step_time,
            "model_flops": flops, "xla_flops": float(cost.get("flops", 0.0)) if cost else 0.0,
            "temp_bytes": getattr(memory, "temp_size_in_bytes", 0) if memory else 0,
            "argument_bytes": getattr(memory, "argument_size_in_bytes", 0) if memory else 0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="efflm bench mfu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="mfu", choices=["mfu"])
    p.add_argument("--configs", default="tiny,tiny_20m")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="", help="also append the table to this markdown file")
    p.add_argument("overrides", nargs="*", help="key=value applied to every config")
    args = p.parse_intermixed_args(argv)
    rows = []
    for name in args.configs.split(","):
        cfg = load_config(name, ["logging.progress=false", *args.overrides])
        meter = PeakMeter(cfg.model.dtype, interval_s=0.0)
        r = measure(cfg, args.steps, args.warmup)
        peak, source = meter.update(), meter.source  # the best of two readings on CPU
        r.update(name=name, dtype=cfg.model.dtype, peak=peak, source=source,
                 mfu=r["model_flops"] / r["step_time"] / peak,
                 shape=f"d{cfg.model.d_model} L{cfg.model.num_layers} "
                       f"h{cfg.model.attention.num_heads} ff{cfg.model.mlp.d_ff} "
                       f"T{cfg.data.seq_len} B{cfg.train.batch_size} V{cfg.model.vocab_size}")
        rows.append(r)
    lines = [*header("mfu", argv if argv is not None else sys.argv[1:]),
             "| config | shape | params | dtype | step s | tokens/s | model GFLOP/step | "
             "XLA GFLOP/step | peak GFLOP/s | MFU | temp MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['shape']} | {r['params'] / 1e6:.1f}M | {r['dtype']} | "
            f"{r['step_time']:.3f} | {r['tokens_per_sec']:.0f} | {r['model_flops'] / 1e9:.1f} | "
            f"{r['xla_flops'] / 1e9:.1f} | {r['peak'] / 1e9:.1f} ({r['source']}) | "
            f"{100 * r['mfu']:.1f}% | {r['temp_bytes'] / 2**20:.0f} |")
    emit(lines, args.out, append=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
