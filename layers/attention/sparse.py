"""What the sparse attention kinds (`sliding`, `power`) share: the q/k/v and output
projections of softmax attention, attention sinks (each query's document's first
tokens, as a branch merged into a kernel's output by log-sum-exp, or as extra keys of a
tiled softmax), the tiled softmax itself, a softmax over keys gathered per query (the
sink branch, power's decoding), and the masked reference.

A pattern is given by `covered(query index, key index)` (elementwise, row indices):
whether the pattern shows the key to the query; causality and documents are applied on
top, and a sink is only added where the pattern does not already show it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflm.layers.attention.softmax import dot_product_attention, projection_flops
from efflm.layers.common import MASKED
from efflm.layers.dense import Dense, quant_kw
from efflm.layers.rotary import apply_rotary
from efflm.shapes import head_dim, num_kv_heads


def project_qkv(module: nn.Module, x, positions):
    """Softmax attention's q, k, v projections (GQA) with rotary positions, built in the
    calling module (names `query`, `key`, `value`)."""
    cfg = module.cfg
    heads, kv_heads, dim = cfg.attention.num_heads, num_kv_heads(cfg), head_dim(cfg)
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=cfg.init_std,
              **quant_kw(cfg, "attention"))
    q = Dense((heads, dim), ("embed", "heads", "head_dim"), name="query", **kw)(x)
    k = Dense((kv_heads, dim), ("embed", "kv_heads", "head_dim"), name="key", **kw)(x)
    v = Dense((kv_heads, dim), ("embed", "kv_heads", "head_dim"), name="value", **kw)(x)
    theta = cfg.attention.rope_theta
    return apply_rotary(q, positions, theta), apply_rotary(k, positions, theta), v


def project_out(module: nn.Module, out):
    """The output projection of the mixed heads (name `out`)."""
    cfg = module.cfg
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
    std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    return Dense((cfg.d_model,), ("heads", "head_dim", "embed"), in_dims=2, dtype=cfg.dtype,
                 param_dtype=cfg.param_dtype, std=std, name="out",
                 **quant_kw(cfg, "attention"))(out)


def pattern_flops(cfg, pairs: float) -> float:
    """Forward FLOPs per token of the projections and of `pairs` query-key pairs (scores
    and weighted values)."""
    return projection_flops(cfg) + 2 * 2 * pairs * cfg.attention.num_heads * head_dim(cfg)


def document_start(seg):
    """Each position's document start (row index), (batch, length)."""
    idx = jnp.arange(seg.shape[1])
    starts = jnp.concatenate([jnp.ones((seg.shape[0], 1), bool), seg[:, 1:] != seg[:, :-1]],
                             axis=1)
    return jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def segments(segment_ids, batch: int, length: int):
    return jnp.ones((batch, length), jnp.int32) if segment_ids is None else segment_ids


def sink_keys(k, v, seg, covered, sinks: int):
    """Each query's sink keys and values, (batch, length, sinks, kv_heads, dim), and which
    of them it sees, (batch, length, sinks): its document's first `sinks` tokens that are
    at or before it and that the pattern does not already show it."""
    t = k.shape[1]
    idx = jnp.arange(t)
    rows = document_start(seg)[..., None] + jnp.arange(sinks)
    ok = (rows <= idx[:, None]) & ~covered(idx[:, None], rows) & (seg > 0)[..., None]
    rows = jnp.minimum(rows, t - 1)
    take = jax.vmap(lambda a, r: a[r])  # per batch row
    return take(k, rows), take(v, rows), ok


def gathered_softmax(q, keys, values, shown):
    """(out, lse): softmax attention of each query over its own gathered keys. q (batch,
    length, heads, dim); keys, values (batch, length, span, kv_heads, dim); shown (batch,
    length, span), or (batch, length, kv_heads, span) per K/V head. lse (batch, length,
    heads) float32, -inf for a query that sees no key (out 0)."""
    b, t, h, d = q.shape
    kv = keys.shape[3]
    qg = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,btukd->btkgu", qg, keys, preferred_element_type=jnp.float32)
    if shown.ndim == 3:
        shown = shown[:, :, None, :]
    mask = shown[:, :, :, None, :]
    scores = jnp.where(mask, scores, MASKED)
    lse = jax.nn.logsumexp(scores, axis=-1)
    probs = jnp.where(mask, jnp.exp(scores - lse[..., None]), 0.0).astype(values.dtype)
    out = jnp.einsum("btkgu,btukd->btkgd", probs, values).reshape(b, t, h, d)
    lse = jnp.where(jnp.any(shown, axis=-1)[..., None], lse, -jnp.inf)
    return out, lse.reshape(b, t, h)


def sink_branch(q, k, v, segment_ids, covered, sinks: int):
    """(out, lse): softmax attention of each query over its sink keys alone (`sink_keys`);
    lse (batch, heads, length) float32, -inf for a query that sees none (out 0)."""
    b, t = q.shape[:2]
    out, lse = gathered_softmax(q, *sink_keys(k, v, segments(segment_ids, b, t), covered,
                                              sinks))
    return out, lse.transpose(0, 2, 1)


def with_sinks(out, lse, q, k, v, segment_ids, covered, sinks: int):
    """A kernel's `(out, lse)` merged by log-sum-exp with the sink branch."""
    lse = jnp.where(lse == jnp.inf, -jnp.inf, lse)  # the kernels' "no key" rows
    sink_out, sink_lse = sink_branch(q, k, v, segment_ids, covered, sinks)
    total = jnp.logaddexp(lse, sink_lse)

    def weight(part):  # (batch, heads, length) -> (batch, length, heads, 1)
        return jnp.exp(part - total).transpose(0, 2, 1)[..., None]

    merged = out.astype(jnp.float32) * weight(lse) + sink_out.astype(jnp.float32) * weight(
        sink_lse)
    return merged.astype(q.dtype)


def tiled_softmax(q, k, v, seg, keys, values, tile_mask, covered, sinks: int, block: int):
    """Softmax attention of each query block over its gathered key tiles and its queries'
    sink keys, in one softmax. `q` (batch, n * block, heads, dim) and `k`, `v`, `seg`
    padded to whole blocks; `keys`, `values` (batch, n, span, kv_heads, dim);
    `tile_mask` (batch, n, block, span) bool (causality and documents applied)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    n, span = keys.shape[1], keys.shape[2]
    qb = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, n, block, kv, h // kv, d)
    scores = jnp.einsum("bnqkgd,bnskd->bnkgqs", qb, keys, preferred_element_type=jnp.float32)
    parts = [jnp.where(tile_mask[:, :, None, None], scores, MASKED)]
    if sinks:
        sink_k, sink_v, ok = sink_keys(k, v, seg, covered, sinks)
        sink_k, sink_v = (a.reshape(b, n, block, sinks, kv, d) for a in (sink_k, sink_v))
        sink_scores = jnp.einsum("bnqkgd,bnqukd->bnkgqu", qb, sink_k,
                                 preferred_element_type=jnp.float32)
        mask = ok.reshape(b, n, block, sinks)[:, :, None, None]
        parts.append(jnp.where(mask, sink_scores, MASKED))
    probs = jax.nn.softmax(jnp.concatenate(parts, axis=-1), axis=-1).astype(v.dtype)
    out = jnp.einsum("bnkgqs,bnskd->bnqkgd", probs[..., :span], values)
    if sinks:
        out = out + jnp.einsum("bnkgqu,bnqukd->bnqkgd", probs[..., span:], sink_v)
    return out.reshape(b, t, h, d)


def pad_to_blocks(q, k, v, segment_ids, block: int):
    """(q, k, v, seg, n): padded to n whole blocks, the padding in segment 0."""
    b, t = q.shape[:2]
    n = -(-t // block)
    pad = n * block - t
    seg = segments(segment_ids, b, t)
    if pad:
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, pad)))
    return q, k, v, seg, n


def masked_reference(q, k, v, segment_ids, covered, sinks: int):
    """Full masked softmax with the token-level mask of a pattern and its sinks."""
    b, t = q.shape[:2]
    seg = segments(segment_ids, b, t)
    idx = jnp.arange(t)
    pos = idx - document_start(seg)  # in-document position
    same = seg[:, :, None] == seg[:, None, :]
    causal = idx[:, None] >= idx[None, :]
    sink = pos[:, None, :] < sinks
    shown = covered(idx[:, None], idx[None, :])
    return dot_product_attention(q, k, v, (same & causal & (shown | sink))[:, None])
