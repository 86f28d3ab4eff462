"""Kernel benchmarks: each fast path beside its reference, in one run. A subcommand is
named for the module of pallas_kernels/ it measures.

    efflm bench fused_cross_entropy [--tokens 8192] [--d-model 512] [--vocabs 32768,65536]
                                    [--block-v 512] [--time]
    efflm bench flash_attention     [--seqs 1024,...,16384] [--head-dims 64,128]
                                    [--tokens 16384] [--width 2048] [--group 1]
                                    [--impls ours,xla,cudnn,mha]
    efflm bench grouped_matmul      [--tokens 16384,32768,65536] [--d-models 1024,2048]
                                    [--ffn 4096] [--experts 8,64]
    efflm bench linear_attention    [--seqs 8192,16384,32768] [--batch 4] [--heads 16]
                                    [--head-dim 64]
    efflm bench selected_attention  [--seqs 8192,...,65536] [--heads 16] [--kv-heads 1]
                                    [--head-dim 128] [--select-block 64] [--select-blocks 16]
    (each takes --out FILE; flash_attention, grouped_matmul and linear_attention take
    --runs, --warmup, --dtype)

`fused_cross_entropy`: peak memory of the loss and its gradient (w.r.t. the hidden
states h and the head weight w) for the full-logits cross-entropy (`naive`) and the
blockwise one (`impl=xla`, Cut Cross-Entropy), float32, read exactly from
`jax.jit(...).lower(...).compile().memory_analysis()`. The figure compared is the
temporary (scratch) bytes XLA allocates — what the loss itself costs; argument bytes
(h, w, targets, mask) and output bytes (dh, dw, the loss) are the same for both and are
listed beside it. Nothing is run, so it takes seconds even at 64K vocabulary. With
`--time` a second table times the loss and its gradient in `--dtype` for `naive`, `xla`
and `pallas`, as the timed benchmarks below do.

`flash_attention`, `grouped_matmul`, `linear_attention` time compiled code (one helper,
`median_seconds`): each function is jitted and compiled once, called `--warmup` times,
then timed over `--runs` calls, each blocking on all outputs; the median is reported.
Inputs are made on the device first. `flash_attention`: causal flash attention
forward+backward TFLOP/s — ours (Pallas), jax.nn's `xla` and `cudnn` paths, and the
Pallas `mha` shipped in jax — as a fraction of a bf16 matmul timed in the same run.
`grouped_matmul`: our grouped matmul against `jax.lax.ragged_dot`, forward and
forward+backward, on MoE-like shapes. `linear_attention`: chunked linear attention
(Pallas and XLA forms) against our flash attention, forward+backward wall time.
`selected_attention`: NSA's selected branch (the Pallas kernel, which reads only the
selected blocks, and the layer's XLA path, which gathers them) against our flash
attention over the whole causal sequence, forward+backward wall time, on a selection
drawn by NSA's rules from random importances (own and first block, then random earlier
ones), with the mean number of blocks a query block's union walks.
Defaults are the GPU shapes on a GPU and tiny ones elsewhere; without a GPU the Pallas
kernels run in interpret mode (marked `interpret`: a smoke test, not a speed) and cuDNN
is reported as not available.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from efflm.bench.report import emit, header
from efflm.pallas_kernels.flash_attention import default_blocks, flash_attention
from efflm.pallas_kernels.fused_cross_entropy import linear_cross_entropy
from efflm.pallas_kernels.grouped_matmul import grouped_matmul
from efflm.pallas_kernels.linear_attention import chunked_linear_attention
from efflm.pallas_kernels.selected_attention import selected_attention, union_blocks

# ----------------------------------------------------------------------------
# fused_cross_entropy: memory of the fused loss against full logits.


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



def _ce_objective(impl: str, block_v: int):
    """(h, w, targets, mask) -> mean loss with a z-loss, through one implementation."""
    interpret = not _on_gpu() if impl == "pallas" else None

    def objective(h, w, targets, mask):
        loss_sum, z_sum, count = linear_cross_entropy(
            h, w, targets, mask, impl=impl, block_v=block_v if impl == "xla" else None,
            z_loss=1e-4, interpret=interpret)
        return (loss_sum + z_sum) / count

    return objective


CE_IMPLS = ("naive", "xla", "pallas")


def cross_entropy_times(args) -> list[dict]:
    """Median seconds of the loss and its gradient w.r.t. h and w, per vocabulary and
    implementation, in `args.dtype` (h and w)."""
    dtype = jnp.dtype(args.dtype)
    rows = []
    for vocab in args.vocabs:
        keys = jax.random.split(jax.random.key(vocab), 3)
        h = _normal(keys[0], (args.tokens, args.d_model), dtype)
        w = (_normal(keys[1], (args.d_model, vocab), jnp.float32)
             * args.d_model ** -0.5).astype(dtype)
        targets = jax.random.randint(keys[2], (args.tokens,), 0, vocab)
        mask = jnp.ones((args.tokens,), bool)
        row = {"vocab": vocab}
        for impl in CE_IMPLS:
            step = jax.value_and_grad(_ce_objective(impl, args.block_v), argnums=(0, 1))
            row[impl] = _attempt(median_seconds, step, h, w, targets, mask, runs=args.runs,
                                 warmup=args.warmup)
        _keep(rows, row)
    return rows


def _ce_time_lines(args) -> list[str]:
    rows = cross_entropy_times(args)
    interpret = not _on_gpu()
    lines = [
        "",
        f"Time of the loss and its gradient (w.r.t. h and w), {args.dtype}, {args.tokens} "
        f"tokens, d_model {args.d_model}: naive (full logits), xla (block_v="
        f"{args.block_v}) and pallas (the kernels' default blocks). Median of {args.runs} "
        f"runs after compiling once and {args.warmup} warm-up runs. `interpret`: the "
        "Pallas kernels ran in interpret mode (no GPU), a smoke test, not a speed.",
        "",
        "| vocab | naive ms | xla ms | pallas ms | naive / pallas | xla / pallas |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['vocab']} | {_ms(r['naive'], False)} | {_ms(r['xla'], False)} | "
                     f"{_ms(r['pallas'], interpret)} | {_ratio(r['naive'][0], r['pallas'][0])} "
                     f"| {_ratio(r['xla'][0], r['pallas'][0])} |")
    return lines


def _ce_table(args, argv: list[str]) -> list[str]:
    vocabs = args.vocabs
    rows = cross_entropy_memory(args.tokens, args.d_model, vocabs, args.block_v)
    lines = [
        *header("fused_cross_entropy", argv),
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
    return lines + (_ce_time_lines(args) if args.time else [])


# ----------------------------------------------------------------------------
# Timing shared by flash_attention, grouped_matmul and linear_attention.


def median_seconds(fn, *args, runs: int, warmup: int = 2) -> float:
    """Median wall time of `runs` calls of the compiled `fn(*args)`.

    `fn` is jitted and compiled once, then called `warmup` times untimed; every call
    blocks until all of its outputs are ready. `args` should already be on the device.
    """
    compiled = jax.jit(fn).lower(*args).compile()
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fwd_bwd(f, num_inputs: int):
    """step(*inputs, cotangent, *rest) -> (f(*inputs, *rest), gradients w.r.t. inputs).

    The work of one training step through `f`: the forward pass and its pullback.
    """

    def step(*args):
        inputs, cotangent, rest = args[:num_inputs], args[num_inputs], args[num_inputs + 1:]
        out, pullback = jax.vjp(lambda *xs: f(*xs, *rest), *inputs)
        return out, pullback(cotangent)

    return step


def matmul_peak(n: int, dtype, runs: int, warmup: int = 2) -> float:
    """FLOP/s of one n x n x n matmul in `dtype` on the default device."""
    a, b = (jax.random.normal(key, (n, n), dtype) for key in jax.random.split(jax.random.key(0)))
    return 2 * n**3 / median_seconds(jnp.matmul, a, b, runs=runs, warmup=warmup)


class _NotAvailable(Exception):
    """An implementation that cannot run here; the message says why."""


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _attempt(func, *args, **kwargs) -> tuple[float | None, str]:
    """(func(...) seconds, "") or (None, why not): one failure never stops a table."""
    try:
        return func(*args, **kwargs), ""
    except Exception as e:  # reported in the table instead
        if isinstance(e, _NotAvailable):
            reason = str(e)
        else:
            first = (str(e).strip().splitlines() or [""])[0]
            reason = f"{type(e).__name__}: {first}"
        reason = reason.replace("|", "/")
        return None, reason if len(reason) <= 120 else reason[:117] + "..."


def _keep(rows: list[dict], row: dict) -> None:
    """Append `row` and print it at once (stderr), so that a run cut short still shows it."""
    rows.append(row)
    print("row:", row, file=sys.stderr, flush=True)


def _sig(value: float) -> str:
    """Three significant digits; whole numbers, not exponents, from 100 up."""
    text = f"{value:#.3g}"
    if value >= 1 and "e" in text:
        return f"{value:.0f}"
    return text.rstrip(".")


def _cell(seconds: float | None, reason: str, flops: float, peak: float, interpret: bool) -> str:
    """'TFLOP/s (% of peak)', or 'n/a: reason'."""
    if seconds is None:
        return f"n/a: {reason}"
    rate = flops / seconds
    return (f"{_sig(rate / 1e12)} ({100 * rate / peak:.1f}%)"
            + (" interpret" if interpret else ""))


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None:
        return "n/a"
    return f"{numerator / denominator:.2f}x"


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _timing_text(args, peak: float) -> str:
    return (f"Median of {args.runs} runs after compiling once and {args.warmup} warm-up "
            f"runs. Peak: a {args.peak_n}^3 {args.dtype} matmul timed in this run, "
            f"{_sig(peak / 1e12)} TFLOP/s; a cell reads TFLOP/s (fraction of that peak). "
            "`interpret`: the Pallas kernel ran in interpret mode (no GPU), a smoke test, "
            "not a speed.")


# ----------------------------------------------------------------------------
# flash_attention: causal attention forward+backward.


ATTENTION_IMPLS = {"ours": "ours (Pallas flash)", "xla": "jax.nn xla",
                   "cudnn": "jax.nn cudnn", "mha": "jax Pallas mha"}


def _interpreted(impl: str) -> bool:
    """Whether an attention implementation runs as an interpreted Pallas kernel here."""
    return impl in ("ours", "mha") and not _on_gpu()


def _attention_fn(impl: str, scale: float, group: int, block_q: int, block_k: int):
    """(q, k, v) -> out for one implementation."""
    interpret = _interpreted(impl)
    if impl == "ours":
        return functools.partial(flash_attention, causal=True, sm_scale=scale, block_q=block_q,
                                 block_k=block_k, interpret=interpret)
    if impl in ("xla", "cudnn"):
        if impl == "cudnn" and not _on_gpu():
            raise _NotAvailable(f"cuDNN needs a GPU (backend is {jax.default_backend()})")
        return functools.partial(jax.nn.dot_product_attention, scale=scale, is_causal=True,
                                 implementation=impl)
    if group > 1:
        raise _NotAvailable("jax's Pallas mha takes no grouped K/V heads")
    try:
        from jax.experimental.pallas.ops.gpu.attention import mha
    except Exception as e:  # moved or removed in this jax
        raise _NotAvailable(f"no jax.experimental.pallas.ops.gpu.attention.mha in jax "
                            f"{jax.__version__} ({type(e).__name__})") from e
    return functools.partial(mha, segment_ids=None, sm_scale=scale, causal=True,
                             interpret=interpret)


def _time_attention(impl: str, q, k, v, do, args) -> float:
    fn = _attention_fn(impl, q.shape[-1] ** -0.5, args.group, args.block_q, args.block_k)
    return median_seconds(fwd_bwd(fn, 3), q, k, v, do, runs=args.runs, warmup=args.warmup)


def attention_flops(batch: int, heads: int, seq: int, head_dim: int) -> float:
    """Causal forward+backward matmul FLOPs: forward 4*B*H*T*T*D / 2, backward 2.5x that."""
    return 3.5 * 4 * batch * heads * seq * seq * head_dim / 2


def attention_rows(args, peak: float) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    rows = []
    for head_dim in args.head_dims:
        heads = args.width // head_dim
        kv_heads = heads // args.group
        for seq in args.seqs:
            batch = max(1, args.tokens // seq)
            keys = jax.random.split(jax.random.key(seq * 1000 + head_dim), 4)
            q = _normal(keys[0], (batch, seq, heads, head_dim), dtype)
            k, v = (_normal(key, (batch, seq, kv_heads, head_dim), dtype) for key in keys[1:3])
            do = _normal(keys[3], q.shape, dtype)
            flops = attention_flops(batch, heads, seq, head_dim)
            row = {"head_dim": head_dim, "seq": seq, "batch": batch, "heads": heads,
                   "kv_heads": kv_heads, "flops": flops, "cells": {}}
            for impl in args.impls:
                seconds, reason = _attempt(_time_attention, impl, q, k, v, do, args)
                row["cells"][impl] = _cell(seconds, reason, flops, peak, _interpreted(impl))
            _keep(rows, row)
    return rows


def _attn_table(args, argv: list[str]) -> list[str]:
    default_q, default_k = default_blocks(args.dtype)
    args.block_q, args.block_k = args.block_q or default_q, args.block_k or default_k
    peak = matmul_peak(args.peak_n, args.dtype, args.runs, args.warmup)
    rows = attention_rows(args, peak)
    lines = [
        *header("flash_attention", argv),
        f"Causal attention forward+backward (gradients w.r.t. q, k, v), {args.dtype}. "
        f"batch = max(1, {args.tokens} // seq) rows; heads = {args.width} // head dim, "
        f"K/V heads = heads // {args.group}. FLOPs: forward = 2*2*B*H*T*T*D / 2 (two "
        "matmuls, causal keeps half the scores), backward = 2.5x forward, so fwd+bwd = "
        "3.5x the forward matmul FLOPs (the FlashAttention papers' convention; "
        f"recomputation not counted). ours: block_q={args.block_q}, block_k={args.block_k}; "
        "jax's mha at its default block sizes. "
        + _timing_text(args, peak),
        "",
        "| head dim | seq | batch x heads (K/V) | fwd+bwd GFLOP | "
        + " | ".join(ATTENTION_IMPLS[i] for i in args.impls) + " |",
        "|---|---|---|---|" + "---|" * len(args.impls),
    ]
    for r in rows:
        lines.append(f"| {r['head_dim']} | {r['seq']} | {r['batch']} x {r['heads']} "
                     f"({r['kv_heads']}) | {r['flops'] / 1e9:.4g} | "
                     + " | ".join(r["cells"][i] for i in args.impls) + " |")
    return lines


# ----------------------------------------------------------------------------
# grouped_matmul: against jax.lax.ragged_dot.


def _ragged_dot(x, w, group_sizes):
    return jax.lax.ragged_dot(x, w, group_sizes)


def _ours_gmm(x, w, group_sizes):
    return grouped_matmul(x, w, group_sizes, impl="pallas", interpret=not _on_gpu())


def grouped_matmul_rows(args) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    rows = []
    for tokens in args.tokens:
        for d_model in args.d_models:
            for experts in args.experts:
                # Each token to a uniformly drawn expert; the same sizes for every d_model.
                rng = np.random.default_rng([args.seed, tokens, experts])
                sizes = rng.multinomial(tokens, np.full(experts, 1.0 / experts))
                group_sizes = jnp.asarray(sizes, jnp.int32)
                keys = jax.random.split(jax.random.key(tokens + d_model + experts), 3)
                x = _normal(keys[0], (tokens, d_model), dtype)
                w = _normal(keys[1], (experts, d_model, args.ffn), dtype)
                dy = _normal(keys[2], (tokens, args.ffn), dtype)
                forward = 2 * tokens * d_model * args.ffn
                row = {"tokens": tokens, "d_model": d_model, "experts": experts,
                       "forward": forward, "largest": int(sizes.max()),
                       "smallest": int(sizes.min())}
                timing = {"runs": args.runs, "warmup": args.warmup}
                for name, fn in (("ours", _ours_gmm), ("ragged_dot", _ragged_dot)):
                    row[f"{name}_fwd"] = _attempt(median_seconds, fn, x, w, group_sizes,
                                                  **timing)
                    row[f"{name}_step"] = _attempt(median_seconds, fwd_bwd(fn, 2), x, w, dy,
                                                   group_sizes, **timing)
                _keep(rows, row)
    return rows


def _gmm_table(args, argv: list[str]) -> list[str]:
    peak = matmul_peak(args.peak_n, args.dtype, args.runs, args.warmup)
    rows = grouped_matmul_rows(args)
    interpret = not _on_gpu()
    lines = [
        *header("grouped_matmul", argv),
        f"Grouped matmul out[i] = x[i] @ w[expert of i], {args.dtype}, x (tokens, d_model), "
        f"w (experts, d_model, {args.ffn}); each token goes to an expert drawn uniformly "
        f"(seed {args.seed}), so group sizes are random and sum to tokens. ours = "
        "`grouped_matmul(impl='pallas')`; ragged_dot = `jax.lax.ragged_dot` called directly. "
        "FLOPs: forward 2*tokens*d_model*ffn, fwd+bwd (dx and dw) 3x that. speed-up = "
        "ragged_dot time / ours time. " + _timing_text(args, peak),
        "",
        "| tokens | d_model x ffn | experts (sizes min-max) | fwd ours | fwd ragged_dot | "
        "fwd speed-up | fwd+bwd ours | fwd+bwd ragged_dot | fwd+bwd speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for kind, flops in (("fwd", r["forward"]), ("step", 3 * r["forward"])):
            ours, ref = r[f"ours_{kind}"], r[f"ragged_dot_{kind}"]
            cells += [_cell(*ours, flops, peak, interpret), _cell(*ref, flops, peak, False),
                      _ratio(ref[0], ours[0])]
        lines.append(f"| {r['tokens']} | {r['d_model']} x {args.ffn} | {r['experts']} "
                     f"({r['smallest']}-{r['largest']}) | " + " | ".join(cells) + " |")
    return lines


# ----------------------------------------------------------------------------
# linear_attention: chunked linear attention against flash attention.


def _linear_fn(impl: str, chunk: int):
    """(q, k, v[, log_decay]) -> out of chunked linear attention."""
    interpret = not _on_gpu() if impl == "pallas" else None

    def fn(q, k, v, log_decay=None):
        return chunked_linear_attention(q, k, v, log_decay=log_decay, chunk=chunk, impl=impl,
                                        interpret=interpret)[0]

    return fn


def linear_rows(args) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    timing = {"runs": args.runs, "warmup": args.warmup}
    flash = functools.partial(flash_attention, causal=True, interpret=not _on_gpu())
    rows = []
    for seq in args.seqs:
        shape = (args.batch, seq, args.heads, args.head_dim)
        keys = jax.random.split(jax.random.key(seq), 5)
        q, k, v, do = (_normal(key, shape, dtype) for key in keys[:4])
        inputs = (q, k, v)
        if not args.no_decay:
            gates = shape if args.gla else shape[:3]
            inputs += (-jax.nn.softplus(jax.random.normal(keys[4], gates)),)
        row = {"seq": seq}
        for impl in ("pallas", "xla"):
            step = fwd_bwd(_linear_fn(impl, args.chunk), len(inputs))
            row[impl] = _attempt(median_seconds, step, *inputs, do, **timing)
        row["flash"] = _attempt(median_seconds, fwd_bwd(flash, 3), q, k, v, do, **timing)
        _keep(rows, row)
    return rows


def _ms(result: tuple[float | None, str], interpret: bool) -> str:
    seconds, reason = result
    if seconds is None:
        return f"n/a: {reason}"
    return _sig(seconds * 1e3) + (" interpret" if interpret else "")


def _linear_table(args, argv: list[str]) -> list[str]:
    rows = linear_rows(args)
    interpret = not _on_gpu()
    decay = ("no decay" if args.no_decay else "GLA gates (one per key dimension and step)"
             if args.gla else "one decay per head and step")
    lines = [
        *header("linear_attention", argv),
        f"Forward+backward wall time (ms; gradients w.r.t. q, k, v"
        f"{'' if args.no_decay else ' and the log decay'}), {args.dtype}, causal. Linear "
        f"attention: `chunked_linear_attention`, chunk {args.chunk}, {decay}, as the Pallas "
        "kernel and as the chunked XLA form; flash: our Pallas `flash_attention` (softmax, "
        "quadratic in seq) at the same shape. A ratio flash / linear above 1 means linear "
        f"attention is faster. Median of {args.runs} runs after compiling once and "
        f"{args.warmup} warm-up runs. `interpret`: the Pallas kernel ran in interpret mode "
        "(no GPU), a smoke test, not a speed.",
        "",
        "| seq | batch x heads x head dim | linear Pallas ms | linear XLA ms | flash ms | "
        "flash / linear Pallas | flash / linear XLA |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seq']} | {args.batch} x {args.heads} x {args.head_dim} | "
            f"{_ms(r['pallas'], interpret)} | {_ms(r['xla'], False)} | "
            f"{_ms(r['flash'], interpret)} | {_ratio(r['flash'][0], r['pallas'][0])} | "
            f"{_ratio(r['flash'][0], r['xla'][0])} |")
    return lines


# ----------------------------------------------------------------------------
# selected_attention: NSA's selected branch against flash attention.


def _random_selection(key, batch: int, seq: int, kv_heads: int, block: int, n: int):
    """(index, valid) by NSA's rules (`select`) from uniform random importances."""
    from efflm.layers.attention.nsa import NsaSettings, select

    own = NsaSettings(select_block=block, select_blocks=n, stride=block, compress_block=block)
    importance = jax.random.uniform(key, (batch, kv_heads, seq, -(-seq // block)))
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    return select(importance, positions, jnp.zeros_like(positions), own)


def selected_rows(args) -> list[dict]:
    from efflm.layers.attention.nsa import selected_attention as selected_xla

    dtype = jnp.dtype(args.dtype)
    timing = {"runs": args.runs, "warmup": args.warmup}
    interpret = not _on_gpu()
    flash = functools.partial(flash_attention, causal=True, interpret=interpret)
    rows = []
    for seq in args.seqs:
        keys = jax.random.split(jax.random.key(seq), 5)
        q, do = (_normal(key, (1, seq, args.heads, args.head_dim), dtype) for key in keys[:2])
        k, v = (_normal(key, (1, seq, args.kv_heads, args.head_dim), dtype)
                for key in keys[2:4])
        index, valid = _random_selection(keys[4], 1, seq, args.kv_heads, args.select_block,
                                         args.select_blocks)
        seg = jnp.ones((1, seq), jnp.int32)
        pallas = lambda q, k, v, index, valid: selected_attention(
            q, k, v, index, valid, select_block=args.select_block, block_q=args.block_q,
            interpret=interpret)
        xla = lambda q, k, v, index, valid, seg=seg: selected_xla(
            q, k, v, seg, index, valid, args.select_block, args.block_q).astype(q.dtype)
        row = {"seq": seq, "union": float(union_blocks(index, valid, args.select_block,
                                                       args.block_q))}
        for name, fn in (("pallas", pallas), ("xla", xla)):
            row[name] = _attempt(median_seconds, fwd_bwd(fn, 3), q, k, v, do, index, valid,
                                 **timing)
        row["flash"] = _attempt(median_seconds, fwd_bwd(flash, 3), q, k, v, do, **timing)
        _keep(rows, row)
    return rows


def _selected_table(args, argv: list[str]) -> list[str]:
    rows = selected_rows(args)
    interpret = not _on_gpu()
    lines = [
        *header("selected_attention", argv),
        f"Forward+backward wall time (ms; gradients w.r.t. q, k, v), {args.dtype}, batch 1, "
        f"{args.heads} query heads on {args.kv_heads} K/V heads of {args.head_dim}; "
        f"selection blocks of {args.select_block} tokens, {args.select_blocks} per query, "
        f"queries in blocks of {args.block_q}. Pallas: `selected_attention`; XLA: the nsa "
        "layer's gathering path; flash: our Pallas `flash_attention` over the whole causal "
        "sequence. Union: mean blocks per query block the kernel walks (n for one query). "
        f"Median of {args.runs} runs after compiling once and {args.warmup} warm-up runs. "
        "`interpret`: the Pallas kernel ran in interpret mode (no GPU), a smoke test, not "
        "a speed.",
        "",
        "| seq | union blocks | selected Pallas ms | selected XLA ms | flash ms | "
        "flash / Pallas | XLA / Pallas |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seq']} | {r['union']:.1f} | {_ms(r['pallas'], interpret)} | "
            f"{_ms(r['xla'], False)} | {_ms(r['flash'], interpret)} | "
            f"{_ratio(r['flash'][0], r['pallas'][0])} | {_ratio(r['xla'][0], r['pallas'][0])} |")
    return lines


# ----------------------------------------------------------------------------
# Command line.


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _positive_ints(text: str) -> list[int]:
    parts = text.split(",")
    try:
        return [_positive_int(part.strip()) for part in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of positive integers "
            "(e.g. 1024,2048)") from None


def _impl_list(text: str) -> list[str]:
    impls = [part.strip() for part in text.split(",")]
    unknown = [i for i in impls if i not in ATTENTION_IMPLS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown implementation(s) {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(ATTENTION_IMPLS)}")
    return impls


# Per benchmark, option -> (default on a GPU, default elsewhere).
DEFAULTS = {
    "flash_attention": {"seqs": ([1024, 2048, 4096, 8192, 16384], [128, 256]),
                        "head_dims": ([64, 128], [64]), "tokens": (16384, 256),
                        "width": (2048, 128)},
    "grouped_matmul": {"tokens": ([16384, 32768, 65536], [256]),
                       "d_models": ([1024, 2048], [64]), "ffn": (4096, 128),
                       "experts": ([8, 64], [4])},
    "linear_attention": {"seqs": ([8192, 16384, 32768], [128, 256]), "batch": (4, 1),
                         "heads": (16, 2), "head_dim": (64, 32)},
    "selected_attention": {"seqs": ([8192, 16384, 32768, 65536], [128]), "heads": (16, 2),
                           "kv_heads": (1, 1), "head_dim": (128, 32),
                           "select_block": (64, 16), "select_blocks": (16, 2)},
    "timed": {"runs": (20, 3), "peak_n": (8192, 256)},
    # The memory table compiles without running: GPU shapes everywhere unless timed.
    "ce": {"tokens": (8192, 256), "d_model": (512, 64), "vocabs": ([32768, 65536], [1024])},
}


def _with_defaults(args) -> None:
    """Fill options left unset with the GPU or the tiny defaults."""
    index = 0 if _on_gpu() else 1
    if args.what == "fused_cross_entropy":
        index = 0 if _on_gpu() or not args.time else 1
        tables = (DEFAULTS["ce"], {"runs": DEFAULTS["timed"]["runs"]})
    else:
        tables = (DEFAULTS[args.what], DEFAULTS["timed"])
    for table in tables:
        for name, choices in table.items():
            if getattr(args, name, 0) is None:
                setattr(args, name, choices[index])


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _default_help(what: str, name: str) -> str:
    gpu, other = DEFAULTS[what][name]
    return f"default: {_show(gpu)} on a GPU, {_show(other)} elsewhere"


def _ce_help(name: str) -> str:
    gpu, other = DEFAULTS["ce"][name]
    return f"default: {_show(gpu)} ({_show(other)} with --time off a GPU)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="efflm bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)

    ce = sub.add_parser("fused_cross_entropy",
                        help="memory (and with --time, time) of fused vs naive cross-entropy")
    ce.add_argument("--tokens", type=_positive_int, help=_ce_help("tokens"))
    ce.add_argument("--d-model", type=_positive_int, help=_ce_help("d_model"))
    ce.add_argument("--vocabs", type=_positive_ints, help=_ce_help("vocabs"))
    ce.add_argument("--block-v", type=_positive_int, default=512, help="xla (default: 512)")
    ce.add_argument("--time", action="store_true",
                    help="also time naive, xla and pallas (defaults: GPU shapes on a GPU, "
                    "tiny ones elsewhere)")
    ce.add_argument("--runs", type=_positive_int, help=_default_help("timed", "runs"))
    ce.add_argument("--warmup", type=_positive_int, default=2, help="default: 2")
    ce.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="--time's inputs (default: bfloat16)")

    def timed(name: str, help_: str):
        """(subparser, option -> the help text of its default)."""
        s = sub.add_parser(name, help=help_)
        s.add_argument("--runs", type=_positive_int, help=_default_help("timed", "runs"))
        s.add_argument("--warmup", type=_positive_int, default=2,
                       help="untimed calls after compiling (default: 2)")
        s.add_argument("--dtype", default="bfloat16",
                       choices=["bfloat16", "float16", "float32"])
        return s, functools.partial(_default_help, name)

    a, default = timed("flash_attention",
                       "causal attention fwd+bwd TFLOP/s: ours, jax.nn xla/cudnn, jax mha")
    a.add_argument("--seqs", type=_positive_ints, help=default("seqs"))
    a.add_argument("--head-dims", type=_positive_ints, help=default("head_dims"))
    a.add_argument("--tokens", type=_positive_int,
                   help="batch x seq per row; " + default("tokens"))
    a.add_argument("--width", type=_positive_int, help="heads x head dim; " + default("width"))
    a.add_argument("--group", type=_positive_int, default=1,
                   help="query heads per K/V head (default: 1)")
    a.add_argument("--impls", type=_impl_list, default=list(ATTENTION_IMPLS),
                   help=f"default: {','.join(ATTENTION_IMPLS)}")
    a.add_argument("--block-q", type=_positive_int,
                   help="ours (default: flash attention's own for --dtype)")
    a.add_argument("--block-k", type=_positive_int,
                   help="ours (default: flash attention's own for --dtype)")
    a.add_argument("--peak-n", type=_positive_int,
                   help="size of the peak matmul; " + _default_help("timed", "peak_n"))

    g, default = timed("grouped_matmul", "grouped matmul vs jax.lax.ragged_dot, fwd and fwd+bwd")
    g.add_argument("--tokens", type=_positive_ints, help=default("tokens"))
    g.add_argument("--d-models", type=_positive_ints, help=default("d_models"))
    g.add_argument("--ffn", type=_positive_int, help=default("ffn"))
    g.add_argument("--experts", type=_positive_ints, help=default("experts"))
    g.add_argument("--seed", type=int, default=0, help="group sizes (default: 0)")
    g.add_argument("--peak-n", type=_positive_int,
                   help="size of the peak matmul; " + _default_help("timed", "peak_n"))

    n, default = timed("linear_attention",
                       "chunked linear attention vs flash attention, fwd+bwd time")
    n.add_argument("--seqs", type=_positive_ints, help=default("seqs"))
    n.add_argument("--batch", type=_positive_int, help=default("batch"))
    n.add_argument("--heads", type=_positive_int, help=default("heads"))
    n.add_argument("--head-dim", type=_positive_int, help=default("head_dim"))
    n.add_argument("--chunk", type=_positive_int, default=64, help="default: 64")
    n.add_argument("--no-decay", action="store_true", help="plain linear attention")
    n.add_argument("--gla", action="store_true", help="one gate per key dimension (GLA)")

    e, default = timed("selected_attention",
                       "NSA's selected branch (Pallas, XLA) vs flash attention, fwd+bwd time")
    for name in ("seqs", "heads", "kv_heads", "head_dim", "select_block", "select_blocks"):
        e.add_argument(f"--{name.replace('_', '-')}",
                       type=_positive_ints if name == "seqs" else _positive_int,
                       help=default(name))
    e.add_argument("--block-q", type=_positive_int, default=64, help="default: 64")

    for s in (ce, a, g, n, e):
        s.add_argument("--out", default="", help="also write the table to this markdown file")
    return p


def _check(p: argparse.ArgumentParser, args) -> None:
    """Shape constraints argparse types cannot see; p.error exits with status 2."""
    if args.what == "selected_attention" and args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    if args.what == "selected_attention":
        for name in ("select_block", "block_q"):
            block = getattr(args, name)
            if block < 16 or block & (block - 1):
                p.error(f"--{name.replace('_', '-')} {block} must be a power of two >= 16")
    if args.what != "flash_attention":
        return
    for head_dim in args.head_dims:
        if args.width % head_dim:
            p.error(f"--width {args.width} is not a multiple of head dim {head_dim}")
        if (args.width // head_dim) % args.group:
            p.error(f"{args.width // head_dim} heads (width {args.width} / head dim "
                    f"{head_dim}) do not split into groups of --group {args.group}")


# Subcommand (the pallas_kernels/ module it measures) -> its table.
TABLES = {"fused_cross_entropy": _ce_table, "flash_attention": _attn_table,
          "grouped_matmul": _gmm_table, "linear_attention": _linear_table,
          "selected_attention": _selected_table}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    args = p.parse_args(argv)
    _with_defaults(args)
    _check(p, args)
    emit(TABLES[args.what](args, argv), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
