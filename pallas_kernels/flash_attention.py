"""Flash attention in Pallas (Triton lowering), forward and backward, beside its reference.

Implements "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning": each program owns one block of queries of one head and walks the key
blocks with an online softmax (running max and sum in float32), so the (length, length)
score matrix never exists in memory. The backward pass recomputes the probabilities
from the saved log-sum-exp: one kernel per key block accumulates dK and dV over query
blocks (summing over the query heads that share a K/V head), one per query block
accumulates dQ over key blocks.

Masks: causal, a sliding window and packed-sequence segment ids. Queries are aligned
to the last keys (bottom-right): with q_len queries and kv_len keys, query i sits at
position i + kv_len - q_len, so a short query block (prefill after a cache, decoding)
is the end of the sequence. Causal: query i sees keys j <= its position; a window
(`window` > 0) keeps only keys position - window + 1 .. position. A query whose
position is negative (q_len > kv_len) sees no key: rows that see no key give 0 with a
log-sum-exp of +inf, and no gradient. Key blocks that a mask hides entirely are skipped
by the loop bounds, not visited and masked.

`reference_attention` is the obviously-correct version: one full masked softmax in
float32. Tests compare the two on values and gradients.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from efflm.mesh import mesh_axes_of
from efflm.pallas_kernels.common import alias_initial_outputs, mm

# Lower GPU calls through Triton (jax's default for GPU pallas_call is Mosaic GPU).
_TRITON = plgpu.CompilerParams(num_warps=4, num_stages=2)
_EIGHT_WARPS = plgpu.CompilerParams(num_warps=8, num_stages=2)


def dkv_params(head_dim: int):
    """The dK/dV kernel keeps two (block_k x head_dim) float32 accumulators live: at head
    dim 128, 4 warps spill registers on sm_90 (`efflm bench compile`), 8 do not."""
    return _TRITON if head_dim < 128 else _EIGHT_WARPS


def dq_params(head_dim: int, dtype):
    """The dQ kernel: with float32 inputs at head dim 128, 4 warps spill on sm_90, 8 do
    not; in 2-byte dtypes 4 do not."""
    return _EIGHT_WARPS if head_dim >= 128 and jnp.dtype(dtype).itemsize >= 4 else _TRITON


def default_blocks(dtype) -> tuple[int, int]:
    """(block_q, block_k) of `flash_attention` when not given: 64 x 64 for 2-byte inputs;
    64 x 32 for float32, whose tiles take twice the registers (at 64 x 64 its backward
    kernels spill on sm_90 from head dim 64 on; at 64 x 32 none does up to 128,
    `efflm bench compile --dtype float32`)."""
    return (64, 32) if jnp.dtype(dtype).itemsize >= 4 else (64, 64)

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
# A row whose running max stayed at or below this saw only masked scores.
_EMPTY_BELOW = 0.5 * _MASKED


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _full_mask(segment_ids, q_len: int, kv_len: int, causal: bool, window: int,
               kv_segment_ids=None):
    """Boolean mask (batch or 1, 1, q_len, kv_len); query i sits at position
    i + kv_len - q_len (aligned to the last keys), keys at 0 .. kv_len - 1."""
    q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    k_idx = jnp.arange(kv_len)[None, :]
    allowed = jnp.ones((q_len, kv_len), bool)
    if causal:
        allowed = q_pos >= k_idx
    if window:
        allowed = allowed & (q_pos - k_idx < window)
    mask = allowed[None, None]
    if segment_ids is not None:
        kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
        same = segment_ids[:, :, None] == kv_seg[:, None, :]
        mask = mask & same[:, None]
    return mask


def reference_attention(q, k, v, *, segment_ids=None, kv_segment_ids=None, causal=True,
                        window=0, sm_scale=None, block_q=None, block_k=None, interpret=None,
                        return_lse=False):
    """Full masked softmax attention in float32: what `flash_attention` must equal.

    Same arguments and masks as `flash_attention` (the block sizes and `interpret` are
    ignored): queries aligned to the last keys, rows that see no key give 0 with a
    log-sum-exp of +inf and no gradient. Returns the output in q.dtype, and with
    `return_lse` also the log-sum-exp of the masked, scaled scores, (batch, heads,
    length) float32.
    """
    del block_q, block_k, interpret
    _check_args(q, k, v, segment_ids, causal, window, kv_segment_ids)
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if sm_scale is None else sm_scale
    mask = _full_mask(segment_ids, t, s, causal, window, kv_segment_ids)
    mask = mask[:, :, None]  # (b|1, 1, 1, t, s)
    qg = (q.astype(jnp.float32) * scale).reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32))
    # A finite fill keeps every exponent finite, so an empty row's zero probabilities
    # (and log-sum-exp, replaced by +inf below) pass back zero gradient, not NaN.
    scores = jnp.where(mask, scores, _MASKED)
    lse = jax.nn.logsumexp(scores, axis=-1)
    probs = jnp.where(mask, jnp.exp(scores - lse[..., None]), 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32))
    out = out.reshape(b, t, h, d).astype(q.dtype)
    if not return_lse:
        return out
    empty = ~jnp.any(mask, axis=-1)
    lse = jnp.where(empty, jnp.inf, lse).reshape(b, h, t)
    return out, lse


def check_qkv(q, k, v):
    """Shapes of grouped-query attention operands."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (batch, length, heads, dim) and k, v (batch, kv_length, "
                         f"kv_heads, dim) of one shape; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} differ in batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]})")


def _check_args(q, k, v, segment_ids, causal, window, kv_segment_ids=None):
    check_qkv(q, k, v)
    if window < 0:
        raise ValueError(f"window must be >= 0 (0: no window), got {window}")
    if window and not causal:
        raise ValueError("a sliding window needs causal=True (query i sees keys "
                         "i - window + 1 .. i)")
    if kv_segment_ids is not None:
        if segment_ids is None or kv_segment_ids.shape != k.shape[:2]:
            raise ValueError(f"kv_segment_ids {kv_segment_ids.shape} must be (batch, "
                             f"kv_length) = {k.shape[:2]}, with segment_ids given")
        if segment_ids.shape != q.shape[:2]:
            raise ValueError(f"segment_ids {segment_ids.shape} must be (batch, length) "
                             f"= {q.shape[:2]}")
    elif segment_ids is not None:
        if segment_ids.shape != q.shape[:2] or q.shape[1] != k.shape[1]:
            raise ValueError(f"segment_ids {segment_ids.shape} must be (batch, length) "
                             f"= {q.shape[:2]}, with queries and keys of one length "
                             "(or kv_segment_ids for the keys)")


SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
MAX_HEAD_DIM = 256


def unsupported_reason(head_dim: int, dtype) -> str | None:
    """Why `flash_attention` does not take this head_dim / dtype, or None if it does.

    head_dim: a multiple of 16 up to 256 (tensor-core tiles; larger tiles do not fit in
    shared memory); dtype: float32, bfloat16 or float16.
    """
    if head_dim % 16 or not 16 <= head_dim <= MAX_HEAD_DIM:
        return (f"head_dim {head_dim} is not supported by the Pallas flash attention "
                f"kernel (needs a multiple of 16 between 16 and {MAX_HEAD_DIM})")
    if jnp.dtype(dtype).name not in SUPPORTED_DTYPES:
        return (f"dtype {jnp.dtype(dtype).name} is not supported by the Pallas flash "
                f"attention kernel (needs one of {', '.join(SUPPORTED_DTYPES)})")
    return None


@dataclasses.dataclass(frozen=True)
class CallStatics:
    """Everything about one call that is known at trace time."""

    causal: bool
    window: int
    sm_scale: float
    block_q: int
    block_k: int
    q_len: int  # before padding
    kv_len: int
    interpret: bool
    # Position of query 0 among the keys: kv_len - q_len for flash attention (queries
    # aligned to the last keys); 0 counts queries and keys both from 0.
    q_offset: int = 0


# ---------------------------------------------------------------------------------------
# Shared pieces of the kernels.


def _first_block_after(position, block: int):
    """Index of the block holding `position` plus one, 0 for a negative position."""
    return jnp.where(position < 0, 0, lax.div(jnp.maximum(position, 0), block) + 1)


def _key_block_range(s: CallStatics, q_block, num_k_blocks):
    """Key blocks [lo, hi) that queries q_block*block_q .. + block_q can see (hi <= lo:
    none)."""
    q_first = q_block * s.block_q + s.q_offset  # the block's first query position
    hi = num_k_blocks
    if s.causal:
        hi = jnp.minimum(_first_block_after(q_first + s.block_q - 1, s.block_k),
                         num_k_blocks)
    lo = 0
    if s.window:
        lo = lax.div(jnp.maximum(q_first - s.window + 1, 0), s.block_k)
    return lo, hi


def _query_block_range(s: CallStatics, k_block, num_q_blocks):
    """Query blocks [lo, hi) that can see keys k_block*block_k .. + block_k (hi <= lo:
    none)."""
    k_first = k_block * s.block_k - s.q_offset  # as a query index
    lo = 0
    if s.causal:
        lo = lax.div(jnp.maximum(k_first, 0), s.block_q)
    hi = num_q_blocks
    if s.window:
        last_query = k_first + s.block_k - 1 + s.window - 1
        hi = jnp.minimum(_first_block_after(last_query, s.block_q), num_q_blocks)
    return lo, hi


def tile_is_full(s: CallStatics, q_first, k_first, q_seg, k_seg, rows=None):
    """Whether no score of the tile (block_q queries from q_first, block_k keys from
    k_first) is masked, as a traced bool: keys before every query (causal), inside every
    query's window, none padded, one segment throughout, every row reading the block.
    Found from the block's ends and its ids' extremes, so a full tile costs O(block),
    not the O(block_q x block_k) of building the mask. Python's True where no mask
    applies to any tile."""
    q_lo = q_first + s.q_offset
    k_hi = k_first + s.block_k - 1
    full = True
    if s.causal:
        full = full & (k_hi <= q_lo)
    if s.window:
        full = full & (q_lo + s.block_q - 1 - k_first < s.window)
    if s.kv_len % s.block_k:
        full = full & (k_hi < s.kv_len)
    if q_seg is not None:
        q_min, k_min = jnp.min(q_seg), jnp.min(k_seg)
        full = full & (q_min == jnp.max(q_seg)) & (k_min == jnp.max(k_seg)) & (q_min == k_min)
    if rows is not None:
        full = full & (jnp.min(rows.astype(jnp.int32)) == 1)
    return full


def _scores(s: CallStatics, q, k, q_first, k_first, q_seg, k_seg, rows=None):
    """Scaled, masked scores (block_q, block_k) in float32; `rows` (block_q,) bool, when
    given, masks whole query rows (those that do not read this key block). A tile that
    `tile_is_full` skips building the mask."""
    scores = mm(q, k, trans_b=True) * s.sm_scale
    full = tile_is_full(s, q_first, k_first, q_seg, k_seg, rows)
    if full is True:
        return scores

    def masked(scores):
        q_idx = q_first + s.q_offset + jnp.arange(q.shape[0])[:, None]
        k_idx = k_first + jnp.arange(k.shape[0])[None, :]
        mask = jnp.ones(scores.shape, bool)
        if s.causal:
            mask = mask & (q_idx >= k_idx)
        if s.window:
            mask = mask & (q_idx - k_idx < s.window)
        if s.kv_len % s.block_k:  # padded keys exist
            mask = mask & (k_idx < s.kv_len)
        if q_seg is not None:
            mask = mask & (q_seg[:, None] == k_seg[None, :])
        if rows is not None:
            mask = mask & rows[:, None]
        return jnp.where(mask, scores, _MASKED)

    return lax.cond(full, lambda x: x, masked, scores)


# ---------------------------------------------------------------------------------------
# Forward.


def forward_step(s: CallStatics, q, q_first, q_seg, k_ref, v_ref, k_seg_ref, k_first, carry,
                 rows=None):
    """Online-softmax update of (acc, row_max, row_sum) with the key block at k_first
    (`rows`: as `_scores`)."""
    acc, row_max, row_sum = carry
    keys = pl.ds(k_first, s.block_k)
    k_seg = k_seg_ref[keys] if k_seg_ref is not None else None
    scores = _scores(s, q, k_ref[keys, :], q_first, k_first, q_seg, k_seg, rows)
    new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
    correction = jnp.exp(row_max - new_max)
    p = jnp.exp(scores - new_max[:, None])
    row_sum = row_sum * correction + jnp.sum(p, axis=1)
    v = v_ref[keys, :]
    acc = acc * correction[:, None] + mm(p.astype(v.dtype), v)
    return acc, new_max, row_sum


def dq_step(s: CallStatics, q, do, lse, delta, q_first, q_seg, k_ref, v_ref, k_seg_ref,
            k_first, dq, rows=None):
    """dQ plus the contribution of the key block at k_first (`rows`: as `_scores`)."""
    keys = pl.ds(k_first, s.block_k)
    k = k_ref[keys, :]
    k_seg = k_seg_ref[keys] if k_seg_ref is not None else None
    scores = _scores(s, q, k, q_first, k_first, q_seg, k_seg, rows)
    p = jnp.exp(scores - lse[:, None])
    dp = mm(do, v_ref[keys, :], trans_b=True)
    ds = p * (dp - delta[:, None])
    return dq + mm(ds.astype(k.dtype), k)


def dkv_step(s: CallStatics, g, q_ref, do_ref, lse_ref, delta_ref, q_seg_ref, k, v, k_seg,
             k_first, q_first, carry, rows=None):
    """(dK, dV) plus the contribution of query head g's block at q_first (`rows`: as
    `_scores`)."""
    dk, dv = carry
    block = pl.ds(q_first, s.block_q)
    q = q_ref[block, g, :]
    do = do_ref[block, g, :]
    q_seg = q_seg_ref[block] if q_seg_ref is not None else None
    scores = _scores(s, q, k, q_first, k_first, q_seg, k_seg, rows)
    p = jnp.exp(scores - lse_ref[g, block][:, None])
    dv = dv + mm(p.astype(do.dtype), do, trans_a=True)
    dp = mm(do, v, trans_b=True)
    ds = p * (dp - delta_ref[g, block][:, None])
    dk = dk + mm(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv


def _forward_kernel(q_ref, k_ref, v_ref, *rest, s: CallStatics, has_segments: bool):
    # rest: [q segments, k segments], [the two aliased initial outputs], out, lse
    o_ref, lse_ref = rest[-2:]
    q_seg_ref, k_seg_ref = rest[:2] if has_segments else (None, None)
    q_block = pl.program_id(0)
    num_k_blocks = k_ref.shape[0] // s.block_k
    q = q_ref[...]
    q_seg = q_seg_ref[...] if has_segments else None
    q_first = q_block * s.block_q

    def body(kb, carry):
        return forward_step(s, q, q_first, q_seg, k_ref, v_ref, k_seg_ref, kb * s.block_k,
                            carry)

    lo, hi = _key_block_range(s, q_block, num_k_blocks)
    acc = jnp.zeros(q.shape, jnp.float32)
    row_max = jnp.full((s.block_q,), -jnp.inf, jnp.float32)
    row_sum = jnp.zeros((s.block_q,), jnp.float32)
    acc, row_max, row_sum = lax.fori_loop(lo, hi, body, (acc, row_max, row_sum))
    store_rows(o_ref, lse_ref, acc, row_max, row_sum)


def store_rows(o_ref, lse_ref, acc, row_max, row_sum):
    """Write the normalised output and the log-sum-exp of an online softmax. Rows that
    saw no key (max still -inf, or only masked scores) get 0 and lse = +inf, which makes
    exp(score - lse) = 0 in the backward: no gradient through them."""
    empty = row_max <= _EMPTY_BELOW
    safe_sum = jnp.where(empty, 1.0, row_sum)
    o_ref[...] = jnp.where(empty[:, None], 0.0, acc / safe_sum[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, row_max + jnp.log(safe_sum))


def forward_specs(s: CallStatics, d: int, kv_len: int, group: int, has_segments: bool):
    """BlockSpecs of q, k, v (and segment ids) for a grid (query block, batch, head)."""
    specs = [
        pl.BlockSpec((None, s.block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((None, kv_len, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
        pl.BlockSpec((None, kv_len, None, d), lambda i, bi, hi: (bi, 0, hi // group, 0)),
    ]
    if has_segments:
        specs += [pl.BlockSpec((None, s.block_q), lambda i, bi, hi: (bi, i)),
                  pl.BlockSpec((None, kv_len), lambda i, bi, hi: (bi, 0))]
    return specs


def dkv_specs_of(s: CallStatics, t: int, d: int, group: int, has_segments: bool):
    """BlockSpecs of q, k, v, do, lse, delta (and segment ids) for a grid
    (key block, batch, K/V head)."""
    specs = [
        pl.BlockSpec((None, t, group, d), lambda j, bi, ki: (bi, 0, ki, 0)),
        pl.BlockSpec((None, s.block_k, None, d), lambda j, bi, ki: (bi, j, ki, 0)),
        pl.BlockSpec((None, s.block_k, None, d), lambda j, bi, ki: (bi, j, ki, 0)),
        pl.BlockSpec((None, t, group, d), lambda j, bi, ki: (bi, 0, ki, 0)),
        pl.BlockSpec((None, group, t), lambda j, bi, ki: (bi, ki, 0)),
        pl.BlockSpec((None, group, t), lambda j, bi, ki: (bi, ki, 0)),
    ]
    if has_segments:
        specs += [pl.BlockSpec((None, t), lambda j, bi, ki: (bi, 0)),
                  pl.BlockSpec((None, s.block_k), lambda j, bi, ki: (bi, j))]
    return specs


def dq_specs_of(s: CallStatics, d: int, kv_len: int, group: int, has_segments: bool):
    """BlockSpecs of q, k, v, do, lse, delta (and segment ids) for a grid
    (query block, batch, head)."""
    specs = forward_specs(s, d, kv_len, group, False)
    specs += [
        pl.BlockSpec((None, s.block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((None, None, s.block_q), lambda i, bi, hi: (bi, hi, i)),
        pl.BlockSpec((None, None, s.block_q), lambda i, bi, hi: (bi, hi, i)),
    ]
    if has_segments:
        specs += forward_specs(s, d, kv_len, group, True)[3:]
    return specs


def _forward(q, k, v, segments, s: CallStatics, initial_outputs=None, out_dtype=None):
    """Padded inputs in, (out, lse) out: out like q (or `out_dtype`), lse (batch, heads,
    length) float32. segments: None or (query ids, key ids).

    initial_outputs: optional (out, lse) buffers the kernel writes into in place (for
    tests: filled with NaN, they show every position is written).
    """
    h, d = q.shape[2:]
    kv_len, kv = k.shape[1], k.shape[2]
    has_segments = segments is not None
    return forward_call(functools.partial(_forward_kernel, s=s, has_segments=has_segments),
                        q, [q, k, v, *(segments or ())],
                        forward_specs(s, d, kv_len, h // kv, has_segments), s,
                        "flash_attention_forward", initial_outputs, out_dtype)


def forward_call(kernel, q, args, in_specs, s: CallStatics, name: str, initial_outputs=None,
                 out_dtype=None):
    """(out, lse) of a forward kernel run once per (query block, batch, head); out in
    `out_dtype` (default q's)."""
    b, t, h, d = q.shape
    out_specs = [
        pl.BlockSpec((None, s.block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((None, None, s.block_q), lambda i, bi, hi: (bi, hi, i)),
    ]
    args, in_specs, aliases = alias_initial_outputs(args, in_specs, out_specs,
                                                    initial_outputs)
    return pl.pallas_call(
        kernel,
        grid=(t // s.block_q, b, h),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(q.shape, out_dtype or q.dtype),
                   jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        input_output_aliases=aliases,
        interpret=s.interpret,
        compiler_params=_TRITON,
        name=name,
    )(*args)


# ---------------------------------------------------------------------------------------
# Backward.


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, s: CallStatics,
                group: int, has_segments: bool):
    """One key block of one K/V head: dK, dV summed over its query heads and blocks."""
    if has_segments:
        q_seg_ref, k_seg_ref, dk_ref, dv_ref = rest
    else:
        (dk_ref, dv_ref), q_seg_ref, k_seg_ref = rest, None, None
    k_block = pl.program_id(0)
    num_q_blocks = q_ref.shape[0] // s.block_q
    k, v = k_ref[...], v_ref[...]
    k_seg = k_seg_ref[...] if has_segments else None
    k_first = k_block * s.block_k
    lo, hi = _query_block_range(s, k_block, num_q_blocks)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for g in range(group):  # the query heads that read this K/V head

        def body(qb, carry, g=g):
            return dkv_step(s, g, q_ref, do_ref, lse_ref, delta_ref, q_seg_ref, k, v, k_seg,
                            k_first, qb * s.block_q, carry)

        dk, dv = lax.fori_loop(lo, hi, body, (dk, dv))
    dk_ref[...] = (dk * s.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, s: CallStatics,
               has_segments: bool):
    """One query block of one head: dQ accumulated over the key blocks it sees."""
    if has_segments:
        q_seg_ref, k_seg_ref, dq_ref = rest
    else:
        (dq_ref,), q_seg_ref, k_seg_ref = rest, None, None
    q_block = pl.program_id(0)
    num_k_blocks = k_ref.shape[0] // s.block_k
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_seg = q_seg_ref[...] if has_segments else None
    q_first = q_block * s.block_q

    def body(kb, dq):
        return dq_step(s, q, do, lse, delta, q_first, q_seg, k_ref, v_ref, k_seg_ref,
                       kb * s.block_k, dq)

    lo, hi = _key_block_range(s, q_block, num_k_blocks)
    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * s.sm_scale).astype(dq_ref.dtype)


def _backward(q, k, v, segments, do, lse, delta, s: CallStatics, grad_dtype=None):
    has_segments = segments is not None
    group = q.shape[2] // k.shape[2]
    return backward_calls(
        functools.partial(_dkv_kernel, s=s, group=group, has_segments=has_segments),
        functools.partial(_dq_kernel, s=s, has_segments=has_segments),
        q, k, v, [do, lse, delta, *(segments or ())], s, "flash_attention",
        grad_dtype=grad_dtype)


def backward_calls(dkv_kernel, dq_kernel, q, k, v, rest, s: CallStatics, prefix: str,
                   dkv_lead=(), dq_lead=(), grad_dtype=None):
    """(dq, dk, dv) from two kernels: dK/dV with one program per (key block, batch, K/V
    head) over all its query heads, dQ with one per (query block, batch, head) over the
    key blocks it sees. rest: (do, lse, delta[, q_seg, k_seg]); dkv_lead, dq_lead:
    (array, BlockSpec) pairs passed to each kernel before q (block tables); gradients in
    `grad_dtype` (default their operands')."""
    b, t, h, d = q.shape
    kv_len, kv = k.shape[1], k.shape[2]
    group, has_segments = h // kv, len(rest) > 3

    kv_out = pl.BlockSpec((None, s.block_k, None, d), lambda j, bi, ki: (bi, j, ki, 0))
    dk, dv = pl.pallas_call(
        dkv_kernel,
        grid=(kv_len // s.block_k, b, kv),
        in_specs=[*(spec for _, spec in dkv_lead), *dkv_specs_of(s, t, d, group,
                                                                  has_segments)],
        out_specs=[kv_out, kv_out],
        out_shape=[jax.ShapeDtypeStruct(k.shape, grad_dtype or k.dtype),
                   jax.ShapeDtypeStruct(v.shape, grad_dtype or v.dtype)],
        interpret=s.interpret,
        compiler_params=dkv_params(d),
        name=f"{prefix}_dkv",
    )(*(a for a, _ in dkv_lead), q, k, v, *rest)

    dq = pl.pallas_call(
        dq_kernel,
        grid=(t // s.block_q, b, h),
        in_specs=[*(spec for _, spec in dq_lead), *dq_specs_of(s, d, kv_len, group,
                                                                has_segments)],
        out_specs=pl.BlockSpec((None, s.block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, grad_dtype or q.dtype),
        interpret=s.interpret,
        compiler_params=dq_params(d, q.dtype),
        name=f"{prefix}_dq",
    )(*(a for a, _ in dq_lead), q, k, v, *rest)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segments, s: CallStatics):
    return _forward(q, k, v, segments, s)


def _flash_fwd(q, k, v, segments, s: CallStatics):
    out, lse = _forward(q, k, v, segments, s)
    return (out, lse), (q, k, v, segments, out, lse)


def _flash_bwd(s: CallStatics, residuals, cotangents):
    q, k, v, segments, out, lse = residuals
    do, dlse = cotangents
    # delta_i = rowsum(o * do) (FlashAttention-2's D). A cotangent on the lse adds
    # dlse_i * p_ij to dS_ij, which is the same as subtracting dlse_i from delta_i.
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    delta = delta - dlse
    dq, dk, dv = _backward(q, k, v, segments, do.astype(q.dtype), lse, delta, s)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, segment_ids=None, kv_segment_ids=None, causal=True,
                    window=0, sm_scale=None, block_q=None, block_k=None, interpret=None,
                    return_lse=False):
    """Fused softmax attention with grouped-query K/V heads (FlashAttention-2).

    q: (batch, length, heads, head_dim); k, v: (batch, kv_length, kv_heads, head_dim) with
    heads a multiple of kv_heads (query head n reads K/V head n // (heads // kv_heads)).
    Queries are aligned to the last keys: query i sits at position
    p = i + kv_length - length, as a block of queries at the end of the sequence (prefill
    after a cache, decoding). causal: query i sees keys j <= p. window > 0 (with causal):
    only keys p - window + 1 .. p. A row that sees no key (p < 0 when length >
    kv_length) gives 0, lse = +inf and no gradient. Without causal every query sees
    every key. segment_ids (batch, length) int: attention stays inside equal ids, the
    keys' ids being `kv_segment_ids` (batch, kv_length) when given, else segment_ids
    (then length == kv_length). sm_scale defaults to head_dim ** -0.5. block_q, block_k
    default to `default_blocks(q.dtype)`.
    Lengths need not divide the block sizes (padded here, padded keys masked); a head_dim
    that is not a power of two is zero-padded to one. interpret=None: interpret mode
    unless the default backend is GPU. Returns the output in q.dtype and, with
    return_lse, the log-sum-exp of the scaled, masked scores, (batch, heads, length)
    float32; both are differentiable.
    """
    _check_args(q, k, v, segment_ids, causal, window, kv_segment_ids)
    t, d = q.shape[1], q.shape[3]
    args, s = _padded(q, k, v, segment_ids, kv_segment_ids, causal, window, sm_scale,
                      block_q, block_k, interpret)
    out, lse = _flash(*args, s)
    out, lse = out[:, :t, :, :d], lse[:, :, :t]
    return (out, lse) if return_lse else out


def _padded(q, k, v, segment_ids, kv_segment_ids, causal, window, sm_scale, block_q,
            block_k, interpret):
    """Pad lengths to whole blocks and head_dim to a power of two; fix the statics.
    Returns ((q, k, v, segments), statics), segments None or (query ids, key ids)."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    t, d = q.shape[1], q.shape[3]
    kv_len = k.shape[1]
    scale = d ** -0.5 if sm_scale is None else float(sm_scale)
    # Blocks no larger than the (padded) sequence; powers of two for Triton.
    default_q, default_k = default_blocks(q.dtype)
    block_q, block_k = block_q or default_q, block_k or default_k
    block_q = min(next_power_of_2(block_q), max(16, next_power_of_2(t)))
    block_k = min(next_power_of_2(block_k), max(16, next_power_of_2(kv_len)))
    t_pad = -(-t // block_q) * block_q
    kv_pad = -(-kv_len // block_k) * block_k
    d_pad = max(16, next_power_of_2(d))
    segments = None
    if segment_ids is not None:
        if kv_segment_ids is None:  # then t == kv_len; one padded length serves both
            t_pad = kv_pad = max(t_pad, kv_pad)
            kv_segment_ids = segment_ids
        pad_ids = lambda ids, length: jnp.pad(ids.astype(jnp.int32),
                                              ((0, 0), (0, length - ids.shape[1])),
                                              constant_values=-1)
        segments = (pad_ids(segment_ids, t_pad), pad_ids(kv_segment_ids, kv_pad))

    def pad(x, length):
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, d_pad - d)))

    s = CallStatics(causal=bool(causal), window=int(window), sm_scale=scale, block_q=block_q,
                block_k=block_k, q_len=t, kv_len=kv_len, interpret=bool(interpret),
                q_offset=kv_len - t)
    return (pad(q, t_pad), pad(k, kv_pad), pad(v, kv_pad), segments), s


def flash_attention_block(q, k, v, segment_ids, kv_segment_ids, *, causal, block_q=None,
                          block_k=None, interpret=None):
    """One block of a larger attention, for callers that merge blocks themselves (a ring
    step of context parallelism): the forward kernel alone, not differentiable.

    Arguments as `flash_attention` (query and key ids both given). Returns the output in
    float32 and the log-sum-exp (batch, heads, length) with -inf for rows that saw no
    key, as a log-sum-exp merge wants. `flash_attention_block_grads` gives the block's
    share of the gradients.
    """
    _check_args(q, k, v, segment_ids, causal, 0, kv_segment_ids)
    t, d = q.shape[1], q.shape[3]
    args, s = _padded(q, k, v, segment_ids, kv_segment_ids, causal, 0, None, block_q,
                      block_k, interpret)
    out, lse = _forward(*args, s, out_dtype=jnp.float32)
    lse = lse[:, :, :t]
    return out[:, :t, :, :d], jnp.where(lse == jnp.inf, -jnp.inf, lse)


def flash_attention_block_grads(q, k, v, segment_ids, kv_segment_ids, dout, lse, delta, *,
                                causal, block_q=None, block_k=None, interpret=None):
    """The gradients of q, k, v (float32) through one block of a larger attention, given
    the whole attention's log-sum-exp `lse` and `delta` = rowsum(dout * out), both
    (batch, heads, length) float32: the probabilities are exp(scores - lse), so the
    blocks' shares sum to the gradient of the whole (the backward kernels alone)."""
    _check_args(q, k, v, segment_ids, causal, 0, kv_segment_ids)
    t, d = q.shape[1], q.shape[3]
    (q_p, k_p, v_p, segments), s = _padded(q, k, v, segment_ids, kv_segment_ids, causal, 0,
                                           None, block_q, block_k, interpret)
    t_pad, d_pad = q_p.shape[1], q_p.shape[3]
    do = jnp.pad(dout.astype(q.dtype), ((0, 0), (0, t_pad - t), (0, 0), (0, d_pad - d)))
    rows = ((0, 0), (0, 0), (0, t_pad - t))
    lse = jnp.pad(lse, rows, constant_values=jnp.inf)  # padded rows: no gradient
    delta = jnp.pad(delta, rows)
    dq, dk, dv = _backward(q_p, k_p, v_p, segments, do, lse, delta, s, jnp.float32)
    kv_len = k.shape[1]
    return dq[:, :t, :, :d], dk[:, :kv_len, :, :d], dv[:, :kv_len, :, :d]


def partitioned_flash_attention(q, k, v, segment_ids=None, **kwargs):
    """`flash_attention` under the active mesh: one kernel call per (batch, heads) shard
    (`partitioned`). Without a mesh of more than one device this is `flash_attention`."""
    if kwargs.get("return_lse"):
        raise ValueError("partitioned_flash_attention returns the output only")
    return partitioned(lambda q, k, v, seg: flash_attention(q, k, v, segment_ids=seg,
                                                            **kwargs), q, k, v, segment_ids)


def partitioned(fn, q, k, v, segment_ids=None, length_axis: str | None = None, extra=(),
                out_ndims=None):
    """`fn(q, k, v, segment_ids, *extra) -> out` (out shaped as q) under the active mesh,
    one call per shard. `extra`: arrays laid out as q on their leading axes (batch,
    length, heads[, ...]), split alike; `out_ndims`: the ranks of a tuple of such
    outputs, when `fn` returns one.

    A Pallas call is opaque to XLA's partitioner, which would gather every operand and
    run the whole batch on each device. Here the batch is split as the logical axis
    `batch` is, and heads as `heads` is when `kv_heads` is split the same way (so each
    shard keeps whole query groups); otherwise heads stay whole. The length is split
    over the mesh axis `length_axis` when given (`fn` then runs in `shard_map` with that
    axis and exchanges what it needs: context parallelism); otherwise it stays whole,
    a `sequence` axis gathered. A dimension the mesh does not divide (a batch of one at
    init) stays whole.
    """
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, segment_ids, *extra)

    batch = mesh_axes_of(mesh, "batch", q.shape[0])
    heads = mesh_axes_of(mesh, "heads", k.shape[2])
    if heads != mesh_axes_of(mesh, "kv_heads", k.shape[2]) or set(heads) & set(batch):
        heads = ()
    split = lambda axes: (axes if len(axes) > 1 else axes[0]) if axes else None
    qkv_spec = P(split(batch), length_axis, split(heads), None)
    like_q = lambda ndim: P(*qkv_spec[:3], *(None,) * (ndim - 3))
    extra_specs = tuple(like_q(x.ndim) for x in extra)
    out_specs = qkv_spec if out_ndims is None else tuple(like_q(n) for n in out_ndims)
    if segment_ids is None:
        return jax.shard_map(lambda q, k, v, *extra: fn(q, k, v, None, *extra), mesh=mesh,
                             in_specs=(qkv_spec,) * 3 + extra_specs, out_specs=out_specs,
                             check_vma=False)(q, k, v, *extra)
    return jax.shard_map(fn, mesh=mesh,
                         in_specs=(qkv_spec,) * 3 + (P(split(batch), length_axis),)
                         + extra_specs,
                         out_specs=out_specs, check_vma=False)(q, k, v, segment_ids, *extra)
