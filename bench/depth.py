"""Adaptive depth against the dense model: FLOPs, step time, parameters, decoding
cache and quality.

    efflm bench depth [--steps 10] [--warmup 2] [--train-steps 300] [--variants K,..]
                      [--train K,..] [--out FILE]

Side by side in one run (`--variants`, default all): `tiny` (dense), `tiny_mod` at
capacity 1.0, 0.5 and 0.25, `tiny_recursive` (2 unique blocks x 2 recursions) and
`tiny_mor` (a first and last block around one shared block that 1, 2/3 and 1/3 of the
tokens run: 4 blocks a token on average, dense's depth) with each router (expert and
token choice) and each caching variant (a cache per recursion, or the first
recursion's shared). For each: parameters, the train step's model FLOPs (analytic,
what MFU uses) and XLA's `cost_analysis()` of the compiled step (unrolled layers; the
recursive stack is a scan, whose body XLA:CPU counts once, so its XLA figure is
marked), the median step time, ratios to dense, and the decoding cache's bytes per
token (its allocated size at model.max_seq_len, one sequence). Then the `--train`
variants are trained at equal training FLOPs: each for as many steps as `--train-steps`
steps of the cheapest of the default trained variants buy it (the budget does not
depend on which are trained, so rows of separate runs compare), on the default corpus,
and evaluated (in-run sample, `eval_bits_per_byte`); `--train-steps 0` skips that.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import jax
import jax.numpy as jnp

from efflm.bench.mfu import measure
from efflm.bench.report import emit, header
from efflm.config import load_config
from efflm.errors import ConfigError, check_choice
from efflm.flops import train_flops_per_step
from efflm.models import LM
from efflm.train.trainer import train

TOKEN, SHARED = "model.depth.mor.router=token_choice", "model.depth.mor.kv=shared"
# key: (label, preset, overrides)
VARIANTS = {
    "dense": ("dense (tiny)", "tiny", []),
    "mod1": ("mod c=1.0", "tiny_mod", ["model.depth.mod.capacity=1.0"]),
    "mod0.5": ("mod c=0.5", "tiny_mod", ["model.depth.mod.capacity=0.5"]),
    "mod0.25": ("mod c=0.25", "tiny_mod", ["model.depth.mod.capacity=0.25"]),
    "recursive": ("recursive 2x2", "tiny_recursive", []),
    "mor": ("mor 1, 2/3, 1/3", "tiny_mor", []),
    "mor-kv": ("mor, kv shared", "tiny_mor", [SHARED]),
    "mor-token": ("mor token choice", "tiny_mor", [TOKEN]),
    "mor-token-kv": ("mor token choice, kv shared", "tiny_mor", [TOKEN, SHARED]),
}
TRAINED = ("dense", "mod0.5", "recursive", "mor", "mor-kv", "mor-token", "mor-token-kv")


def _keys(value: str, flag: str) -> list[str]:
    keys = [k.strip() for k in value.split(",") if k.strip()]
    for k in keys:
        check_choice(flag, k, VARIANTS)
    return keys


def cache_bytes_per_token(cfg) -> float:
    """The decoding cache's allocated bytes for one sequence of model.max_seq_len tokens,
    per token (shapes only: nothing is computed)."""
    model, length = LM(cfg.model), cfg.model.max_seq_len
    dummy = jnp.zeros((1, length), jnp.int32)

    def cache(key):
        variables = model.init(key, dummy)
        return model.apply(variables, dummy, dummy, mutable=["cache"])[1].get("cache", {})

    shapes = jax.eval_shape(cache, jax.random.key(0))
    return sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(shapes)) / length


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="efflm bench depth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="depth", choices=["depth"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="the rows, comma-separated keys: " + ", ".join(VARIANTS))
    p.add_argument("--train", default=None,
                   help="the rows trained at equal FLOPs, among --variants (default: "
                        + ", ".join(TRAINED) + " where in --variants)")
    p.add_argument("--out", default="", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    try:
        keys = _keys(args.variants, "--variants")
        trained = ([k for k in TRAINED if k in keys] if args.train is None
                   else _keys(args.train, "--train"))
    except ConfigError as e:
        p.error(str(e))
    if missing := [k for k in trained if k not in keys]:
        p.error(f"--train {','.join(missing)} not among --variants")
    configs = {k: load_config(VARIANTS[k][1], ["logging.progress=false", *VARIANTS[k][2]])
               for k in VARIANTS}
    budget = min(train_flops_per_step(c.model, c.data.seq_len, c.train.batch_size)
                 for k, c in configs.items() if k in TRAINED) * args.train_steps
    rows = {}
    for k in keys:
        r = measure(configs[k], args.steps, args.warmup)
        r["bpb"] = r["train_steps"] = None
        r["cache"] = cache_bytes_per_token(configs[k])
        rows[k] = r
    for k in trained if args.train_steps else ():
        label, preset, extra = VARIANTS[k]
        steps = max(1, round(budget / rows[k]["model_flops"]))
        with tempfile.TemporaryDirectory() as workdir:
            last = train(load_config(preset, [
                "logging.progress=false", "logging.tensorboard=false", *extra,
                f"train.steps={steps}", f"train.eval_every={steps}", "checkpoint.every=0",
                f"train.workdir={workdir}"]))
        rows[k]["bpb"], rows[k]["train_steps"] = last["eval_bits_per_byte"], steps
    dense = rows.get("dense")
    ratio = lambda r, key, fmt: format(r[key] / dense[key], fmt) if dense else ""  # noqa: E731
    lines = [*header("depth", argv if argv is not None else sys.argv[1:]),
             "| variant | params | model GFLOP/step | vs dense | XLA GFLOP/step | vs dense | "
             "step s | vs dense | decode cache KiB/token | train steps (equal FLOPs) | "
             "eval bits/byte |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        label, preset, _ = VARIANTS[k]
        scan = " (scan body once)" if preset == "tiny_recursive" else ""
        bpb = f"{r['bpb']:.4f}" if r["bpb"] is not None else ""
        step = ratio(r, "step_time", ".2f")
        lines.append(
            f"| {label} | {r['params'] / 1e6:.2f}M | {r['model_flops'] / 1e9:.1f} | "
            f"{ratio(r, 'model_flops', '.3f')} | {r['xla_flops'] / 1e9:.1f}{scan} | "
            f"{ratio(r, 'xla_flops', '.3f')} | {r['step_time']:.3f} | "
            f"{step + 'x' if step else ''} | {r['cache'] / 1024:.1f} | "
            f"{r['train_steps'] or ''} | {bpb} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
