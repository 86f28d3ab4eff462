"""Throughput of the data pipeline alone against the train step it feeds.

    efflm bench data [--batches 40] [--workers 0,2] [--presets tiny,small] [--out FILE]
                     [key=value ...]

For each preset (its `data.*` settings and overrides): tokens per second of the
training pipeline (read, tokenize, chunk, shuffle, pack, batch) with the pipeline in
the calling process (0 workers, as `efflm train` runs it) and in grain worker processes
(`mp_prefetch`), timed over `--batches` batches after the first; and of the compiled
train step on the default devices (the median of 3 steps after one warm-up). The
pipeline keeps up when its ratio to the step is above 1.
"""

from __future__ import annotations

import argparse
import sys
import time

from efflm.bench.report import emit, header
from efflm.config import load_config


def pipeline_tokens_per_sec(cfg, batches: int, workers: int) -> float:
    import grain

    from efflm.data import data_tokenizer
    from efflm.data.pipeline import train_batches

    ds, _ = train_batches(cfg.data, data_tokenizer(cfg.data),
                          global_batch=cfg.train.batch_size, seed=cfg.train.seed)
    if workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults)
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    it = iter(ds)
    next(it)  # start-up (workers, first documents) left out
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - start
    return batches * cfg.train.batch_size * cfg.data.seq_len / elapsed


def main(argv: list[str] | None = None) -> int:
    from efflm.bench.mfu import measure

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="efflm bench data")
    p.add_argument("which", nargs="?")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--workers", default="0,2")
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--out", default="")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    lines = [*header("data", argv),
             f"Tokens per second; pipeline over {args.batches} batches, train step the "
             "median of 3 after one warm-up.", "",
             "| preset | source | batch x length | train step | "
             + " | ".join(f"pipeline, {w} workers | ratio" for w in workers) + " |",
             "|---|---|---|---|" + "---|---|" * len(workers)]
    for preset in args.presets.split(","):
        cfg = load_config(preset, ["logging.progress=false", *args.overrides])
        step = measure(cfg, steps=3, warmup=1)["tokens_per_sec"]
        cells = []
        for w in workers:
            rate = pipeline_tokens_per_sec(cfg, args.batches, w)
            cells.append(f"{rate:,.0f} | {rate / step:.1f}x")
        lines.append(f"| {preset} | {cfg.data.source} | {cfg.train.batch_size} x "
                     f"{cfg.data.seq_len} | {step:,.0f} | " + " | ".join(cells) + " |")
    emit(lines, args.out)
    return 0
