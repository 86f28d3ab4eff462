"""Causal capacity: which (token, target) pairs fit, decided token by token.

A target (an expert, an expert-parallel device, a router's row budget) offers a token at
position p of its document `limit(p) = ceil(rate * (p + 1))` slots in all, counted from
the document's start, so the slots grow with the position and drops spread over it.
Pairs are taken in (position, choice) order: a pair is kept when the slots its target
has used so far, plus its token's earlier choices of the same target, stay below
`limit(p)`. A token's fate thus depends only on its own document at earlier or equal
positions, and a decoder reproduces it from one counter per target and the position.

A row of packed documents has `ceil(rate * length)` slots per target (a static buffer),
which the documents' limits together may exceed (each document's first token gets a
slot). So the kept pairs pass a second, row-wide rule of the same form, the position
being the count of the row's real tokens so far: a document then loses a pair to the
ones before it in its row only when they have used the row's slots, and padding (no
pairs, no position) changes nothing. For one document a row, the second rule never
drops anything.

The used slots follow `S(t+1) = min(S(t) + a(t), L(t))` (`a`: the pairs asking at t;
`L` never falls within a document and `S <= L`), which unrolls to
`S(t) = D(t) + min(S0, min_{s<t} (L(s) - D(s+1)))`, `D` the document's running count of
requests and `S0` the counter it starts from: a cumulative sum and a segmented
cumulative minimum, so a whole sequence is decided in parallel.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def limit_at(rate: float, position):
    """Slots a target offers in all up to document position `position` (0-based)."""
    return jnp.ceil(rate * (position + 1).astype(jnp.float32) - 1e-6).astype(jnp.int32)


def row_capacity(rate: float, length: int) -> int:
    """Slots per target a row of `length` tokens needs when it holds one document."""
    return max(1, math.ceil(rate * length - 1e-6))


def documents(segment_ids, batch: int, length: int):
    """(valid, starts, position, real_before), each (batch, length): real tokens (segment
    > 0), where a document (or the chunk) starts, each token's index in its document, and
    the row's real tokens before it."""
    idx = jnp.arange(length, dtype=jnp.int32)
    if segment_ids is None:
        valid = jnp.ones((batch, length), bool)
        starts = jnp.broadcast_to(idx == 0, (batch, length))
    else:
        valid = segment_ids > 0
        previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
        starts = segment_ids != previous
    first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    real_before = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - valid
    return valid, starts, idx - first, real_before


def _segmented_cummin(values, starts):
    """Running minimum along axis 1 that restarts where `starts` (broadcast) is true."""
    flags = jnp.broadcast_to(starts.reshape(starts.shape + (1,) * (values.ndim - 2)),
                             values.shape)

    def combine(a, b):
        return a[0] | b[0], jnp.where(b[0], b[1], jnp.minimum(a[1], b[1]))

    return jax.lax.associative_scan(combine, (flags, values), axis=1)[1]


def used_slots(requests, limit, starts, used0=None):
    """(before, after): each target's used slots before each position, (batch, length,
    targets), and after the last, (batch, targets). `requests` (batch, length, targets)
    counts the pairs asking; `limit` (batch, length) as `limit_at`; `used0` (batch,
    targets) the counter the chunk's first document continues from (decoding)."""
    batch, length, targets = requests.shape
    inclusive = jnp.cumsum(requests, axis=1)
    exclusive = inclusive - requests
    first = jax.lax.cummax(jnp.where(starts, jnp.arange(length), 0), axis=1)
    base = jnp.take_along_axis(exclusive, first[..., None], axis=1)  # C at the doc start
    spare = limit[..., None] - (inclusive - base)  # L(s) - D(s+1)
    s0 = jnp.zeros((batch, length, targets), requests.dtype)
    if used0 is not None:
        s0 = s0.at[:, 0].set(used0.astype(requests.dtype))
    shifted = jnp.pad(spare[:, :-1], ((0, 0), (1, 0), (0, 0)))
    before = (exclusive - base) + _segmented_cummin(jnp.where(starts[..., None], s0, shifted),
                                                    starts)
    after = jnp.minimum(before[:, -1] + requests[:, -1], limit[:, -1:])
    return before, after


def causal_keep(targets, asking, limit, starts, num_targets: int, used0=None):
    """Which pairs fit under the causal rule.

    `targets` (batch, length, k) int: each pair's target; `asking` (batch, length, k):
    the pairs that ask (real tokens' choices); `limit` and `starts` (batch, length).
    Returns (keep, rank, after): the kept pairs; each pair's rank among the kept pairs
    of its target in its row, in (position, choice) order (a slot unique in the row);
    and each target's used slots after the chunk (batch, num_targets)."""
    onehot = (targets[..., None] == jnp.arange(num_targets)) & asking[..., None]
    onehot = onehot.astype(jnp.int32)  # (batch, length, k, targets)
    earlier = jnp.cumsum(onehot, axis=2) - onehot
    before, after = used_slots(jnp.sum(onehot, axis=2), limit, starts, used0)
    slot = jnp.sum(onehot * (before[:, :, None, :] + earlier), axis=-1)
    keep = asking & (slot < limit[..., None])
    kept = onehot * keep[..., None]
    batch, length, k, _ = kept.shape
    flat = kept.reshape(batch, length * k, num_targets)
    rank = jnp.sum((jnp.cumsum(flat, axis=1) - flat) * flat, axis=-1).reshape(batch, length, k)
    return keep, rank, after


def counters_init(batch: int, targets: int) -> dict:
    """Zero counters for `causal_pairs` (the slots used, per target, by the current
    document and by the row; the document's and the row's tokens so far)."""
    return {"doc_used": jnp.zeros((batch, targets), jnp.int32),
            "row_used": jnp.zeros((batch, targets), jnp.int32),
            "doc_seen": jnp.zeros((batch,), jnp.int32),
            "row_seen": jnp.zeros((batch,), jnp.int32)}


def causal_pairs(targets, asking, rate: float, segment_ids, num_targets: int,
                 counters: dict | None = None):
    """Both rules of the module: (keep, rank, counters). `targets` and `asking` (batch,
    length, k); `rate` slots per target per token; `counters` (from `counters_init`)
    carry a chunk on from the previous one (decoding); the returned ones end this chunk.
    `rank`: each kept pair's slot at its target in its row, below
    `row_capacity(rate, length)` (for a continued chunk, below its length)."""
    batch, length, _ = targets.shape
    valid, starts, position, real_before = documents(segment_ids, batch, length)
    first_doc = jax.lax.cummax(jnp.where(starts, jnp.arange(length), 0), axis=1) == 0
    c = counters_init(batch, num_targets) if counters is None else counters
    position = position + jnp.where(first_doc, c["doc_seen"][:, None], 0)
    row_position = real_before + c["row_seen"][:, None]
    asking = asking & valid[..., None]
    candidate, _, doc_used = causal_keep(targets, asking, limit_at(rate, position), starts,
                                         num_targets, c["doc_used"])
    row_start = jnp.broadcast_to(jnp.arange(length) == 0, (batch, length))
    keep, rank, row_used = causal_keep(targets, candidate, limit_at(rate, row_position),
                                       row_start, num_targets, c["row_used"])
    real = jnp.sum(valid, axis=1, dtype=jnp.int32)
    new = {"doc_used": doc_used, "row_used": row_used,
           "doc_seen": jnp.where(valid[:, -1], position[:, -1] + 1, c["doc_seen"]),
           "row_seen": c["row_seen"] + real}
    return keep, rank, new


def causal_picks(targets, asking, rate: float, segment_ids=None):
    """Both rules as a plain loop over positions and choices (concrete inputs): the kept
    pairs (batch, length, k) bool."""
    targets, asking = np.asarray(targets), np.asarray(asking)
    batch, length, k = targets.shape
    seg = np.ones((batch, length), int) if segment_ids is None else np.asarray(segment_ids)
    keep = np.zeros((batch, length, k), bool)
    for b in range(batch):
        row_used, real, doc = {}, 0, None
        for t in range(length):
            if seg[b, t] == 0:
                doc = 0
                continue
            if seg[b, t] != doc:
                used, p, doc = {}, 0, seg[b, t]
            limit = math.ceil(rate * (p + 1) - 1e-6)
            row_limit = math.ceil(rate * (real + 1) - 1e-6)
            for j in range(k):
                g = int(targets[b, t, j])
                if asking[b, t, j] and used.get(g, 0) < limit:
                    used[g] = used.get(g, 0) + 1
                    if row_used.get(g, 0) < row_limit:
                        keep[b, t, j] = True
                        row_used[g] = row_used.get(g, 0) + 1
            p, real = p + 1, real + 1
    return keep
