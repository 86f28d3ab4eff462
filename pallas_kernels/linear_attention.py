"""Chunked causal linear attention with optional per-step decay (gates).

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t    (state: (dk, dv), float32)
    o_t = q_t S_t

g_t = 0 is plain linear attention ("Transformers are RNNs"). A log decay g_t <= 0
is either one scalar per head and step (RetNet's fixed decay, or a scalar gate),
shaped (batch, length, heads), or one per key dimension (GLA's data-dependent
gates, "Gated Linear Attention Transformers with Hardware-Efficient Training"),
shaped (batch, length, heads, dk). No feature map, normaliser or scale is
applied: callers do that.

Packed documents: `segment_ids` (batch, length) restarts the state wherever the id
changes from one token to the next (the initial state belongs to the first segment),
so no token attends across a boundary. Every form takes it: scores across segments
are masked, the incoming state reaches only its own segment's tokens, and a chunk
with a boundary passes on only its last segment's keys. The Pallas backward's
reversed passes take the reversed segment indices (the masks are symmetric), and the
log-decay gradient formula below holds unchanged, masked terms being zero.

Implementations, side by side (as fla's ops/<method>/{naive,chunk}.py):
  * `linear_attention_recurrent`: a `jax.lax.scan` over tokens (the reference);
  * `xla`: the chunkwise-parallel form in pure JAX: masked quadratic attention
    with cumulative log decays inside a chunk, state passing between chunks
    (a scan over chunks); gradients by autodiff. Per-key-dimension gates use
    sub-chunks inside each chunk so that no exponent is positive (below);
  * `pallas`: two Triton-style Pallas kernels: a state pass (one program per batch
    row, head and value slice) walks the chunks with the state in float32 registers
    and writes the state entering each chunk; an output pass, one program per chunk,
    forms the chunk's outputs from it, all chunks in parallel. Dots take the inputs'
    dtype and accumulate in float32; the float32 scores, state and gate products are
    cast to the inputs' dtype for their dots (bf16 inputs: bf16 tensor-core dots, not
    TF32). Its backward (custom_vjp) runs the same kernels three more times: dq is the
    forward pass of (dO, V, K) from S0^T; dk and dv (and d initial state) are
    forward passes over the reversed sequence started from the final state's
    cotangent; the log-decay gradient
    follows from  d b_t = q_t.dq_t - k_t.dk_t  (b the cumulative log decay),
    reverse-cumsummed. Per-key-dimension gates (GLA) have their own pair of kernels
    (the output pass takes the xla form's sub-chunks, one key at a time inside a
    sub-chunk, and sums over the key dimension 64 columns at a time); in the backward
    the dq and dk passes gate the state's columns instead of its rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from efflm.pallas_kernels.common import alias_initial_outputs, mm

__all__ = ["chunked_linear_attention", "linear_attention_recurrent", "linear_attention_chunked_xla"]

_IMPLS = ("auto", "xla", "pallas")
# Triton-style kernel: name the Triton backend (GPU pallas_call otherwise picks Mosaic GPU).
_TRITON = plgpu.CompilerParams(num_warps=4, num_stages=1)


# The gated kernels keep a chunk of k, v and gates live beside the state: 4 warps spill
# at head dim 64 on sm_90 (`efflm bench compile`).
_GATED_TRITON = plgpu.CompilerParams(num_warps=8, num_stages=1)
# Value columns per program of the gated kernels (all of them when fewer).
_GATED_BLOCK_DV = 64
# Key columns per step of the gated-keys output pass's sums over the key dimension: whole
# (chunk x 128) float32 tiles spill at head dim 128 on sm_90 (`efflm bench compile`).
_GATED_KEY_BLOCK = 64


def _triton_params(dk: int, dv: int):
    """The (dk x dv) float32 state lives in registers: from 128 x 128 on, 4 warps spill
    on sm_90 (`efflm bench compile`) and 8 are used."""
    return _TRITON if dk * dv < 128 * 128 else plgpu.CompilerParams(num_warps=8, num_stages=1)


def check_inputs(q, k, v, log_decay, initial_state):
    if q.ndim != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be (batch, length, heads, dk); "
                         f"got q{q.shape} k{k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (batch, length, heads, dv) matching q{q.shape}; "
                         f"got v{v.shape}")
    if log_decay is not None and log_decay.shape not in (q.shape[:3], q.shape):
        raise ValueError(f"log_decay must be (batch, length, heads) = {q.shape[:3]} (one "
                         f"gate per head) or (batch, length, heads, dk) = {q.shape} (GLA: "
                         f"one per key dimension); got {log_decay.shape}")
    batch, _, heads, dk = q.shape
    state_shape = (batch, heads, dk, v.shape[-1])
    if initial_state is not None and initial_state.shape != state_shape:
        raise ValueError(f"initial_state must be (batch, heads, dk, dv) = {state_shape}; "
                         f"got {initial_state.shape}")


def _defaults(q, v, log_decay, initial_state):
    batch, length, heads, dk = q.shape
    if log_decay is None:
        log_decay = jnp.zeros((batch, length, heads), jnp.float32)
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, dk, v.shape[-1]), jnp.float32)
    return log_decay.astype(jnp.float32), initial_state.astype(jnp.float32)


# ----------------------------------------------------------------------------
# Reference: recurrent scan over tokens.


def segment_starts(segment_ids):
    """(batch, length) bool: True where a token's segment id differs from the previous
    token's (never at position 0)."""
    first = jnp.zeros_like(segment_ids[:, :1], dtype=bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def segment_cumsum(x, segment_ids):
    """Inclusive cumulative sum over axis 1 of x (batch, length, ...), restarted at each
    segment start."""
    if segment_ids is None:
        return jnp.cumsum(x, axis=1)
    starts = segment_starts(segment_ids).reshape(*segment_ids.shape, *(1,) * (x.ndim - 2))

    def combine(a, b):
        (a_start, a_sum), (b_start, b_sum) = a, b
        return a_start | b_start, jnp.where(b_start, b_sum, a_sum + b_sum)

    return jax.lax.associative_scan(combine, (jnp.broadcast_to(starts, x.shape), x),
                                    axis=1)[1]


def segment_index(segment_ids):
    """(batch, length) int32: how many segment starts lie at or before each token, so
    two tokens share a segment exactly when their indices are equal."""
    return jnp.cumsum(segment_starts(segment_ids), axis=1, dtype=jnp.int32)


def linear_attention_recurrent(q, k, v, *, log_decay=None, initial_state=None,
                               segment_ids=None):
    """The obviously correct form: one state update per token (zeroed at each segment
    start). Returns (out, final_state)."""
    check_inputs(q, k, v, log_decay, initial_state)
    log_decay, state = _defaults(q, v, log_decay, initial_state)
    f32 = lambda a: jnp.moveaxis(a.astype(jnp.float32), 1, 0)  # time first
    if segment_ids is None:
        starts = jnp.zeros(q.shape[:2], bool)
    else:
        starts = segment_starts(segment_ids)

    def step(state, inputs):
        q_t, k_t, v_t, g_t, start = inputs  # (batch, heads, d), g_t (batch, heads[, dk])
        decay = jnp.exp(g_t)[..., None] if g_t.ndim == 3 else jnp.exp(g_t)[..., None, None]
        state = jnp.where(start[:, None, None, None], 0.0, decay * state)
        state = state + k_t[..., :, None] * v_t[..., None, :]
        return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)

    state, out = jax.lax.scan(step, state, (f32(q), f32(k), f32(v), f32(log_decay),
                                            jnp.moveaxis(starts, 1, 0)))
    return jnp.moveaxis(out, 0, 1).astype(q.dtype), state


# ----------------------------------------------------------------------------
# Chunkwise-parallel pure JAX (the `xla` impl).


def to_chunks(a, chunk):
    """(batch, length, heads, ...) -> (chunks, batch, heads, chunk, ...), zero-padded."""
    batch, length = a.shape[:2]
    pad = -length % chunk
    if pad:
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    a = a.reshape(batch, (length + pad) // chunk, chunk, *a.shape[2:])
    a = jnp.moveaxis(a, 1, 0)  # (chunks, batch, chunk, heads, ...)
    return jnp.moveaxis(a, 3, 2)  # (chunks, batch, heads, chunk, ...)


def from_chunks(out, length):
    """(chunks, batch, heads, chunk, dv) -> (batch, length, heads, dv), padding dropped."""
    chunks, batch, heads, chunk, dv = out.shape
    out = jnp.moveaxis(out, 0, 1).swapaxes(2, 3).reshape(batch, chunks * chunk, heads, dv)
    return out[:, :length]


def segment_chunks(segment_ids, batch, length, chunk):
    """Per chunk: each token's segment index (chunks, batch, 1, chunk) and the index of
    the token before the chunk (chunks, batch, 1, 1); the first chunk's "before" is its
    first token, so the initial state reaches the first segment. Padding repeats the
    last index. Without segment ids everything is one segment."""
    if segment_ids is None:
        seg = jnp.zeros((batch, length), jnp.int32)
    else:
        seg = segment_index(segment_ids)
    pad = -length % chunk
    seg = jnp.pad(seg, [(0, 0), (0, pad)], mode="edge") if pad else seg
    seg = jnp.moveaxis(seg.reshape(batch, -1, chunk), 1, 0)  # (chunks, batch, chunk)
    before = jnp.concatenate([seg[:1, :, :1], seg[:-1, :, -1:]], axis=0)
    return seg[:, :, None], before[:, :, None]


def linear_attention_chunked_xla(q, k, v, *, log_decay=None, initial_state=None, chunk=64,
                                 segment_ids=None):
    """Chunkwise form: masked attention with decay inside a chunk, state between chunks.

    Zero padding to a whole number of chunks is exact: padded tokens have k = v = 0
    and log decay 0, so they leave the state unchanged. With `segment_ids`, scores
    across a segment boundary are masked, the incoming state reaches only the tokens
    of the segment it belongs to, and a chunk with a boundary keeps only its last
    segment's keys in the state it passes on.
    """
    check_inputs(q, k, v, log_decay, initial_state)
    log_decay, state = _defaults(q, v, log_decay, initial_state)
    seg = segment_chunks(segment_ids, q.shape[0], q.shape[1], chunk)
    if log_decay.ndim == 4:
        return _gla_chunked_xla(q, k, v, log_decay, state, chunk, seg)
    length = q.shape[1]
    qc, kc, vc = (to_chunks(a.astype(jnp.float32), chunk) for a in (q, k, v))
    bc = jnp.cumsum(to_chunks(log_decay, chunk), axis=-1)  # (chunks, batch, heads, chunk)
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))

    def step(state, inputs):
        q_c, k_c, v_c, b, s, before = inputs  # s (batch, 1, chunk), before (batch, 1, 1)
        b_last, s_last = b[..., -1:], s[..., -1:]
        keep = causal & (s[..., :, None] == s[..., None, :])
        diff = jnp.where(keep, b[..., :, None] - b[..., None, :], -jnp.inf)
        scores = jnp.einsum("bhik,bhjk->bhij", q_c, k_c) * jnp.exp(diff)
        carried = jnp.where(s == before, jnp.exp(b), 0.0)  # the state's share per query
        out = (jnp.einsum("bhij,bhjv->bhiv", scores, v_c)
               + carried[..., None] * jnp.einsum("bhik,bhkv->bhiv", q_c, state))
        k_decayed = k_c * jnp.where(s == s_last, jnp.exp(b_last - b), 0.0)[..., None]
        kept = jnp.where(s_last == before, jnp.exp(b_last), 0.0)
        state = (kept[..., None] * state
                 + jnp.einsum("bhjk,bhjv->bhkv", k_decayed, v_c))
        return state, out

    state, out = jax.lax.scan(step, state, (qc, kc, vc, bc, *seg))
    return from_chunks(out, length).astype(q.dtype), state


def sub_chunk(chunk: int) -> int:
    """Sub-chunk length for per-key-dimension gates: 16, or the chunk if it is smaller
    or not a multiple of 16."""
    return 16 if chunk > 16 and chunk % 16 == 0 else chunk


def _gla_chunked_xla(q, k, v, log_decay, state, chunk, seg):
    """Chunkwise form with one gate per key dimension (GLA), numerically safe.

    With b the cumulative log gate inside a chunk (non-increasing), the score of
    query i and key j <= i is sum_d q_id k_jd exp(b_id - b_jd). Factorising it as
    (q_i exp(b_i - r)) . (k_j exp(r - b_j)) keeps both exponents <= 0 only when
    b_j >= r >= b_i. So the chunk is cut into sub-chunks: for the keys of earlier
    sub-chunks, r is b just before the query's sub-chunk; inside a sub-chunk the
    (sub x sub x dk) exponents are taken directly. Each chunk step is recomputed in
    the backward pass (jax.checkpoint) rather than storing those tensors.
    """
    length = q.shape[1]
    qc, kc, vc = (to_chunks(a.astype(jnp.float32), chunk) for a in (q, k, v))
    bc = jnp.cumsum(to_chunks(log_decay, chunk), axis=-2)  # (chunks, b, h, chunk, dk)
    sub = sub_chunk(chunk)
    n = chunk // sub
    pos = jnp.arange(chunk)
    first = (jnp.arange(n) * sub)[:, None]  # each query sub-chunk's first position
    earlier = pos[None, :] < first  # (n, chunk): keys of earlier sub-chunks
    inside = jnp.tril(jnp.ones((sub, sub), bool))

    @jax.checkpoint
    def step(state, inputs):
        q_c, k_c, v_c, b, s, before = inputs  # (b, h, chunk, dk|dv); s (b, 1, chunk)
        split = lambda a: a.reshape(*a.shape[:2], n, sub, a.shape[-1])
        q_s, k_s, v_s, b_s = split(q_c), split(k_c), split(v_c), split(b)
        s_s = s.reshape(*s.shape[:2], n, sub)
        same = s_s[..., :, None] == s[..., None, None, :]  # (b, 1, n, sub, chunk)
        same_sub = s_s[..., :, None] == s_s[..., None, :]  # (b, 1, n, sub, sub)
        # r: b at the position before each query sub-chunk (0 for the first, unused).
        r = jnp.concatenate([jnp.zeros_like(b_s[:, :, :1, -1]), b_s[:, :, :-1, -1]], axis=2)
        q_r = q_s * jnp.exp(b_s - r[:, :, :, None])
        k_exp = jnp.where(earlier[None, None, :, :, None],
                          r[:, :, :, None] - b[:, :, None], -jnp.inf)
        k_r = k_c[:, :, None] * jnp.exp(k_exp)  # (b, h, n, chunk, dk)
        scores = jnp.where(same, jnp.einsum("bhnik,bhnjk->bhnij", q_r, k_r), 0.0)
        out = jnp.einsum("bhnij,bhjv->bhniv", scores, v_c)
        diff = jnp.where(inside[:, :, None], b_s[..., :, None, :] - b_s[..., None, :, :],
                         -jnp.inf)  # (b, h, n, sub, sub, dk)
        diag = jnp.einsum("bhnik,bhnjk,bhnijk->bhnij", q_s, k_s, jnp.exp(diff))
        out = out + jnp.einsum("bhnij,bhnjv->bhniv", jnp.where(same_sub, diag, 0.0), v_s)
        out = out.reshape(*out.shape[:2], chunk, out.shape[-1])
        carried = jnp.where((s == before)[..., None], q_c * jnp.exp(b), 0.0)
        out = out + jnp.einsum("bhik,bhkv->bhiv", carried, state)
        b_last, s_last = b[:, :, -1], s[..., -1:]
        k_decayed = k_c * jnp.where((s == s_last)[..., None],
                                    jnp.exp(b_last[:, :, None] - b), 0.0)
        kept = jnp.where(s_last == before, jnp.exp(b_last), 0.0)  # (b, h, dk)
        state = (kept[..., None] * state
                 + jnp.einsum("bhjk,bhjv->bhkv", k_decayed, v_c))
        return state, out

    state, out = jax.lax.scan(step, state, (qc, kc, vc, bc, *seg))
    return from_chunks(out, length).astype(q.dtype), state


# ----------------------------------------------------------------------------
# Pallas forward kernel.


def kernel_layout(q, k, v, log_decay, chunk):
    """q, k (batch, length, heads, dk), v (..., dv), log_decay (batch, length, heads[, G])
    f32 -> heads first, zero-padded to whole chunks, log decay cumulative in each chunk."""
    batch, length, heads, _ = q.shape
    pad = -length % chunk
    padded = length + pad
    dtype = jnp.result_type(q, k, v)  # one dtype for the kernels' dots
    q, k, v = (a.astype(dtype) for a in (q, k, v))

    def heads_first(a):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) if pad else a
        return jnp.moveaxis(a, 2, 1)  # (batch, heads, padded, ...)

    qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)
    gates = log_decay.shape[3:]  # () per head, (G,) per dimension
    b = heads_first(log_decay).reshape(batch, heads, padded // chunk, chunk, *gates)
    b = jnp.cumsum(b, axis=3).reshape(batch, heads, padded, *gates)
    return qh, kh, vh, b


# The most state elements (dk x block_dv) one program of the per-head kernel holds.
_MAX_STATE_BLOCK = 128 * 128


def value_block(dk: int, dv: int) -> int:
    """Value columns per program of the per-head kernel: all dv while the (dk x dv) state
    is at most 128 x 128, else slices that keep it so. At head dim 256 a whole state
    asks 320 KiB of shared memory, more than an sm_90 block has (`efflm bench compile`);
    slices of 64 ask 80 KiB."""
    block = min(dv, max(16, _MAX_STATE_BLOCK // max(dk, 1)))
    return block if dv % block == 0 else dv


def chunk_decays(b_ref, seg_ref, start, chunk: int):
    """The decays of the chunk at `start` that do not pair tokens, from the cumulative
    log decays `b_ref` (float32): (carried, the incoming state's weight on each query;
    tail, each key's decay to the chunk's end; kept, the state's through the chunk). A
    token of another segment than the incoming state's (or the chunk's last) gets 0.
    b_ref (padded,): one decay per head; (padded, G): one per state row or column, then
    carried and tail are (chunk, G) and kept (1, G)."""
    span = pl.ds(start, chunk)
    b, seg = b_ref[span], seg_ref[span]
    last = start + chunk - 1
    seg_last = seg_ref[last]
    before = seg_ref[jnp.maximum(start - 1, 0)]  # the incoming state's segment
    if len(b_ref.shape) == 1:
        b_last = b_ref[last]
    else:  # gates per dimension: the last row, and the segment ids down a column
        b_last, seg = b_ref[pl.ds(last, 1), :], seg[:, None]
    return (jnp.where(seg == before, jnp.exp(b), 0.0),
            jnp.where(seg == seg_last, jnp.exp(b_last - b), 0.0),
            jnp.where(seg_last == before, jnp.exp(b_last), 0.0))


def _state_kernel(k_ref, v_ref, b_ref, seg_ref, s0_ref, *refs, chunk: int, num_chunks: int):
    """The state pass, one (batch, head, value slice): walk the chunks, the state
    (dk, block_dv) in float32, writing the state entering each chunk (and, last, the
    final one). Keys enter the dot in the inputs' dtype (decayed in float32 first)."""
    states_ref = refs[-1]  # after the aliased initial states, if any

    def body(c, state):
        start = c * chunk
        span = pl.ds(pl.multiple_of(start, chunk), chunk)
        states_ref[c] = state
        k, v = k_ref[span, :], v_ref[span, :]
        _, tail, kept = chunk_decays(b_ref, seg_ref, start, chunk)
        k_decayed = (k.astype(jnp.float32) * tail[:, None]).astype(v.dtype)
        return kept * state + mm(k_decayed, v, trans_a=True)

    states_ref[num_chunks] = jax.lax.fori_loop(0, num_chunks, body,
                                               s0_ref[...].astype(jnp.float32))


def _output_kernel(q_ref, k_ref, v_ref, b_ref, seg_ref, state_ref, *refs, chunk: int):
    """The output pass, one (batch, head, chunk, value slice): the chunk's causal scores
    (masked across segments, decayed in float32) times its values, plus its queries on
    the state entering it. The float32 scores and state are cast to the inputs' dtype
    for their dots (as fla does); every dot accumulates in float32."""
    out_ref = refs[-1]  # after the aliased initial output, if any
    start = pl.program_id(2) * chunk
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    dt = v.dtype
    carried, _, _ = chunk_decays(b_ref, seg_ref, start, chunk)
    span = pl.ds(pl.multiple_of(start, chunk), chunk)
    b, seg = b_ref[span], seg_ref[span]
    rows = jnp.arange(chunk)
    keep = (rows[:, None] >= rows[None, :]) & (seg[:, None] == seg[None, :])
    scores = mm(q, k, trans_b=True) * jnp.exp(jnp.where(keep, b[:, None] - b[None, :],
                                                        -jnp.inf))
    out = mm(scores.astype(dt), v) + carried[:, None] * mm(q, state_ref[...].astype(dt))
    out_ref[...] = out.astype(out_ref.dtype)


def _forward_call(qh, kh, vh, b, initial_state, chunk, interpret, initial_outputs=None,
                  seg=None, block_dv=None, out_dtype=None, on_keys=True):
    """The two kernels on `kernel_layout`'s arrays -> (out (batch, heads, padded, dv),
    final_state): the state pass (one program per batch row, head and value slice,
    walking the chunks) writes the float32 state entering each chunk, (chunks + 1) x dk x
    dv x 4 bytes per batch row and head (at 4,096 tokens, chunks of 64 and 64 x 64
    heads: 1 MiB, against 1.5 MiB of bf16 q, k, v); the output pass runs one program per
    chunk (and value slice), all in parallel.

    b: one cumulative log decay per head (batch, heads, padded), or per dimension
    (batch, heads, padded, G), gating the state's rows (`on_keys`, G = dk: GLA) or its
    columns (G = dv: the backward's dq and dk passes). initial_outputs: optional (out,
    final_state) buffers for tests: the output is written into the first in place, and
    the per-chunk states start as copies of the second, so NaN-filled buffers show that
    every element is written. seg: segment indices (batch, padded) int32
    (`kernel_segments`; None: one segment). block_dv: value columns per program (None:
    `value_block`, or 64 with per-dimension gates). out in `out_dtype` (default q's).
    """
    batch, heads, padded, dk = qh.shape
    dv = vh.shape[-1]
    per_dim = b.ndim == 4
    if block_dv is None:
        block_dv = min(dv, _GATED_BLOCK_DV) if per_dim else value_block(dk, dv)
    block_dv = block_dv if dv % block_dv == 0 else dv
    num_chunks = padded // chunk
    if seg is None:
        seg = jnp.zeros((batch, padded), jnp.int32)
    if per_dim:
        params = _GATED_TRITON
        state_kernel = functools.partial(_gated_state_kernel, on_keys=on_keys)
        output_kernel = functools.partial(_gated_output_kernel, sub=sub_chunk(chunk),
                                          on_keys=on_keys)
    else:
        params = _triton_params(dk, block_dv)
        state_kernel, output_kernel = _state_kernel, _output_kernel
    spec = lambda shape, index: pl.BlockSpec((None, None, *shape), index)  # noqa: E731

    def gates_spec():  # the row's gates; gates on value columns: this program's slice
        if not per_dim:
            return spec((padded,), lambda i, j, *rest: (i, j, 0))
        if on_keys:
            return spec((padded, dk), lambda i, j, *rest: (i, j, 0, 0))
        return spec((padded, block_dv), lambda i, j, *rest: (i, j, 0, rest[-1]))

    row_spec = pl.BlockSpec((None, padded), lambda i, *rest: (i, 0))
    states_shape = (batch, heads, num_chunks + 1, dk, dv)
    states_spec = spec((num_chunks + 1, dk, block_dv), lambda i, j, n: (i, j, 0, 0, n))
    args = [kh, vh, b, seg, initial_state]
    in_specs = [spec((padded, dk), lambda i, j, n: (i, j, 0, 0)),
                spec((padded, block_dv), lambda i, j, n: (i, j, 0, n)),
                gates_spec(), row_spec, spec((dk, block_dv), lambda i, j, n: (i, j, 0, n))]
    first = None
    if initial_outputs is not None:
        first = [jnp.broadcast_to(initial_outputs[1][:, :, None], states_shape)]
    args, in_specs, aliases = alias_initial_outputs(args, in_specs, [states_spec], first)
    name = ("chunked_linear_attention" if not per_dim else "gated_linear_attention"
            if on_keys else "gated_linear_attention_cols")
    states = pl.pallas_call(
        functools.partial(state_kernel, chunk=chunk, num_chunks=num_chunks),
        grid=(batch, heads, dv // block_dv), in_specs=in_specs, out_specs=states_spec,
        out_shape=jax.ShapeDtypeStruct(states_shape, jnp.float32),
        input_output_aliases=aliases, interpret=interpret, compiler_params=params,
        name=f"{name}_states")(*args)

    keys_spec = spec((chunk, dk), lambda i, j, c, n: (i, j, c, 0))  # q, k: whole rows
    out_spec = spec((chunk, block_dv), lambda i, j, c, n: (i, j, c, n))  # v, out: a slice
    args = [qh, kh, vh, b, seg, states]
    in_specs = [keys_spec, keys_spec, out_spec, gates_spec(), row_spec,
                spec((None, dk, block_dv), lambda i, j, c, n: (i, j, c, 0, n))]
    last = None if initial_outputs is None else initial_outputs[:1]
    args, in_specs, aliases = alias_initial_outputs(args, in_specs, [out_spec], last)
    out = pl.pallas_call(
        functools.partial(output_kernel, chunk=chunk),
        grid=(batch, heads, num_chunks, dv // block_dv), in_specs=in_specs,
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((batch, heads, padded, dv), out_dtype or qh.dtype),
        input_output_aliases=aliases, interpret=interpret, compiler_params=params,
        name=f"{name}_fwd")(*args)
    return out, states[:, :, num_chunks]


def kernel_segments(seg, chunk):
    """Segment indices (batch, length) int32 -> edge-padded to whole chunks."""
    pad = -seg.shape[1] % chunk
    return jnp.pad(seg, [(0, 0), (0, pad)], mode="edge") if pad else seg


def _forward_pallas(q, k, v, log_decay, initial_state, seg, chunk, interpret, on_keys=True,
                    out_dtype=None):
    """q, k (batch, length, heads, dk), v (..., dv), log_decay f32 (batch, length, heads)
    or, per dimension, (..., dk) gating state rows (`on_keys`) or (..., dv) gating its
    columns; initial_state (batch, heads, dk, dv) f32; seg (batch, length) int32 segment
    indices -> (out in `out_dtype`, default q's; final_state)."""
    qh, kh, vh, b = kernel_layout(q, k, v, log_decay, chunk)
    seg = kernel_segments(seg, chunk)
    out, state = _forward_call(qh, kh, vh, b, initial_state, chunk, interpret, seg=seg,
                               out_dtype=out_dtype, on_keys=on_keys)
    return jnp.moveaxis(out, 1, 2)[:, :q.shape[1]], state




# ----------------------------------------------------------------------------
# Pallas kernel for per-dimension gates (GLA).


def _gated_state_kernel(k_ref, v_ref, b_ref, seg_ref, s0_ref, *refs, chunk: int,
                        num_chunks: int, on_keys: bool):
    """The state pass with one gate per state row (`on_keys`: per key dimension, GLA's
    forward) or per state column (per value dimension: the backward's dq and dk passes),
    one (batch, head, value slice): walk the chunks, the state (dk, block_dv) in float32,
    writing the state entering each chunk (and, last, the final one). The float32 gated
    products are cast to the inputs' dtype for the dot."""
    states_ref = refs[-1]  # after the aliased initial states, if any
    dt = v_ref.dtype

    def body(c, state):
        start = c * chunk
        span = pl.ds(pl.multiple_of(start, chunk), chunk)
        states_ref[c] = state
        k, v = k_ref[span, :].astype(jnp.float32), v_ref[span, :].astype(jnp.float32)
        _, tail, kept = chunk_decays(b_ref, seg_ref, start, chunk)
        if on_keys:
            return kept.T * state + mm((k * tail).astype(dt), v.astype(dt), trans_a=True)
        return state * kept + mm(k.astype(dt), (v * tail).astype(dt), trans_a=True)

    states_ref[num_chunks] = jax.lax.fori_loop(0, num_chunks, body,
                                               s0_ref[...].astype(jnp.float32))


def _gated_output_kernel(q_ref, k_ref, v_ref, b_ref, seg_ref, state_ref, *refs, chunk: int,
                         sub: int, on_keys: bool):
    """The output pass with per-dimension gates, one (batch, head, chunk, value slice): q,
    k, v are the chunk's rows, b (the cumulative log gate inside each chunk) and seg the
    whole row's. Scores against earlier sub-chunks are factorised around r, b just before
    the query sub-chunk, so every exponent is <= 0; inside a sub-chunk one key at a time
    is taken directly. Scores across segments are masked, and the state entering the
    chunk reaches only the queries of its segment."""
    out_ref = refs[-1]  # after the aliased initial output, if any
    f32 = lambda a: a.astype(jnp.float32)
    dt = v_ref.dtype  # dots take the inputs' dtype (float32 products cast to it)
    low = lambda a: a.astype(dt)
    start = pl.program_id(2) * chunk
    positions = jnp.arange(chunk)[:, None]
    within = jnp.arange(sub)[:, None]
    dk = q_ref.shape[-1]
    kb = min(dk, _GATED_KEY_BLOCK)
    seg = seg_ref[pl.ds(start, chunk)][:, None]  # (chunk, 1)
    before = seg_ref[pl.ds(jnp.maximum(start - 1, 0), 1)][:, None]

    def on_key_slices(first):
        """Gates on keys: (the state's term, the scores against earlier sub-chunks), both
        sums over the key dimension, taken kb columns at a time."""
        out = scores = 0.0
        for lo in range(0, dk, kb):
            cols = pl.ds(lo, kb)
            q_s = f32(q_ref[pl.ds(first, sub), cols])
            b_s = b_ref[pl.ds(start + first, sub), cols]
            out = out + mm(low(q_s * jnp.exp(b_s)), low(state_ref[cols, :]))
            if first:
                r = b_ref[pl.ds(start + first - 1, 1), cols]
                decay = jnp.exp(jnp.where(positions < first,
                                          r - b_ref[pl.ds(start, chunk), cols], -jnp.inf))
                scores = scores + mm(low(q_s * jnp.exp(b_s - r)),
                                     low(f32(k_ref[:, cols]) * decay), trans_b=True)
        return out, scores

    for first in range(0, chunk, sub):  # static: chunk // sub sub-chunks
        q_i, b_i = f32(q_ref[pl.ds(first, sub), :]), b_ref[pl.ds(start + first, sub), :]
        seg_i = seg_ref[pl.ds(start + first, sub)][:, None]  # (sub, 1)
        same = seg_i == seg.T  # (sub, chunk)
        if on_keys:
            out, scores = on_key_slices(first)
            out = jnp.where(seg_i == before, out, 0.0)
            if first:
                out = out + mm(low(jnp.where(same, scores, 0.0)), v_ref[...])
        else:
            out = jnp.where(seg_i == before, jnp.exp(b_i) * mm(low(q_i), low(state_ref[...])),
                            0.0)
            if first:
                r = b_ref[pl.ds(start + first - 1, 1), :]
                decay = jnp.exp(jnp.where(positions < first,
                                          r - b_ref[pl.ds(start, chunk), :], -jnp.inf))
                scores = jnp.where((positions.T < first) & same,
                                   mm(low(q_i), k_ref[...], trans_b=True), 0.0)
                out = out + jnp.exp(b_i - r) * mm(low(scores), low(f32(v_ref[...]) * decay))

        def one_key(j, out, first=first, q_i=q_i, b_i=b_i, seg_i=seg_i):
            k_j, v_j = f32(k_ref[pl.ds(first + j, 1), :]), f32(v_ref[pl.ds(first + j, 1), :])
            b_j = b_ref[pl.ds(start + first + j, 1), :]
            seg_j = seg_ref[pl.ds(start + first + j, 1)][:, None]  # (1, 1)
            gate = jnp.exp(jnp.where((within >= j) & (seg_i == seg_j), b_i - b_j, -jnp.inf))
            if on_keys:
                return out + jnp.sum(q_i * k_j * gate, axis=1, keepdims=True) * v_j
            return out + jnp.sum(q_i * k_j, axis=1, keepdims=True) * v_j * gate

        out = jax.lax.fori_loop(0, sub, one_key, out)
        out_ref[pl.ds(first, sub), :] = out.astype(out_ref.dtype)


# ----------------------------------------------------------------------------
# custom_vjp: the backward reuses the forward kernel.


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _linear_attention_pallas(q, k, v, log_decay, initial_state, seg, chunk, interpret):
    return _forward_pallas(q, k, v, log_decay, initial_state, seg, chunk, interpret)


def _pallas_fwd(q, k, v, log_decay, initial_state, seg, chunk, interpret):
    out, state = _forward_pallas(q, k, v, log_decay, initial_state, seg, chunk, interpret)
    return (out, state), (q, k, v, log_decay, initial_state, seg, state)


def _pallas_bwd(chunk, interpret, residuals, cotangents):
    q, k, v, log_decay, initial_state, seg, final_state = residuals
    d_out, d_state = cotangents
    d_out = d_out.astype(q.dtype)  # the passes' dots in the inputs' dtype, as forward
    d_state = d_state.astype(jnp.float32)
    # Segment masks are symmetric, so the reversed passes take the reversed indices. The
    # passes store float32: the log decay's gradient sums q.dq - k.dk over the sequence.
    forward = functools.partial(_forward_pallas, chunk=chunk, interpret=interpret,
                                out_dtype=jnp.float32)
    run = lambda *a, **kw: forward(*a, seg, **kw)  # noqa: E731
    run_reversed = lambda *a, **kw: forward(*a, jnp.flip(seg, axis=1), **kw)  # noqa: E731
    f32 = lambda a: a.astype(jnp.float32)

    per_dim = log_decay.ndim == 4  # then the dq and dk passes gate their state's columns

    # dq_i = sum_{j<=i} decay(i, j) (dO_i . v_j) k_j + decay(i, start) dO_i S0^T:
    # the forward pass with (q, k, v) -> (dO, v, k) from S0^T.
    dq, _ = run(d_out, v, k, log_decay, jnp.swapaxes(initial_state, -1, -2),
                on_keys=not per_dim)

    # dk, dv: sums over i >= j, i.e. forward passes over the reversed sequence. The
    # decay between reversed positions uses g shifted by one (g'_t = g_{t+1}, g_T = 0),
    # and the reversed pass starts from the final state's cotangent.
    reverse = lambda a: jnp.flip(a, axis=1)
    shifted = jnp.concatenate([log_decay[:, 1:], jnp.zeros_like(log_decay[:, :1])], axis=1)
    g_rev = reverse(shifted)
    dk_rev, _ = run_reversed(reverse(v), reverse(d_out), reverse(q), g_rev,
                             jnp.swapaxes(d_state, -1, -2), on_keys=not per_dim)
    dv_rev, d_initial = run_reversed(reverse(k), reverse(q), reverse(d_out), g_rev, d_state)
    dk, dv = reverse(dk_rev), reverse(dv_rev)
    # The reversed pass decays the start state by everything but g_0.
    first_decay = jnp.exp(log_decay[:, 0])
    d_initial = (first_decay[..., None] if per_dim else first_decay[..., None, None]) * d_initial

    # With b_t = cumulative log decay, q_t enters scaled by exp(b_t) and k_t by
    # exp(-b_t), and the final state by exp(b_T): d b_t = q_t.dq_t - k_t.dk_t
    # (+ <dS_T, S_T> at the last step); d g_t = sum_{s >= t} d b_s. Per key
    # dimension the same holds elementwise, without the sum over dk.
    if per_dim:
        d_cumulative = f32(q) * dq - f32(k) * dk
        last = jnp.sum(d_state * final_state, axis=-1)
    else:
        d_cumulative = (jnp.einsum("blhk,blhk->blh", f32(q), dq)
                        - jnp.einsum("blhk,blhk->blh", f32(k), dk))
        last = jnp.sum(d_state * final_state, axis=(-2, -1))
    d_cumulative = d_cumulative.at[:, -1].add(last)
    d_log_decay = jnp.flip(jnp.cumsum(jnp.flip(d_cumulative, 1), axis=1), 1)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            d_log_decay.astype(log_decay.dtype), d_initial.astype(initial_state.dtype), None)


_linear_attention_pallas.defvjp(_pallas_fwd, _pallas_bwd)


# ----------------------------------------------------------------------------
# Public API.


def chunked_linear_attention(q, k, v, *, log_decay=None, initial_state=None, chunk: int = 64,
                             impl: str = "auto", interpret: bool | None = None,
                             segment_ids=None):
    """Causal (optionally decayed) linear attention. Returns (out, final_state).

    q, k: (batch, length, heads, dk); v: (batch, length, heads, dv);
    log_decay: per-step log decay g_t <= 0, (batch, length, heads) for one gate per
    head or (batch, length, heads, dk) for one per key dimension (GLA), None for no
    decay;
    initial_state: (batch, heads, dk, dv) (None: zeros); segment_ids: (batch, length)
    ints, the state restarting where they change (None: one segment; `xla` only, so
    under `auto` on a GPU they select `xla`). The state is float32; out
    has q's dtype. Any length works (padded to whole chunks).
    impl: `auto` (Pallas on GPU, XLA elsewhere), `xla` (chunked pure JAX) or
    `pallas` (interpreted unless on GPU, or as `interpret` says). Under `pallas`, dk and
    dv are zero-padded to `padded_head_dim` (a power of two, at least 16); compiled
    (not interpreted) it needs a chunk that is a power of two (`compiled_chunk_problem`,
    a ValueError otherwise).
    """
    check_inputs(q, k, v, log_decay, initial_state)
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {', '.join(_IMPLS)}; got {impl!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens; got {chunk}")
    on_gpu = jax.default_backend() == "gpu"
    if impl == "auto":
        impl = "pallas" if on_gpu else "xla"
    if impl == "xla":
        return linear_attention_chunked_xla(q, k, v, log_decay=log_decay,
                                            initial_state=initial_state, chunk=chunk,
                                            segment_ids=segment_ids)
    if interpret is None:
        interpret = not on_gpu
    reason = compiled_chunk_problem(chunk)
    if reason is not None and not interpret:
        raise ValueError(f"{reason}; use one, or impl='xla'")
    log_decay, initial_state = _defaults(q, v, log_decay, initial_state)
    if segment_ids is None:
        seg = jnp.zeros(q.shape[:2], jnp.int32)
    else:
        seg = segment_index(segment_ids)
    dk, dv = q.shape[-1], v.shape[-1]
    q, k, v, log_decay, initial_state = _pad_head_dims(q, k, v, log_decay, initial_state)
    out, state = _linear_attention_pallas(q, k, v, log_decay, initial_state, seg, chunk,
                                          interpret)
    return out[..., :dv], state[:, :, :dk, :dv]


def compiled_chunk_problem(chunk: int, name: str = "chunk") -> str | None:
    """Why the compiled (Triton) kernels cannot take chunks of `chunk` tokens, or None
    (`name`: how the message calls the setting).

    Triton's arrays have power-of-two sizes, so a chunk must be a power of two (1 to 256
    lower and compile for sm_90a through `efflm bench compile`'s toolchain; past 64 the
    state spills registers); interpret mode takes any chunk.
    """
    if chunk < 1 or chunk & (chunk - 1):
        powers = ", ".join(str(1 << n) for n in range(9))
        return (f"{name}={chunk}: the compiled Pallas (Triton) linear attention kernel "
                f"needs a power of two ({powers})")
    return None


def padded_head_dim(dim: int) -> int:
    """The head dim the Pallas path runs: the next power of two, at least 16 (Triton's
    arrays have power-of-two sizes)."""
    return max(16, 1 << (dim - 1).bit_length())


def _pad_head_dims(q, k, v, log_decay, initial_state):
    """Zero-pad dk and dv to `padded_head_dim`. Exact: padded key dimensions are zero in
    q and k (their gates are 0, i.e. no decay, on state rows that stay zero) and padded
    value columns are zero in v and the state; the caller slices them off."""
    dk, dv = q.shape[-1], v.shape[-1]
    dk_pad, dv_pad = padded_head_dim(dk) - dk, padded_head_dim(dv) - dv
    if not dk_pad and not dv_pad:
        return q, k, v, log_decay, initial_state
    last = lambda a, n: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, n)])  # noqa: E731
    if log_decay.ndim == 4:
        log_decay = last(log_decay, dk_pad)
    state = jnp.pad(initial_state, [(0, 0), (0, 0), (0, dk_pad), (0, dv_pad)])
    return last(q, dk_pad), last(k, dk_pad), last(v, dv_pad), log_decay, state
