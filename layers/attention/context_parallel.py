"""Context parallelism (`model.attention.context_parallel`): causal softmax attention with
the length split over the mesh's `sequence` axis, each device holding one contiguous chunk
of queries, keys and values.

- `ring` (ring attention; "TokenRing: An Efficient Parallelism Framework for
  Infinite-Context LLMs via Bidirectional Communication" for the idea of circulating
  blocks): key/value chunks travel the ring with `ppermute`; each device merges the
  partial outputs of its query chunk by log-sum-exp, skipping the chunks that causality
  masks whole. The backward pass (`custom_vjp`) sends keys and values around again with
  their gradient accumulators instead of keeping the chunks it received: memory per
  device falls with the devices (`efflm bench context`).
- `allgather`: each device gathers every key and value once per layer and attends its
  query chunk to them (memory O(length) per device); the baseline.

Both run inside `shard_map` over the whole mesh: the batch split as the logical axis
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

from efflm.layers.common import MASKED
from efflm.pallas_kernels.flash_attention import (
    flash_attention_block,
    flash_attention_block_grads,
    partitioned,
)

if TYPE_CHECKING:
    from efflm.config import ModelConfig

AXIS = "sequence"
STRATEGIES = ("auto", "ring", "allgather")  # auto: ring where the kind implements it


def strategy(cfg: ModelConfig, supported: tuple[str, ...], length: int) -> str | None:
    """The strategy a mixer implementing `supported` runs for a length-`length` pass
    under the active mesh: None unless the mesh splits `sequence` (> 1) and divides the
    length (`auto` is the kind's first strategy; a kind with none leaves the split to
    XLA's partitioner, which gathers keys and values)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(AXIS, 1) == 1 or length % mesh.shape[AXIS]:
        return None
    chosen = cfg.attention.context_parallel
    if chosen == "auto":
        return supported[0] if supported else None
    return chosen if chosen in supported else None


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


def _ring_forward(q, k, v, seg, n: int, steps: RingSteps):
    """(output float32, log-sum-exp). Step 0 is the diagonal; at step s the device holds
    chunk me - s, and sends it on while attending to it when it precedes its own."""
    me, perm, q, seg = _ring_geometry(n, q, seg)

    def visit(s, out, lse, k, v, seg_k):
        def earlier(k, v, seg_k):
            return steps.attend(q, k, v, seg, seg_k, diagonal=False)

        def later(k, v, seg_k):
            return jnp.zeros(out.shape, jnp.float32), jnp.full(lse.shape, -jnp.inf)

        return _merge(out, lse, *lax.cond((me - s) % n < me, earlier, later, k, v, seg_k))

    def step(s, carry):
        out, lse, k, v, seg_k = carry
        sent = lax.ppermute((k, v, seg_k), AXIS, perm)
        return (*visit(s, out, lse, k, v, seg_k), *sent)

    out, lse = steps.attend(q, k, v, seg, seg, diagonal=True)
    carry = (out, lse, *lax.ppermute((k, v, seg), AXIS, perm))
    out, lse, k, v, seg_k = lax.fori_loop(1, n - 1, step, carry)
    return visit(n - 1, out, lse, k, v, seg_k)


def _ring_backward(q, k, v, seg, out, lse, dout, n: int, steps: RingSteps):
    """Gradients of q, k, v: keys and values go round the ring again, each with its
    dK, dV accumulator, which after the last step travels once more to its owner."""
    me, perm, q, seg = _ring_geometry(n, q, seg)
    delta = jnp.sum(dout.astype(jnp.float32) * out, axis=-1)  # rowsum dO . O

    def step(s, carry):
        dq, k, v, seg_k, dk, dv = carry
        k, v, seg_k, dk, dv = lax.ppermute((k, v, seg_k, dk, dv), AXIS, perm)

        def earlier(k, v, seg_k):
            return steps.grads(q, k, v, seg, seg_k, dout, lse, delta, diagonal=False)

        def later(k, v, seg_k):
            return jnp.zeros_like(dq), jnp.zeros_like(dk), jnp.zeros_like(dv)

        shares = lax.cond((me - s) % n < me, earlier, later, k, v, seg_k)
        return (dq + shares[0], k, v, seg_k, dk + shares[1], dv + shares[2])

    dq, dk, dv = steps.grads(q, k, v, seg, seg, dout, lse, delta, diagonal=True)
    dq, k, v, seg_k, dk, dv = lax.fori_loop(1, n, step, (dq, k, v, seg, dk, dv))
    dk, dv = lax.ppermute((dk, dv), AXIS, perm)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring(q, k, v, seg, n, steps):
    return _ring_forward(q, k, v, seg, n, steps)[0].astype(q.dtype)


def _ring_fwd(q, k, v, seg, n, steps):
    out, lse = _ring_forward(q, k, v, seg, n, steps)
    return out.astype(q.dtype), (q, k, v, seg, out.astype(q.dtype), lse)


def _ring_bwd(n, steps, residuals, dout):
    q, k, v, seg, out, lse = residuals
    grads = _ring_backward(q, k, v, seg, out.astype(jnp.float32), lse, dout, n, steps)
    return (*grads, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def _ring_local(q, k, v, seg, n: int, steps: RingSteps):
    if steps.pallas:
        return _ring(q, k, v, seg, n, steps)
    b, t, h, d = q.shape
    out = _ring(*_heads_major(q, k, v), seg, n, steps)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _allgather_local(q, k, v, seg):
    b, t, h, d = q.shape
    gather = functools.partial(lax.all_gather, axis_name=AXIS, axis=1, tiled=True)
    mask = chunk_mask(seg, gather(seg), lax.axis_index(AXIS) * t, 0)
    out = _block(*_heads_major(q, gather(k), gather(v)), mask)[0].astype(q.dtype)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def context_parallel_attention(q, k, v, segment_ids, strategy: str, block: int = 0,
                               impl: str = "xla", interpret: bool | None = None):
    """Causal softmax attention of q (batch, length, heads, dim) to k, v (batch, length,
    kv_heads, dim) under the active mesh, the length split over `sequence` by
    `strategy` (ring | allgather); segment_ids (batch, length), None: one document.
    Ring steps run in XLA (`block`: queries in blocks of this many when it divides the
    chunk, scores block x chunk at a time; 0: the whole chunk) or, with impl=pallas, one
    flash-kernel call each (`interpret`: None, interpret mode unless on a GPU);
    all-gather runs in XLA."""
    mesh = jax.sharding.get_abstract_mesh()
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    if strategy == "ring":
        if interpret is None:
            interpret = jax.default_backend() != "gpu"
        steps = RingSteps(pallas=impl == "pallas", block=block, interpret=interpret)
        fn = functools.partial(_ring_local, n=mesh.shape[AXIS], steps=steps)
    elif strategy == "allgather":
        fn = _allgather_local
    else:
        raise ValueError(f"unknown context-parallel strategy {strategy!r}")
    return partitioned(fn, q, k, v, segment_ids, length_axis=AXIS)
