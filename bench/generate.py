"""Tokens/s of generation through the decoding cache against full recomputation.

    efflm bench generate [--config tiny] [--new-tokens 200] [--prompt-len 16]
                         [--out FILE] [key=value ...]

Side by side in one run, on one randomly initialised model (speed does not depend on
the weights; no stop token, so both produce exactly `--new-tokens`):

- cached: `efflm generate`'s path: a prefill, then one jitted step per token over the
  KV cache (`efflm.train.generate.Decoder`);
- recompute: a full forward pass over the `model.max_seq_len` buffer per token, the
  path `efflm generate` took before the cache (`greedy_reference`).

Each is timed as a first call (compilation included, as one `efflm generate` command
pays it) and as a second call (compiled; steady-state tokens/s).
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflm.bench.report import emit, header
from efflm.config import load_config
from efflm.models import LM
from efflm.train.generate import Decoder, greedy_reference


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="efflm bench generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="generate", choices=["generate"])
    p.add_argument("--config", default="tiny")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--out", default="")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    model = LM(cfg.model)
    prompt = list(range(65, 65 + args.prompt_len))
    variables = {"params": nn.unbox(model.init(jax.random.key(0),
                                               jnp.zeros((1, 8), jnp.int32))["params"])}
    n = args.new_tokens

    def cached(decoder):
        out = decoder.generate(variables, prompt, n, seed=0)
        assert len(out) == n

    forward = jax.jit(model.apply)

    def recompute():
        assert len(greedy_reference(model, variables, prompt, n, forward=forward)) == n

    decoder = Decoder(model, 0.0, 0)
    rows = {"cached": (_timed(lambda: cached(decoder)), _timed(lambda: cached(decoder))),
            "recompute": (_timed(recompute), _timed(recompute))}
    lines = header("generate", argv) + [
        f"{args.config}: {n} new tokens after a {args.prompt_len}-token prompt, "
        f"model.max_seq_len={cfg.model.max_seq_len}, greedy, batch 1",
        "", "| path | first call s | tokens/s (first call) | second call s | tokens/s |",
        "| --- | ---: | ---: | ---: | ---: |"]
    for name, (first, second) in rows.items():
        lines.append(f"| {name} | {first:.2f} | {n / first:.1f} | {second:.2f} | "
                     f"{n / second:.1f} |")
    speedup = rows["recompute"][1] / rows["cached"][1]
    first_speedup = rows["recompute"][0] / rows["cached"][0]
    lines += ["", f"cached / recompute tokens/s: {speedup:.1f}x compiled, "
                  f"{first_speedup:.1f}x first call"]
    emit(lines, args.out)
    return 0
