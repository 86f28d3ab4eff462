"""Kernel benchmarks: each fast path beside its reference, in one run.

    python -m efflm.bench.kernels ce [--tokens 8192] [--d-model 512]
                                     [--vocabs 32768,65536] [--block-v 512] [--out FILE]

`ce`: peak memory of the loss and its gradient (w.r.t. the hidden states h and the
head weight w) for the full-logits cross-entropy (`naive`) and the blockwise one
(`impl=xla`, Cut Cross-Entropy), float32, read exactly from
`jax.jit(...).lower(...).compile().memory_analysis()`. The figure compared is the
temporary (scratch) bytes XLA allocates — what the loss itself costs; argument bytes
(h, w, targets, mask) and output bytes (dh, dw, the loss) are the same for both and are
listed beside it. Nothing is run, so it takes seconds even at 64K vocabulary.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from efflm.bench.report import emit, header
from efflm.pallas_kernels.fused_cross_entropy import linear_cross_entropy


def _memory(impl: str, tokens: int, d_model: int, vocab: int, block_v: int) -> dict:
    f32 = jnp.float32
    args = (jax.ShapeDtypeStruct((tokens, d_model), f32),
            jax.ShapeDtypeStruct((d_model, vocab), f32),
            jax.ShapeDtypeStruct((tokens,), jnp.int32),
            jax.ShapeDtypeStruct((tokens,), jnp.bool_))

    def objective(h, w, targets, mask):
        loss_sum, z_sum, count = linear_cross_entropy(h, w, targets, mask, impl=impl,
                                                      block_v=block_v, z_loss=1e-4)
        return (loss_sum + z_sum) / count

    fn = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
    m = fn.lower(*args).compile().memory_analysis()
    return {"temp": m.temp_size_in_bytes, "argument": m.argument_size_in_bytes,
            "output": m.output_size_in_bytes}


def cross_entropy_memory(tokens: int, d_model: int, vocabs: list[int], block_v: int) -> list:
    rows = []
    for vocab in vocabs:
        naive = _memory("naive", tokens, d_model, vocab, block_v)
        fused = _memory("xla", tokens, d_model, vocab, block_v)
        rows.append({"vocab": vocab, "naive": naive, "fused": fused,
                     "logits": tokens * vocab * 4})
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="efflm bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["ce"])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--vocabs", default="32768,65536")
    p.add_argument("--block-v", type=int, default=512)
    p.add_argument("--out", default="", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    vocabs = [int(v) for v in args.vocabs.split(",")]
    rows = cross_entropy_memory(args.tokens, args.d_model, vocabs, args.block_v)
    lines = [
        *header("ce", argv if argv is not None else sys.argv[1:]),
        f"Loss + grad w.r.t. h and w, float32, {args.tokens} tokens, d_model "
        f"{args.d_model}, fused = impl=xla with block_v={args.block_v}. MiB from "
        "`compile().memory_analysis()`; the ratio compares temp bytes (arguments and "
        "outputs are the same for both).",
        "",
        "| vocab | logits MiB | naive temp | fused temp | temp ratio | "
        "naive temp+out | fused temp+out | arguments | outputs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n, f = r["naive"], r["fused"]
        lines.append(
            f"| {r['vocab']} | {_mib(r['logits'])} | {_mib(n['temp'])} | {_mib(f['temp'])} | "
            f"{n['temp'] / max(f['temp'], 1):.1f}x | {_mib(n['temp'] + n['output'])} | "
            f"{_mib(f['temp'] + f['output'])} | {_mib(n['argument'])} | "
            f"{_mib(n['output'])} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
