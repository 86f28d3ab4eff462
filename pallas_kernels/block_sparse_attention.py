"""Block-sparse flash attention in Pallas (Triton lowering), forward and backward.

A static boolean `block_mask` (num_q_blocks, num_k_blocks), shared over batch and heads,
says which (query block, key block) tiles are computed. Inside a computed tile the usual
causal / segment masking still applies; tiles outside the mask are never visited. The
wrapper turns the mask into per-query-block lists of key blocks (and, for the dK/dV
kernel, per-key-block lists of query blocks): row i of a table holds its count in
column 0 and its block indices in columns 1..count (padding after), so each program
loops only over its own listed blocks and the work scales with the number of computed
tiles.

The kernels follow `flash_attention` (FlashAttention-2: online softmax forward, dK/dV
kernel per key block summing over the query heads of a GQA group, dQ kernel per query
block). Query rows that see no key at all (no listed block, or every key in the listed
blocks masked) give 0 and no gradient.

Mask builders: `sliding_block_mask` (a band of key blocks ending at the diagonal) and
`power_block_mask` (PowerAttention: key blocks at power-of-two distances behind the
query's diagonal block, plus the diagonal).

`reference_block_sparse_attention` expands the block mask to a token mask and does one
full masked softmax in float32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from efflm.pallas_kernels.flash_attention import (
    CallStatics,
    backward_calls,
    check_qkv,
    dkv_step,
    dq_step,
    forward_call,
    forward_specs,
    forward_step,
    next_power_of_2,
    store_rows,
)

# ---------------------------------------------------------------------------------------
# Masks.


def _num_blocks(length: int, block: int) -> int:
    return -(-length // block)


def _diagonal_blocks(q_len, kv_len, block_q, block_k):
    """For each query block, the key block holding its last query's position."""
    nq, nk = _num_blocks(q_len, block_q), _num_blocks(kv_len, block_k)
    last = np.minimum(np.arange(nq) * block_q + block_q - 1, q_len - 1)
    return np.minimum(last // block_k, nk - 1), nq, nk


def sliding_block_mask(q_len: int, *, block_q: int, block_k: int, window_blocks: int,
                       kv_len: int | None = None) -> np.ndarray:
    """Query block i sees the `window_blocks` key blocks ending at its diagonal block."""
    if window_blocks < 1:
        raise ValueError(f"window_blocks must be >= 1, got {window_blocks}")
    kv_len = q_len if kv_len is None else kv_len
    diag, nq, nk = _diagonal_blocks(q_len, kv_len, block_q, block_k)
    kb = np.arange(nk)[None, :]
    return (kb <= diag[:, None]) & (kb > diag[:, None] - window_blocks)


def power_block_mask(q_len: int, *, block_q: int, block_k: int,
                     kv_len: int | None = None) -> np.ndarray:
    """Query block i sees its diagonal key block and those 1, 2, 4, 8, ... blocks behind."""
    kv_len = q_len if kv_len is None else kv_len
    diag, nq, nk = _diagonal_blocks(q_len, kv_len, block_q, block_k)
    mask = np.zeros((nq, nk), bool)
    for i, dblock in enumerate(diag):
        mask[i, dblock] = True
        dist = 1
        while dblock - dist >= 0:
            mask[i, dblock - dist] = True
            dist *= 2
    return mask


def _visible_blocks(block_mask, q_len, kv_len, block_q, block_k, causal):
    """The block mask less tiles that causality hides entirely (or that are all padding)."""
    nq, nk = _num_blocks(q_len, block_q), _num_blocks(kv_len, block_k)
    mask = np.asarray(block_mask, bool)
    if mask.shape != (nq, nk):
        raise ValueError(f"block_mask has shape {mask.shape}; lengths {q_len}, {kv_len} with "
                         f"blocks {block_q}, {block_k} need ({nq}, {nk})")
    if causal:
        last_query = np.minimum(np.arange(nq) * block_q + block_q - 1, q_len - 1)
        first_key = np.arange(nk) * block_k
        mask = mask & (first_key[None, :] <= last_query[:, None])
    return mask


def _block_table(mask: np.ndarray) -> np.ndarray:
    """Row r: [count, indices of True columns..., padding]; width a power of two."""
    counts = mask.sum(axis=1)
    width = next_power_of_2(int(counts.max(initial=0)) + 1)
    table = np.zeros((mask.shape[0], width), np.int32)
    for r, row in enumerate(mask):
        cols = np.flatnonzero(row)
        table[r, 0] = len(cols)
        table[r, 1:1 + len(cols)] = cols
    return table


# ---------------------------------------------------------------------------------------
# Reference.


def reference_block_sparse_attention(q, k, v, block_mask, *, block_q, block_k,
                                     segment_ids=None, causal=True, sm_scale=None,
                                     interpret=None):
    """Full masked softmax in float32 over the token mask the block mask expands to.

    Rows with no visible key give 0. Same arguments as `block_sparse_attention`.
    """
    del interpret
    _check_args(q, k, v, segment_ids, block_q, block_k)
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if sm_scale is None else sm_scale
    blocks = jnp.asarray(np.asarray(block_mask, bool))
    if blocks.shape != (_num_blocks(t, block_q), _num_blocks(s, block_k)):
        raise ValueError(f"block_mask has shape {blocks.shape}, expected "
                         f"{(_num_blocks(t, block_q), _num_blocks(s, block_k))}")
    qi, kj = jnp.arange(t)[:, None], jnp.arange(s)[None, :]
    mask = blocks[qi // block_q, kj // block_k]
    if causal:
        mask = mask & (qi >= kj)
    mask = jnp.broadcast_to(mask[None], (b, t, s))
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    qg = (q.astype(jnp.float32) * scale).reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32))
    m = mask[:, None, None]
    scores = jnp.where(m, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(m, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
    return out.reshape(b, t, h, d).astype(q.dtype)


def _check_args(q, k, v, segment_ids, block_q, block_k):
    check_qkv(q, k, v)
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk}")
    if segment_ids is not None:
        if segment_ids.shape != q.shape[:2] or q.shape[1] != k.shape[1]:
            raise ValueError(f"segment_ids {segment_ids.shape} must be (batch, length) "
                             f"= {q.shape[:2]}, with queries and keys of one length")


# ---------------------------------------------------------------------------------------
# Forward.


def reading(rows, block):
    """(block_q,) bool: which queries, given their selected blocks `rows` (block_q, n),
    read key block `block` (a traced table: `pallas_kernels/selected_attention.py`)."""
    return jnp.max((rows == block).astype(jnp.int32), axis=1) > 0


def _split_rows(refs, has_rows: bool):
    """(the queries' selected-blocks ref or None, the remaining refs)."""
    return (refs[0], refs[1:]) if has_rows else (None, refs)


def sparse_forward_kernel(table_ref, *refs, s: CallStatics, has_segments: bool,
                          has_rows: bool = False):
    """One query block of one head over the key blocks its table row lists; with
    `has_rows`, a ref of each query's own blocks follows the table and masks each query
    to them."""
    rows_ref, (q_ref, k_ref, v_ref, *rest) = _split_rows(refs, has_rows)
    o_ref, lse_ref = rest[-2:]  # after the aliased initial outputs, if any
    q_seg_ref, k_seg_ref = rest[:2] if has_segments else (None, None)
    q = q_ref[...]
    rows = rows_ref[...] if has_rows else None
    q_seg = q_seg_ref[...] if has_segments else None
    q_first = pl.program_id(0) * s.block_q

    def body(j, carry):
        block = table_ref[j + 1]
        return forward_step(s, q, q_first, q_seg, k_ref, v_ref, k_seg_ref, block * s.block_k,
                            carry, None if rows is None else reading(rows, block))

    acc = jnp.zeros(q.shape, jnp.float32)
    row_max = jnp.full((s.block_q,), -jnp.inf, jnp.float32)
    row_sum = jnp.zeros((s.block_q,), jnp.float32)
    acc, row_max, row_sum = lax.fori_loop(0, table_ref[0], body, (acc, row_max, row_sum))
    store_rows(o_ref, lse_ref, acc, row_max, row_sum)


def segment_args(q_seg, k_seg):
    return () if q_seg is None else (q_seg, k_seg)


def _forward(q, k, v, q_seg, k_seg, q_table, s: CallStatics, initial_outputs=None):
    h, d = q.shape[2:]
    kv_len, kv = k.shape[1], k.shape[2]
    has_segments = q_seg is not None
    return forward_call(functools.partial(sparse_forward_kernel, s=s,
                                          has_segments=has_segments),
                        q, [q_table, q, k, v, *segment_args(q_seg, k_seg)],
                        [_table_row(q_table)[1],
                         *forward_specs(s, d, kv_len, h // kv, has_segments)],
                        s, "block_sparse_attention_forward", initial_outputs)


# ---------------------------------------------------------------------------------------
# Backward.


def sparse_dkv_kernel(table_ref, *refs, s: CallStatics, group: int, has_segments: bool,
                      has_rows: bool = False):
    """One key block of one K/V head: dK, dV over its listed query blocks and heads (the
    heads outside the loop over blocks: inside, Triton keeps every head's tiles live);
    with `has_rows`, each query counts only if it selected this block."""
    rows_ref, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest) = _split_rows(
        refs, has_rows)
    if has_segments:
        q_seg_ref, k_seg_ref, dk_ref, dv_ref = rest
    else:
        (dk_ref, dv_ref), q_seg_ref, k_seg_ref = rest, None, None
    k, v = k_ref[...], v_ref[...]
    k_seg = k_seg_ref[...] if has_segments else None
    k_block = pl.program_id(0)
    k_first = k_block * s.block_k
    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for g in range(group):

        def body(j, carry, g=g):
            q_first = table_ref[j + 1] * s.block_q
            chosen = None if rows_ref is None else reading(
                rows_ref[pl.ds(q_first, s.block_q), :], k_block)
            return dkv_step(s, g, q_ref, do_ref, lse_ref, delta_ref, q_seg_ref, k, v, k_seg,
                            k_first, q_first, carry, chosen)

        carry = lax.fori_loop(0, table_ref[0], body, carry)
    dk, dv = carry
    dk_ref[...] = (dk * s.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def sparse_dq_kernel(table_ref, *refs, s: CallStatics, has_segments: bool,
                     has_rows: bool = False):
    """One query block of one head: dQ over its listed key blocks (`has_rows`: as
    `sparse_forward_kernel`)."""
    rows_ref, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest) = _split_rows(
        refs, has_rows)
    if has_segments:
        q_seg_ref, k_seg_ref, dq_ref = rest
    else:
        (dq_ref,), q_seg_ref, k_seg_ref = rest, None, None
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    rows = rows_ref[...] if has_rows else None
    q_seg = q_seg_ref[...] if has_segments else None
    q_first = pl.program_id(0) * s.block_q

    def body(j, dq):
        block = table_ref[j + 1]
        return dq_step(s, q, do, lse, delta, q_first, q_seg, k_ref, v_ref, k_seg_ref,
                       block * s.block_k, dq, None if rows is None else reading(rows, block))

    dq = lax.fori_loop(0, table_ref[0], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * s.sm_scale).astype(dq_ref.dtype)


def _backward(q, k, v, q_seg, k_seg, q_table, k_table, do, lse, delta, s: CallStatics):
    has_segments = q_seg is not None
    group = q.shape[2] // k.shape[2]
    return backward_calls(
        functools.partial(sparse_dkv_kernel, s=s, group=group, has_segments=has_segments),
        functools.partial(sparse_dq_kernel, s=s, has_segments=has_segments),
        q, k, v, [do, lse, delta, *segment_args(q_seg, k_seg)], s,
        "block_sparse_attention", dkv_lead=[_table_row(k_table)], dq_lead=[_table_row(q_table)])


def _table_row(table):
    """A block table and its BlockSpec: row n for the program of block n."""
    return table, pl.BlockSpec((None, table.shape[1]), lambda n, bi, hi: (n, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _sparse(q, k, v, q_seg, k_seg, q_table, k_table, s: CallStatics):
    return _forward(q, k, v, q_seg, k_seg, q_table, s)


def _sparse_fwd(q, k, v, q_seg, k_seg, q_table, k_table, s: CallStatics):
    out, lse = _forward(q, k, v, q_seg, k_seg, q_table, s)
    return (out, lse), (q, k, v, q_seg, k_seg, q_table, k_table, out, lse)


def _sparse_bwd(s: CallStatics, residuals, cotangents):
    q, k, v, q_seg, k_seg, q_table, k_table, out, lse = residuals
    do, dlse = cotangents
    # A cotangent on the lse subtracts from delta, as in `flash_attention`.
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    delta = delta - dlse
    dq, dk, dv = _backward(q, k, v, q_seg, k_seg, q_table, k_table, do.astype(q.dtype), lse,
                           delta, s)
    return dq, dk, dv, None, None, None, None


_sparse.defvjp(_sparse_fwd, _sparse_bwd)


def block_sparse_attention(q, k, v, block_mask, *, block_q, block_k, segment_ids=None,
                           causal=True, sm_scale=None, interpret=None, return_lse=False):
    """Softmax attention computed only on the (query block, key block) tiles of a mask.

    q: (batch, length, heads, head_dim); k, v: (batch, kv_length, kv_heads, head_dim),
    heads a multiple of kv_heads (query head n reads K/V head n // (heads // kv_heads)).
    block_mask: concrete bool (ceil(length / block_q), ceil(kv_length / block_k)), shared
    over batch and heads; block_q, block_k powers of two >= 16. Inside computed tiles,
    causal (query i sees keys j <= i) and segment_ids (batch, length; needs length ==
    kv_length) masking still apply. Rows that see no key give 0. Lengths need not divide
    the blocks; head_dim is zero-padded to a power of two. sm_scale defaults to
    head_dim ** -0.5; interpret=None: interpret mode unless the default backend is GPU.
    With return_lse, also the log-sum-exp of the scaled, masked scores (batch, heads,
    length) float32 (+inf for a row that sees no key). Differentiable in q, k, v.
    """
    _check_args(q, k, v, segment_ids, block_q, block_k)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    b, t, h, d = q.shape
    kv_len = k.shape[1]
    visible = _visible_blocks(block_mask, t, kv_len, block_q, block_k, causal)
    q_table, k_table = _block_table(visible), _block_table(visible.T)
    nq, nk = visible.shape
    t_pad, kv_pad = nq * block_q, nk * block_k
    d_pad = max(16, next_power_of_2(d))

    def pad(x, length):
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, d_pad - d)))

    q_seg = k_seg = None
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        q_seg = jnp.pad(seg, ((0, 0), (0, t_pad - t)), constant_values=-1)
        k_seg = jnp.pad(seg, ((0, 0), (0, kv_pad - kv_len)), constant_values=-2)
    s = CallStatics(causal=bool(causal), window=0,
                sm_scale=d ** -0.5 if sm_scale is None else float(sm_scale),
                block_q=block_q, block_k=block_k, q_len=t, kv_len=kv_len,
                interpret=bool(interpret))
    out, lse = _sparse(pad(q, t_pad), pad(k, kv_pad), pad(v, kv_pad), q_seg, k_seg,
                       jnp.asarray(q_table), jnp.asarray(k_table), s)
    out, lse = out[:, :t, :, :d], lse[:, :, :t]
    return (out, lse) if return_lse else out
