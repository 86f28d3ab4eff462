"""Context parallelism (`model.attention.context_parallel`): causal mixing with the length
split over the mesh's `sequence` axis, each device holding one contiguous chunk of
queries, keys and values. Softmax attention:

- `ring` (ring attention; "TokenRing: An Efficient Parallelism Framework for
  Infinite-Context LLMs via Bidirectional Communication" for the idea of circulating
  blocks): key/value chunks travel the ring with `ppermute`; each device merges the
  partial outputs of its query chunk by log-sum-exp, skipping the chunks that causality
  masks whole. The backward pass (`custom_vjp`) sends keys and values around again with
  their gradient accumulators instead of keeping the chunks it received: memory per
  device falls with the devices (`efflm bench context`).
- `zigzag` (what `auto` picks for softmax): the ring over a load-balanced layout, device
  i holding length halves i and 2N - 1 - i, so every device does the same causal work
  (the ring's device N - 1 does N blocks, its device 0 one). The reorder and its
  inverse are two permutes of half chunks inside the call: the model's layout stays
  contiguous. Needs 2N to divide the length (else the ring runs).
- `ulysses` ("DeepSpeed Ulysses"): an all-to-all turns length shards into head shards,
  the kind's own attention runs over the whole length on each device's heads, and a
  second all-to-all turns the outputs back. Heads must divide by N; K/V heads too, or
  N by them (they are then repeated).
- `allgather`: each device gathers every key and value once per layer and attends its
  query chunk to them (memory O(length) per device); the baseline.

Sliding-window attention:
- `halo`: each device receives only the window - 1 keys and values before its chunk,
  from as many earlier devices as they span.

The linear kinds:
- `allscan` ("ZeCO: Zero Communication Overhead Sequence Parallelism for Linear
  Attention"): only fixed-size states travel (`allscan_linear_attention`,
  `allscan_delta_rule`).

All run inside `shard_map` over the whole mesh: the batch split as the logical axis
`batch` is, heads as `heads` is (when `kv_heads` splits the same way), the length over
`sequence`. Packed documents may cross chunk borders: the mask compares segment ids and
global positions. Each ring step runs in XLA, its queries in blocks of
`model.attention.softmax.block_size` (scores block x chunk, float32, at a time), or
under `model.attention.impl=pallas` as one call of the flash kernels (forward, and
dK/dV plus dQ in the backward); all-gather stays in XLA.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from efflm.errors import ConfigError
from efflm.layers.common import MASKED
from efflm.pallas_kernels.flash_attention import (
    flash_attention_block,
    flash_attention_block_grads,
    partitioned,
)
from efflm.pallas_kernels.linear_attention import segment_cumsum

if TYPE_CHECKING:
    from efflm.config import ModelConfig

AXIS = "sequence"
# auto: the kind's first (softmax: zigzag).
STRATEGIES = ("auto", "zigzag", "ring", "ulysses", "allgather", "halo", "allscan")


def strategy(cfg: ModelConfig, supported: tuple[str, ...], length: int) -> str | None:
    """The strategy a mixer implementing `supported` runs for a length-`length` pass
    under the active mesh: None unless the mesh splits `sequence` (> 1) and divides the
    length (`auto` is the kind's first strategy; a kind with none leaves the split to
    XLA's partitioner, which gathers keys and values)."""
    mesh = jax.sharding.get_abstract_mesh()
    n = mesh.shape.get(AXIS, 1) if not mesh.empty else 1
    if n == 1 or length % n:
        return None
    chosen = cfg.attention.context_parallel
    if chosen == "auto":
        chosen = supported[0] if supported else None
    elif chosen not in supported:
        return None
    if chosen == "zigzag" and length % (2 * n):
        return "ring"  # zig-zag halves each chunk
    return chosen


def chunk_mask(seg_q, seg_k, q_start, k_start):
    """(batch, 1, q_len, k_len) bool: causal by global position (queries from `q_start`,
    keys from `k_start`) and within one packed segment."""
    q_pos = q_start + jnp.arange(seg_q.shape[1])
    k_pos = k_start + jnp.arange(seg_k.shape[1])
    same = seg_q[:, :, None] == seg_k[:, None, :]
    return (same & (q_pos[:, None] >= k_pos[None, :])[None])[:, None]


def _heads_major(q, k, v):
    """(b, t, h, d) q and (b, s, kv, d) k, v -> (b, kv, group, t, d) and (b, kv, s, d)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _scores(q, k, mask):
    """Scaled scores (b, kv, group, t, s) float32, masked pairs at MASKED."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * q.shape[-1] ** -0.5
    return jnp.where(mask[:, :, None], scores, MASKED)


def _block(q, k, v, mask):
    """Attention of a query chunk to one key chunk: (output float32, its log-sum-exp)."""
    scores = _scores(q, k, mask)
    top = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - top)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksd->bkgtd", (weights / total).astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out, (top + jnp.log(total))[..., 0]


def _merge(out, lse, block_out, block_lse):
    new = jnp.logaddexp(lse, block_lse)
    return (out * jnp.exp(lse - new)[..., None]
            + block_out * jnp.exp(block_lse - new)[..., None]), new


def _split_queries(block: int, x, axis: int = 3):
    """`x` with its query axis (`axis`, of the chunk's length) cut into blocks, the block
    index first."""
    c = x.shape[axis]
    x = x.reshape(*x.shape[:axis], c // block, block, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _join_queries(x, axis: int = 3):
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])


@dataclasses.dataclass(frozen=True)
class RingSteps:
    """How each ring step attends one query chunk to one key chunk: in XLA (heads-major
    operands, queries in blocks of `block` when it divides the chunk, 0: whole) or with
    the Pallas flash kernels (`pallas`; operands as the model holds them, `interpret`
    off a GPU). A step is `diagonal` (the device's own chunk: causal, positions aligned)
    or earlier (every key precedes every query: only documents mask); the chunks that
    follow the queries are skipped before any step runs."""

    pallas: bool = False
    block: int = 0
    interpret: bool = False
    zigzag: bool = False  # each device holds length halves me and 2n - 1 - me

    @property
    def axes(self) -> tuple[int, int]:
        """The length axes of (queries, outputs and log-sum-exps) and of keys/values."""
        return (1, 1) if self.pallas else (3, 2)

    def attend(self, q, k, v, seg_q, seg_k, diagonal: bool):
        """(output float32 shaped as q, log-sum-exp shaped as q without its last axis)."""
        if self.pallas:
            out, lse = flash_attention_block(q, k, v, seg_q, seg_k, causal=diagonal,
                                             interpret=self.interpret)
            return out, lse.transpose(0, 2, 1)
        c = seg_q.shape[1]
        block = self.block if self.block and c % self.block == 0 else c

        def one(args):
            i, q_b, seg_b = args
            return _block(q_b, k, v, _step_mask(seg_b, seg_k, i * block, diagonal))

        blocks = (jnp.arange(c // block), _split_queries(block, q),
                  _split_queries(block, seg_q, 1))
        return tuple(map(_join_queries, lax.map(one, blocks)))

    def grads(self, q, k, v, seg_q, seg_k, dout, lse, delta, diagonal: bool):
        """(dq, dk, dv) float32 of this step's share, from the whole attention's `lse`
        and `delta` = rowsum(dout * out)."""
        if self.pallas:
            lse, delta = lse.transpose(0, 2, 1), delta.transpose(0, 2, 1)
            return flash_attention_block_grads(q, k, v, seg_q, seg_k, dout, lse, delta,
                                               causal=diagonal, interpret=self.interpret)
        c = seg_q.shape[1]
        block = self.block if self.block and c % self.block == 0 else c
        scale = q.shape[-1] ** -0.5

        def one(acc, args):
            i, q_b, dout_b, lse_b, delta_b, seg_b = args
            probs = jnp.exp(_scores(q_b, k, _step_mask(seg_b, seg_k, i * block, diagonal))
                            - lse_b[..., None])
            dv_b = jnp.einsum("bkgts,bkgtd->bksd", probs.astype(dout.dtype), dout_b,
                              preferred_element_type=jnp.float32)
            dprobs = jnp.einsum("bkgtd,bksd->bkgts", dout_b, v,
                                preferred_element_type=jnp.float32)
            dscores = (probs * (dprobs - delta_b[..., None]) * scale).astype(q.dtype)
            dq_b = jnp.einsum("bkgts,bksd->bkgtd", dscores, k,
                              preferred_element_type=jnp.float32)
            dk_b = jnp.einsum("bkgts,bkgtd->bksd", dscores, q_b,
                              preferred_element_type=jnp.float32)
            return (acc[0] + dk_b, acc[1] + dv_b), dq_b

        blocks = (jnp.arange(c // block),
                  *(_split_queries(block, x) for x in (q, dout, lse, delta)),
                  _split_queries(block, seg_q, 1))
        zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
        (dk, dv), dq = lax.scan(one, zeros, blocks)
        return _join_queries(dq), dk, dv


def _step_mask(seg_q, seg_k, q_start, diagonal: bool):
    """A ring step's mask: documents, and causality by position within the chunk on the
    diagonal (queries from `q_start`)."""
    if diagonal:
        return chunk_mask(seg_q, seg_k, q_start, 0)
    return (seg_q[:, :, None] == seg_k[:, None, :])[:, None]


def _ring_geometry(n: int, q, seg):
    """(this device's chunk index, the permutation sending each chunk to the next, q and
    seg). The index and seg pass through one optimization barrier with q: nothing of the
    ring then depends on loop-invariant values alone, which a scan over layers would
    otherwise hoist out of the loop, stacking the masks of every ring step."""
    me, q, seg = lax.optimization_barrier((lax.axis_index(AXIS), q, seg))
    return me, [(i, (i + 1) % n) for i in range(n)], q, seg


def _forward_loop(n: int, me, perm, out, lse, k, v, seg, earlier, later):
    """Steps 1 .. n - 1 of a forward ring from step 0's (out, lse): at step s the device
    holds chunk me - s, sends it on and merges `earlier(k, v, seg_k)` (the chunk precedes
    its own) or `later(k, v, seg_k)` (it follows) into its output by log-sum-exp."""

    def visit(s, out, lse, k, v, seg_k):
        return _merge(out, lse, *lax.cond((me - s) % n < me, earlier, later, k, v, seg_k))

    def step(s, carry):
        out, lse, k, v, seg_k = carry
        sent = lax.ppermute((k, v, seg_k), AXIS, perm)
        return (*visit(s, out, lse, k, v, seg_k), *sent)

    carry = (out, lse, *lax.ppermute((k, v, seg), AXIS, perm))
    out, lse, k, v, seg_k = lax.fori_loop(1, n - 1, step, carry)
    return visit(n - 1, out, lse, k, v, seg_k)


def _backward_loop(n: int, me, perm, dq, dk, dv, k, v, seg, earlier, later):
    """Steps 1 .. n - 1 of a backward ring from step 0's gradients: keys and values go
    round with their dK, dV accumulators, each device adding `earlier(k, v, seg_k)` or
    `later(k, v, seg_k)` (dq, dk, dv shares); after the last step the accumulators
    travel once more to their owners."""

    def step(s, carry):
        dq, k, v, seg_k, dk, dv = carry
        k, v, seg_k, dk, dv = lax.ppermute((k, v, seg_k, dk, dv), AXIS, perm)
        shares = lax.cond((me - s) % n < me, earlier, later, k, v, seg_k)
        return (dq + shares[0], k, v, seg_k, dk + shares[1], dv + shares[2])

    dq, _, _, _, dk, dv = lax.fori_loop(1, n, step, (dq, k, v, seg, dk, dv))
    return (dq, *lax.ppermute((dk, dv), AXIS, perm))


def _ring_forward(q, k, v, seg, n: int, steps: RingSteps):
    """(output float32, log-sum-exp). Step 0 is the diagonal; a later chunk is skipped."""
    me, perm, q, seg = _ring_geometry(n, q, seg)
    out, lse = steps.attend(q, k, v, seg, seg, diagonal=True)

    def earlier(k, v, seg_k):
        return steps.attend(q, k, v, seg, seg_k, diagonal=False)

    def later(k, v, seg_k):
        return jnp.zeros(out.shape, jnp.float32), jnp.full(lse.shape, -jnp.inf)

    return _forward_loop(n, me, perm, out, lse, k, v, seg, earlier, later)


def _ring_backward(q, k, v, seg, out, lse, dout, n: int, steps: RingSteps):
    """Gradients of q, k, v through `_ring_forward`'s blocks."""
    me, perm, q, seg = _ring_geometry(n, q, seg)
    delta = jnp.sum(dout.astype(jnp.float32) * out, axis=-1)  # rowsum dO . O

    def earlier(k, v, seg_k):
        return steps.grads(q, k, v, seg, seg_k, dout, lse, delta, diagonal=False)

    grads = steps.grads(q, k, v, seg, seg, dout, lse, delta, diagonal=True)
    later = lambda k, v, seg_k: tuple(jnp.zeros_like(g) for g in grads)  # noqa: E731
    dq, dk, dv = _backward_loop(n, me, perm, *grads, k, v, seg, earlier, later)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _halves(x, axis: int):
    c = x.shape[axis]
    return lax.slice_in_dim(x, 0, c // 2, axis=axis), lax.slice_in_dim(x, c // 2, c, axis=axis)


def _zigzag_forward(q, k, v, seg, n: int, steps: RingSteps):
    """The ring over zig-zag chunks: device me holds length halves me (a) and 2n - 1 - me
    (b). Its own step: a to a and b to b causally, b to all of a. A chunk from an earlier
    device: every query to its half a (its half b follows both). From a later device:
    query half b to both its halves (both precede b, follow a). Each off-diagonal step
    is half a chunk-by-chunk block: the causal work is even over the devices."""
    me, perm, q, seg = _ring_geometry(n, q, seg)
    q_axis, k_axis = steps.axes
    (qa, qb), (sa, sb) = _halves(q, q_axis), _halves(seg, 1)
    (ka, kb), (va, vb) = _halves(k, k_axis), _halves(v, k_axis)
    out_a, lse_a = steps.attend(qa, ka, va, sa, sa, diagonal=True)
    out_b, lse_b = _merge(*steps.attend(qb, kb, vb, sb, sb, diagonal=True),
                          *steps.attend(qb, ka, va, sb, sa, diagonal=False))
    out = jnp.concatenate([out_a, out_b], q_axis)
    lse = jnp.concatenate([lse_a, lse_b], q_axis)

    def earlier(k, v, seg_k):
        return steps.attend(q, _halves(k, k_axis)[0], _halves(v, k_axis)[0], seg,
                            _halves(seg_k, 1)[0], diagonal=False)

    def later(k, v, seg_k):
        part, part_lse = steps.attend(qb, k, v, sb, seg_k, diagonal=False)
        return (jnp.concatenate([jnp.zeros_like(part), part], q_axis),
                jnp.concatenate([jnp.full_like(part_lse, -jnp.inf), part_lse], q_axis))

    return _forward_loop(n, me, perm, out, lse, k, v, seg, earlier, later)


def _zigzag_backward(q, k, v, seg, out, lse, dout, n: int, steps: RingSteps):
    """Gradients through `_zigzag_forward`'s blocks."""
    me, perm, q, seg = _ring_geometry(n, q, seg)
    q_axis, k_axis = steps.axes
    delta = jnp.sum(dout.astype(jnp.float32) * out, axis=-1)
    rows = (q, dout, lse, delta)
    half_a, half_b = zip(*(_halves(x, q_axis) for x in rows), strict=True)
    sa, sb = _halves(seg, 1)
    cat_q = functools.partial(jnp.concatenate, axis=q_axis)
    cat_k = functools.partial(jnp.concatenate, axis=k_axis)

    def grads(rows, seg_q, k, v, seg_k, diagonal):
        q, dout, lse, delta = rows
        return steps.grads(q, k, v, seg_q, seg_k, dout, lse, delta, diagonal=diagonal)

    (ka, kb), (va, vb) = _halves(k, k_axis), _halves(v, k_axis)
    dq_a, dk_a, dv_a = grads(half_a, sa, ka, va, sa, True)
    dq_b, dk_b, dv_b = grads(half_b, sb, kb, vb, sb, True)
    dq_ba, dk_ba, dv_ba = grads(half_b, sb, ka, va, sa, False)
    dq = cat_q([dq_a, dq_b + dq_ba])
    dk, dv = cat_k([dk_a + dk_ba, dk_b]), cat_k([dv_a + dv_ba, dv_b])

    def earlier(k, v, seg_k):
        dq_s, dk_s, dv_s = grads(rows, seg, _halves(k, k_axis)[0], _halves(v, k_axis)[0],
                                 _halves(seg_k, 1)[0], False)
        return dq_s, cat_k([dk_s, jnp.zeros_like(dk_s)]), cat_k([dv_s, jnp.zeros_like(dv_s)])

    def later(k, v, seg_k):
        dq_s, dk_s, dv_s = grads(half_b, sb, k, v, seg_k, False)
        return cat_q([jnp.zeros_like(dq_s), dq_s]), dk_s, dv_s

    dq, dk, dv = _backward_loop(n, me, perm, dq, dk, dv, k, v, seg, earlier, later)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring(q, k, v, seg, n, steps):
    return _ring_fwd(q, k, v, seg, n, steps)[0]


def _ring_fwd(q, k, v, seg, n, steps):
    forward = _zigzag_forward if steps.zigzag else _ring_forward
    out, lse = forward(q, k, v, seg, n, steps)
    return out.astype(q.dtype), (q, k, v, seg, out.astype(q.dtype), lse)


def _ring_bwd(n, steps, residuals, dout):
    q, k, v, seg, out, lse = residuals
    backward = _zigzag_backward if steps.zigzag else _ring_backward
    grads = backward(q, k, v, seg, out.astype(jnp.float32), lse, dout, n, steps)
    return (*grads, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def _zigzag_destinations(n: int) -> tuple[list, list]:
    """The permutations sending each device's first and second length half (global
    halves 2i and 2i + 1) to the device that holds it in zig-zag order: half m to device
    m, or 2n - 1 - m for m >= n."""
    dest = lambda m: m if m < n else 2 * n - 1 - m
    return [(i, dest(2 * i)) for i in range(n)], [(i, dest(2 * i + 1)) for i in range(n)]


def _to_zigzag(n: int, xs):
    """Contiguous chunks (length axis 1) -> zig-zag halves (me, 2n - 1 - me): one
    permute of the first halves and one of the second; device me receives an even half
    from the first and an odd one from the second, its own (me) first."""
    first, second = _zigzag_destinations(n)
    firsts, seconds = zip(*(_halves(x, 1) for x in xs), strict=True)
    got_even, got_odd = lax.ppermute(firsts, AXIS, first), lax.ppermute(seconds, AXIS, second)
    even = lax.axis_index(AXIS) % 2 == 0
    return [jnp.where(even, jnp.concatenate([e, o], 1), jnp.concatenate([o, e], 1))
            for e, o in zip(got_even, got_odd, strict=True)]


def _from_zigzag(n: int, x):
    """The inverse of `_to_zigzag` for one array."""
    first, second = _zigzag_destinations(n)
    back_even = [(dst, src) for src, dst in first]  # the even half returns to its owner
    back_odd = [(dst, src) for src, dst in second]
    a, b = _halves(x, 1)
    even = lax.axis_index(AXIS) % 2 == 0
    got_even = lax.ppermute(jnp.where(even, a, b), AXIS, back_even)
    got_odd = lax.ppermute(jnp.where(even, b, a), AXIS, back_odd)
    return jnp.concatenate([got_even, got_odd], 1)


def _ring_local(q, k, v, seg, n: int, steps: RingSteps):
    if steps.zigzag:
        q, k, v, seg = _to_zigzag(n, (q, k, v, seg))
    if steps.pallas:
        out = _ring(q, k, v, seg, n, steps)
    else:
        b, t, h, d = q.shape
        out = _ring(*_heads_major(q, k, v), seg, n, steps)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
    return _from_zigzag(n, out) if steps.zigzag else out


def _allgather_local(q, k, v, seg):
    b, t, h, d = q.shape
    gather = functools.partial(lax.all_gather, axis_name=AXIS, axis=1, tiled=True)
    mask = chunk_mask(seg, gather(seg), lax.axis_index(AXIS) * t, 0)
    out = _block(*_heads_major(q, gather(k), gather(v)), mask)[0].astype(q.dtype)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def ulysses_heads(heads: int, kv_heads: int, n: int) -> str:
    """Why Ulysses cannot split `heads` query heads over `n` devices (the heads a device
    holds, its tensor shard's), "" when it can: heads must divide by n, and K/V heads
    too, or n by them (then they are repeated)."""
    if heads % n:
        return f"{heads} query heads per tensor shard do not divide over mesh.sequence={n}"
    if kv_heads % n and n % kv_heads:
        return (f"{kv_heads} K/V heads per tensor shard neither divide over "
                f"mesh.sequence={n} nor divide it (to be repeated)")
    return ""


def _ulysses_local(q, k, v, seg, n: int, attend):
    """All-to-all from length shards to head shards, the kind's own attention over the
    whole length, and back (DeepSpeed-Ulysses). K/V heads fewer than n are repeated."""
    heads, kv = q.shape[2], k.shape[2]
    if reason := ulysses_heads(heads, kv, n):
        raise ConfigError(f"model.attention.context_parallel=ulysses: {reason}")
    if kv % n:
        k, v = (jnp.repeat(x, n // kv, axis=2) for x in (k, v))
    to_heads = functools.partial(lax.all_to_all, axis_name=AXIS, split_axis=2, concat_axis=1,
                                 tiled=True)
    seg = lax.all_gather(seg, AXIS, axis=1, tiled=True)
    out = attend(to_heads(q), to_heads(k), to_heads(v), seg)
    return lax.all_to_all(out, AXIS, split_axis=1, concat_axis=2, tiled=True)


def _halo_local(q, k, v, seg, n: int, halo: int, attend):
    """Each device receives the `halo` keys and values before its chunk (from as many
    earlier devices as that spans, only the tokens it needs from each) and runs `attend`
    over halo + chunk, keeping its chunk's outputs. Before the first chunk the halo is
    empty (segment -1)."""
    b, c = seg.shape
    keys, values, ids = [], [], []
    for i in range(-(-halo // c), 0, -1):  # the farthest device first
        start = c - min(c, halo - (i - 1) * c)  # the tail that device sends
        k_i, v_i, s_i = lax.ppermute((k[:, start:], v[:, start:], seg[:, start:] + 1), AXIS,
                                     [(j, j + i) for j in range(n - i)])
        keys.append(k_i), values.append(v_i), ids.append(s_i - 1)
    k_ext = jnp.concatenate([*keys, k], 1)
    v_ext = jnp.concatenate([*values, v], 1)
    seg_ext = jnp.concatenate([*ids, seg], 1)
    q_ext = jnp.concatenate([jnp.zeros((b, halo, *q.shape[2:]), q.dtype), q], 1)
    return attend(q_ext, k_ext, v_ext, seg_ext)[:, halo:]


def _continuing(seg):
    """(batch, length) bool: the token is still in the chunk's first segment."""
    return lax.cummin((seg == seg[:, :1]).astype(jnp.int32), axis=1) > 0


def _diagonal(transition, state):
    return transition[..., None] * state


def _dense(transition, state):
    return jnp.einsum("bhij,bhjv->bhiv", transition, state)


def _incoming(n: int, transition, states, first_seg, last_seg, apply=_diagonal):
    """Each device's incoming states from every device's (transition, final states): an
    all-gather of those fixed-size pairs, then the prefix S_in(r) = A(r-1) S_in(r-1) +
    S(r-1), zero where a document starts at device r's first token. `transition`
    (batch, heads, dk or 1) applied elementwise, or with `apply=_dense` a (batch, heads,
    dk, dk) matrix; `states`: a tuple of (batch, heads, dk, dv) arrays. Returns (this
    device's incoming states, the states after the last device: the whole sequence's
    final states)."""
    gather = functools.partial(lax.all_gather, axis_name=AXIS)
    transitions, firsts, lasts = gather(transition), gather(first_seg), gather(last_seg)
    gathered = [gather(s) for s in states]
    incoming = [tuple(jnp.zeros_like(s) for s in states)]
    for r in range(1, n + 1):
        keep = True if r == n else (firsts[r] == lasts[r - 1])[:, None, None, None]
        incoming.append(tuple(jnp.where(keep, apply(transitions[r - 1], s_in) + s[r - 1], 0.0)
                              for s_in, s in zip(incoming[-1], gathered, strict=True)))
    me = lax.axis_index(AXIS)
    mine = tuple(jnp.stack(column)[me] for column in zip(*incoming[:n], strict=True))
    return mine, incoming[n]


def _as_rows(state):
    """A (batch, heads, dk, dv) state every device holds alike, as one length row
    (batch, 1, heads, dk dv): the devices' rows stack along the length."""
    b, h = state.shape[:2]
    return state.reshape(b, 1, h, -1)


def _from_rows(rows, dk: int):
    """The last device's state from `_as_rows`' stack."""
    b, _, h, _ = rows.shape
    return rows[:, -1].reshape(b, h, dk, -1)


def _allscan_local(q, k, v, seg, *decay, n: int, local, normalize: bool):
    log_decay = decay[0] if decay else None
    out, state = local(q, k, v, log_decay, seg)  # from a zero state
    continuing = _continuing(seg)[..., None, None]  # (b, t, 1, 1)
    if log_decay is None:
        cum = jnp.zeros((*q.shape[:3], 1), jnp.float32)
    else:
        g = log_decay.astype(jnp.float32)
        cum = jnp.cumsum(g if g.ndim == 4 else g[..., None], axis=1)
    reach = jnp.exp(cum) * continuing  # how much of the incoming state reaches token t
    states = (state,)
    if normalize:
        sums = segment_cumsum(k.astype(jnp.float32), seg)
        states += (sums[:, -1, ..., None],)
    incoming, final = _incoming(n, reach[:, -1], states, seg[:, 0], seg[:, -1])
    weighted = q.astype(jnp.float32) * reach
    out = out.astype(jnp.float32) + jnp.einsum("bthk,bhkv->bthv", weighted, incoming[0])
    if not normalize:
        return out, jnp.zeros(q.shape, jnp.float32), _as_rows(final[0])
    return out, sums + incoming[1][..., 0][:, None] * continuing, _as_rows(final[0])


def allscan_linear_attention(q, k, v, log_decay, segment_ids, local, normalize: bool = False):
    """The linear kinds' causal mix with the length split over `sequence` (an all-scan,
    "ZeCO"): each device runs `local(q, k, v, log_decay, segment_ids) -> (out,
    final_state)` (the kind's chunked mix) from a zero state, the devices exchange their
    fixed-size (transition, final state) pairs, and each adds its incoming state's share
    q_t diag(decay to t) S_in to its outputs. With `normalize`, the running key sums z
    go the same way. Returns (out float32, z (batch, length, heads, dk) float32, zeros
    without `normalize`, the final state (batch, heads, dk, dv) float32)."""
    mesh = jax.sharding.get_abstract_mesh()
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    fn = functools.partial(_allscan_local, n=mesh.shape[AXIS], local=local,
                           normalize=normalize)
    extra = () if log_decay is None else (log_decay,)
    out, z, final = partitioned(fn, q, k, v, segment_ids, length_axis=AXIS, extra=extra,
                                out_ndims=(4, 4, 4))
    return out, z, _from_rows(final, q.shape[-1])


def _allscan_delta_local(q, k, v, seg, log_alpha, beta, *, n: int, local):
    out, state = local(q, k, v, log_alpha, beta, seg, None)
    b, _, h, dk = q.shape
    # The chunk's transition P (S_end = P S_in + S_local): the state reached from I with
    # zero values; then the incoming state's share of the outputs: a pass with zero
    # values from S_in.
    eye = jnp.broadcast_to(jnp.eye(dk, dtype=jnp.float32), (b, h, dk, dk))
    transition = local(q, k, jnp.zeros_like(k), log_alpha, beta, seg, eye)[1]
    (incoming,), (final,) = _incoming(n, transition, (state,), seg[:, 0], seg[:, -1],
                                      apply=_dense)
    extra = local(q, k, jnp.zeros_like(v), log_alpha, beta, seg, incoming)[0]
    return out.astype(jnp.float32) + extra.astype(jnp.float32), _as_rows(final)


def allscan_delta_rule(q, k, v, log_alpha, beta, segment_ids, local):
    """The gated delta rule with the length split over `sequence`: as
    `allscan_linear_attention`, but a chunk's transition is a dense dk x dk matrix per
    head (a pass from the identity with zero values) and the incoming state's share of
    the outputs takes a second pass (zero values from S_in): three passes of `local(q,
    k, v, log_alpha, beta, segment_ids, initial_state) -> (out, final_state)` in all.
    Returns (out float32, the final state (batch, heads, dk, dv) float32)."""
    mesh = jax.sharding.get_abstract_mesh()
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    fn = functools.partial(_allscan_delta_local, n=mesh.shape[AXIS], local=local)
    out, final = partitioned(fn, q, k, v, segment_ids, length_axis=AXIS,
                             extra=(log_alpha, beta), out_ndims=(4, 4))
    return out, _from_rows(final, q.shape[-1])


def context_parallel_attention(q, k, v, segment_ids, strategy: str, block: int = 0,
                               impl: str = "xla", interpret: bool | None = None,
                               attend=None, halo: int = 0):
    """Causal softmax attention of q (batch, length, heads, dim) to k, v (batch, length,
    kv_heads, dim) under the active mesh, the length split over `sequence` by
    `strategy` (zigzag | ring | ulysses | allgather); segment_ids (batch, length), None:
    one document. Ring steps run in XLA (`block`: queries in blocks of this many when it
    divides the chunk, scores block x chunk at a time; 0: the whole chunk) or, with
    impl=pallas, one flash-kernel call each (`interpret`: None, interpret mode unless on a
    GPU); all-gather runs in XLA; Ulysses runs `attend(q, k, v, segment_ids)`, the
    kind's own attention over the whole length, on each device's share of the heads;
    `halo` runs it over each chunk and the `halo` tokens before it (a window's
    attention, whose queries see no further back)."""
    mesh = jax.sharding.get_abstract_mesh()
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    if strategy in ("ring", "zigzag"):
        if interpret is None:
            interpret = jax.default_backend() != "gpu"
        steps = RingSteps(pallas=impl == "pallas", block=block, interpret=interpret,
                          zigzag=strategy == "zigzag")
        fn = functools.partial(_ring_local, n=mesh.shape[AXIS], steps=steps)
    elif strategy == "ulysses":
        fn = functools.partial(_ulysses_local, n=mesh.shape[AXIS], attend=attend)
    elif strategy == "allgather":
        fn = _allgather_local
    elif strategy == "halo":
        fn = functools.partial(_halo_local, n=mesh.shape[AXIS], halo=halo, attend=attend)
    else:
        raise ValueError(f"unknown context-parallel strategy {strategy!r}")
    return partitioned(fn, q, k, v, segment_ids, length_axis=AXIS)
