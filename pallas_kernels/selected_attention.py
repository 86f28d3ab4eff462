"""NSA's selected branch in Pallas (Triton lowering), forward and backward: each query
attends to the tokens of the key blocks it selected, and the kernels read only those
blocks.

The selection is traced (it comes from the compressed branch's scores): `index`
(batch, length, kv_heads, n) block indices and `valid` (which of the n are taken); the
query heads of a GQA group share their K/V head's selection. Query i of K/V head g sees
key j when j's block (j // block_k, block_k the selection block) is one of its valid
selected blocks, j <= i, and both are in the same document (`segment_ids`).

Loop order. A program owns a block of `block_q` consecutive queries of one head (so a
Triton tile has at least 16 rows whatever the GQA group) and walks the union of its
queries' selected blocks in increasing order, masking each query to its own n: no
partial outputs to merge and an exact online softmax, at the cost of the union's
blocks that a given query did not pick (measured by `union_blocks`). The dK/dV kernel
walks the other way, as Flash Sparse Attention ("Flash Sparse Attention: An Alternative
Efficient Implementation of Native Sparse Attention Kernel") does for the whole
kernel: one program per key block of one K/V head loops over the query blocks whose
union holds it, summing over the group's heads. Both lists are built here from the
traced selection as tables (`selection_tables`): row r holds its count in column 0 and
its blocks after it, with a static width (the most a row can hold, rounded up to a
power of two).

`selected_reference` is the obviously-correct version: one full masked softmax in
float32 per K/V head.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from efflm.pallas_kernels.block_sparse_attention import (
    segment_args,
    sparse_dkv_kernel,
    sparse_dq_kernel,
    sparse_forward_kernel,
)
from efflm.pallas_kernels.flash_attention import (
    CallStatics,
    backward_calls,
    check_qkv,
    forward_call,
    forward_specs,
    next_power_of_2,
)


def _check_args(q, k, v, index, valid, segment_ids, select_block, block_q):
    check_qkv(q, k, v)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"queries and keys must have one length, got {q.shape[1]} and "
                         f"{k.shape[1]}")
    b, t, kv = k.shape[:3]
    if index.ndim != 4 or index.shape[:3] != (b, t, kv) or valid.shape != index.shape:
        raise ValueError(f"index and valid must be (batch, length, kv_heads, n) = "
                         f"({b}, {t}, {kv}, n); got {index.shape} and {valid.shape}")
    for name, blk in (("select_block", select_block), ("block_q", block_q)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids {segment_ids.shape} must be (batch, length) = {(b, t)}")


def selected_reference(q, k, v, index, valid, *, select_block, segment_ids=None,
                       sm_scale=None):
    """Full masked softmax in float32 over the selected tokens: what
    `selected_attention` must equal (same arguments). Rows that see no key give 0."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    scale = d ** -0.5 if sm_scale is None else sm_scale
    key_block = jnp.arange(t) // select_block
    chosen = jnp.any((index[..., None] == key_block) & valid[..., None], axis=3)  # b t kv s
    idx = jnp.arange(t)
    mask = chosen.transpose(0, 2, 1, 3) & (idx[:, None] >= idx[None, :])  # b kv t s
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    qg = (q.astype(jnp.float32) * scale).reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32))
    m = mask[:, :, None]
    scores = jnp.where(m, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.where(m, jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
    return out.reshape(b, t, h, d)


# ---------------------------------------------------------------------------------------
# Tables.


def _compact(member, limit: int):
    """(..., n) bool -> (..., width) int32: [count, indices of the True columns in
    increasing order, zeros]; width = next power of two above `limit`, the most Trues a
    row can have."""
    width = next_power_of_2(limit + 1)
    n = member.shape[-1]
    slot = jnp.where(member, jnp.cumsum(member, axis=-1, dtype=jnp.int32), width)
    lead = jnp.indices(member.shape[:-1], sparse=True)
    table = jnp.zeros((*member.shape[:-1], width), jnp.int32)
    table = table.at[(*(i[..., None] for i in lead), slot)].set(
        jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), member.shape), mode="drop")
    return table.at[..., 0].set(jnp.sum(member, axis=-1, dtype=jnp.int32))


def selection_tables(rows, num_key_blocks: int, block_q: int):
    """From `rows` (batch, kv_heads, length, n) int32 — each query's selected blocks, -1
    for none; length a multiple of block_q — the tables the kernels walk:
    q_table (batch, kv_heads, query blocks, width) with each query block's union of
    blocks, and k_table (batch, kv_heads, key blocks, width) with the query blocks
    whose union holds each key block."""
    b, kv, length, n = rows.shape
    nq = length // block_q
    block_of_query = (jnp.arange(length) // block_q)[None, None, :, None]
    column = jnp.where(rows >= 0, rows, num_key_blocks)  # -1 -> a column dropped below
    member = jnp.zeros((b, kv, nq, num_key_blocks + 1), bool)
    member = member.at[jnp.arange(b)[:, None, None, None], jnp.arange(kv)[None, :, None, None],
                       block_of_query, column].set(True)[..., :num_key_blocks]
    q_table = _compact(member, min(num_key_blocks, block_q * n))
    k_table = _compact(jnp.swapaxes(member, -1, -2), nq)
    return q_table, k_table


def union_blocks(index, valid, select_block: int, block_q: int) -> jax.Array:
    """The mean number of key blocks a query block of `block_q` queries walks (its
    queries' union), over (batch, kv head, query block): the forward and dQ kernels'
    tiles per query block, against n for one query."""
    rows, length = _rows(index, valid, max(block_q, select_block))
    q_table, _ = selection_tables(rows, length // select_block, block_q)
    return jnp.mean(q_table[..., 0].astype(jnp.float32))


def _rows(index, valid, block_q: int):
    """`index` as (batch, kv_heads, length padded to block_q, n padded to a power of two)
    with -1 where not valid; and the padded length."""
    t, n = index.shape[1], index.shape[3]
    length = -(-t // block_q) * block_q
    rows = jnp.where(valid, index, -1).astype(jnp.int32).transpose(0, 2, 1, 3)
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, length - t), (0, next_power_of_2(n) - n)),
                   constant_values=-1)
    return rows, length


# ---------------------------------------------------------------------------------------
# Kernels: the block-sparse kernels, each query masked to its own blocks (`has_rows`).


def _per_query_block(s: CallStatics, group: int, q_table, rows):
    """(array, BlockSpec) of the q table and the selection rows for a grid (query block,
    batch, head)."""
    return [(q_table, pl.BlockSpec((None, None, None, q_table.shape[-1]),
                                   lambda i, bi, hi: (bi, hi // group, i, 0))),
            (rows, pl.BlockSpec((None, None, s.block_q, rows.shape[-1]),
                                lambda i, bi, hi: (bi, hi // group, i, 0)))]


def _forward(q, k, v, q_seg, k_seg, rows, q_table, s: CallStatics, initial_outputs=None):
    h, d = q.shape[2:]
    group = h // k.shape[2]
    has_segments = q_seg is not None
    lead = _per_query_block(s, group, q_table, rows)
    return forward_call(functools.partial(sparse_forward_kernel, s=s,
                                          has_segments=has_segments, has_rows=True),
                        q, [*(a for a, _ in lead), q, k, v, *segment_args(q_seg, k_seg)],
                        [*(spec for _, spec in lead),
                         *forward_specs(s, d, k.shape[1], group, has_segments)],
                        s, "nsa_selected_attention_forward", initial_outputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _selected(q, k, v, q_seg, k_seg, rows, q_table, s: CallStatics):
    return _forward(q, k, v, q_seg, k_seg, rows, q_table, s)[0]


def _selected_fwd(q, k, v, q_seg, k_seg, rows, q_table, s: CallStatics):
    out, lse = _forward(q, k, v, q_seg, k_seg, rows, q_table, s)
    return out, (q, k, v, q_seg, k_seg, rows, q_table, out, lse)


def _selected_bwd(s: CallStatics, residuals, do):
    q, k, v, q_seg, k_seg, rows, q_table, out, lse = residuals
    # Built again rather than kept from the forward: (key blocks x query blocks) per
    # batch row and K/V head grows with the square of the length.
    k_table = selection_tables(rows, q.shape[1] // s.block_k, s.block_q)[1]
    group = q.shape[2] // k.shape[2]
    has_segments = q_seg is not None
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    length = q.shape[1]
    dkv_lead = [(k_table, pl.BlockSpec((None, None, None, k_table.shape[-1]),
                                       lambda j, bi, ki: (bi, ki, j, 0))),
                (rows, pl.BlockSpec((None, None, length, rows.shape[-1]),
                                    lambda j, bi, ki: (bi, ki, 0, 0)))]
    dq, dk, dv = backward_calls(
        functools.partial(sparse_dkv_kernel, s=s, group=group, has_segments=has_segments,
                          has_rows=True),
        functools.partial(sparse_dq_kernel, s=s, has_segments=has_segments, has_rows=True),
        q, k, v, [do.astype(q.dtype), lse, delta, *segment_args(q_seg, k_seg)], s,
        "nsa_selected_attention", dkv_lead=dkv_lead,
        dq_lead=_per_query_block(s, group, q_table, rows))
    return dq, dk, dv, None, None, None, None


_selected.defvjp(_selected_fwd, _selected_bwd)


def selected_attention(q, k, v, index, valid, *, select_block, segment_ids=None, block_q=64,
                       sm_scale=None, interpret=None):
    """NSA's selected branch, reading only the selected key blocks.

    q: (batch, length, heads, head_dim); k, v: (batch, length, kv_heads, head_dim), heads a
    multiple of kv_heads. index, valid: (batch, length, kv_heads, n) int and bool, the
    blocks of `select_block` tokens each query selected (traced). segment_ids (batch,
    length) or None. select_block and block_q (queries per program) powers of two >= 16;
    the length need not divide them, head_dim is zero-padded to a power of two. Returns
    the output in q.dtype; rows that see no key give 0. Differentiable in q, k, v.
    interpret=None: interpret mode unless the default backend is GPU.
    """
    _check_args(q, k, v, index, valid, segment_ids, select_block, block_q)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    b, t, h, d = q.shape
    # One padded length for queries and keys: whole query blocks and whole key blocks.
    unit = max(block_q, select_block)
    rows, length = _rows(index, valid, unit)
    q_table = selection_tables(rows, length // select_block, block_q)[0]
    d_pad = max(16, next_power_of_2(d))

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, length - t), (0, 0), (0, d_pad - d)))

    q_seg = k_seg = None
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        q_seg = jnp.pad(seg, ((0, 0), (0, length - t)), constant_values=-1)
        k_seg = jnp.pad(seg, ((0, 0), (0, length - t)), constant_values=-2)
    s = CallStatics(causal=True, window=0,
                    sm_scale=d ** -0.5 if sm_scale is None else float(sm_scale),
                    block_q=block_q, block_k=select_block, q_len=t, kv_len=t,
                    interpret=bool(interpret))
    out = _selected(pad(q), pad(k), pad(v), q_seg, k_seg, rows, q_table, s)
    return out[:, :t, :, :d]
