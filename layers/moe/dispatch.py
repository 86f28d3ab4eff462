"""Dispatch: send each (token, expert) pair to its expert and combine the outputs.

Every dispatch takes the tokens `x` (tokens, d), the router's choices `experts` and
`gates` (tokens, k), the expert weights `(gate, up, out)` shaped (E, d, f), (E, d, f),
(E, f, d), the config, and `pairs`: which pairs may run (`keep`, (tokens, k) bool:
padding never does) and, under causal capacity, their slots (`Pairs`). It returns the
combined output (tokens, d) and which pairs ran (tokens, k) bool.

- `dropless_dispatch` ("MegaBlocks: Efficient Sparse Training with Mixture-of-Experts"):
  the pairs sorted by expert, every pair computed, un-sorted, weighted by its gate.
  Backends (`model.moe.impl`): `xla` pads each expert's rows to a multiple of
  `block_rows` and loops over the row blocks, each a matmul with its expert's weights
  (the useful work plus at most `block_rows - 1` padding rows per expert); `ragged`
  is `jax.lax.ragged_dot` (which XLA:CPU computes densely); `pallas` the grouped
  matmul kernel. Padding's pairs are computed with gate 0.
- `capacity_dispatch`: each expert computes a fixed number of slots, gathered into and
  scattered out of an (E, slots, d) buffer; pairs without a slot are dropped.
  `model.moe.capacity_policy=causal` (`efflm.layers.moe.capacity`): each row has
  `ceil(capacity_factor * k * length / E)` slots per expert, granted to a pair by its
  document's position; `batch` (GShard, Switch): the dispatch's tokens share
  `ceil(capacity_factor * n * k / E)` slots per expert (n: the real tokens), filled by
  first choices before second choices, each in token order (not causal).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from efflm.errors import ConfigError
from efflm.layers.common import resolve_impl
from efflm.layers.quant.matmul import (
    expert_format,
    expert_matmul,
    fake_quantize_experts,
    fake_quantize_rows,
    quantize_experts,
)
from efflm.mesh import mesh_axes_of
from efflm.pallas_kernels.grouped_matmul import grouped_matmul

if TYPE_CHECKING:
    from efflm.config import ModelConfig


class Pairs(NamedTuple):
    """Which (token, choice) pairs may run, and where (see the module)."""

    keep: jax.Array  # (tokens, k) bool
    # Causal capacity: each kept pair's slot at its target in its row (tokens, k) int32,
    # the slots each row has per target, and the row length; None: no slots given.
    slot: jax.Array | None = None
    row_slots: int = 0
    length: int = 0


def expert_ffn(rows, gate, up, out, fmt=None, prepared=(None, None, None)):
    """SwiGLU `(silu(x W_gate) * x W_up) W_out` of rows (n, d) with one expert's weights,
    or batched over a leading expert axis; its matmuls in the experts' number format
    `fmt` (`expert_format`; None: plain), with the weights' quantisation `prepared`
    once per expert where given (`quantize_experts`)."""
    mm = expert_matmul(fmt)
    g, u, o = prepared
    return mm(jax.nn.silu(mm(rows, gate, g)) * mm(rows, up, u), out, o)


def _sorted_pairs(flat_experts, num_experts: int):
    """(order, sizes, starts, rank): a stable sort of the pairs by expert, each expert's
    pair count and first sorted position, and each sorted pair's rank in its expert."""
    order = jnp.argsort(flat_experts, stable=True)
    sizes = jnp.zeros((num_experts,), jnp.int32).at[flat_experts].add(1)
    starts = jnp.cumsum(sizes) - sizes
    rank = jnp.arange(flat_experts.shape[0]) - starts[flat_experts[order]]
    return order, sizes, starts, rank


def _blocked(x_sorted, sorted_experts, rank, sizes, weights, block: int, fmt):
    """Rows sorted by expert -> expert outputs, via row blocks of one expert each."""
    pairs, d = x_sorted.shape
    num_experts = sizes.shape[0]
    padded = -(-sizes // block) * block
    padded_starts = jnp.cumsum(padded) - padded
    total = -(-pairs // block) * block + num_experts * block  # >= sum(padded), static
    dest = padded_starts[sorted_experts] + rank
    rows = jnp.zeros((total, d), x_sorted.dtype).at[dest].set(x_sorted)
    block_starts = jnp.arange(total // block) * block
    block_expert = jnp.minimum(
        jnp.searchsorted(jnp.cumsum(padded), block_starts, side="right"), num_experts - 1)

    # In a number format each expert's weights are quantised once, not once per block.
    prepared = (None,) * 3 if fmt is None else tuple(quantize_experts(fmt, w)
                                                     for w in weights)

    def one_block(_, block_and_expert):
        rows, expert = block_and_expert
        w, q = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, expert, keepdims=False),
                            (weights, prepared))
        return None, expert_ffn(rows, *w, fmt, q)

    # A loop over the blocks reads each block's expert weights in place: gathering them
    # for one batched matmul would copy (blocks, d, f) weights forward and backward. The
    # backward recomputes the slices rather than keep them per block.
    one_block = jax.checkpoint(one_block, policy=jax.checkpoint_policies.checkpoint_dots,
                               prevent_cse=False)
    _, y = jax.lax.scan(one_block, None, (rows.reshape(-1, block, d), block_expert))
    return y.reshape(total, d)[dest]


def _grouped(x_sorted, sizes, weights, impl: str, fmt):
    """The experts as grouped matmuls; in a number format `fmt` by fake quantisation
    (the kernel multiplies the dequantised operands)."""
    if fmt is not None:
        weights = tuple(fake_quantize_experts(fmt, w).astype(w.dtype) for w in weights)
    gate, up, out = weights

    def mm(a, w):
        a = a if fmt is None else fake_quantize_rows(fmt, a).astype(a.dtype)
        return grouped_matmul(a, w, sizes, impl=impl)
    return mm(jax.nn.silu(mm(x_sorted, gate)) * mm(x_sorted, up), out)


def block_rows(cfg: ModelConfig, pairs: int) -> int:
    """`model.moe.block_rows`, or for 0 the largest power of two from 8 to 256 whose
    padding (at most block_rows - 1 rows per expert) stays within a quarter of `pairs`."""
    if cfg.moe.block_rows:
        return cfg.moe.block_rows
    fit = max(pairs // (4 * cfg.moe.num_experts), 8)
    return min(256, 1 << (fit.bit_length() - 1))


def dropless_dispatch(x, experts, gates, weights, cfg: ModelConfig, pairs: Pairs):
    tokens, k = experts.shape
    flat = experts.reshape(-1)
    order, sizes, _, rank = _sorted_pairs(flat, cfg.moe.num_experts)
    x_sorted = x[order // k]
    impl = cfg.moe.impl
    if impl != "ragged":
        impl = resolve_impl(impl, ("xla", "pallas"), "MoE dropless dispatch")
    fmt = expert_format(cfg)
    if impl == "xla":
        y = _blocked(x_sorted, flat[order], rank, sizes, weights,
                     block_rows(cfg, flat.shape[0]), fmt)
    else:
        y = _grouped(x_sorted, sizes, weights, "xla" if impl == "ragged" else "pallas", fmt)
    pair_out = jnp.zeros_like(y).at[order].set(y).reshape(tokens, k, -1)
    out = jnp.einsum("tkd,tk->td", pair_out, jnp.where(pairs.keep, gates, 0).astype(
        pair_out.dtype))
    return out, pairs.keep


def expert_capacity(cfg: ModelConfig, tokens: int) -> int:
    """Slots per expert of the batch policy for `tokens` real tokens."""
    moe = cfg.moe
    return max(1, math.ceil(moe.capacity_factor * tokens * moe.top_k / moe.num_experts))


def capacity_rate(cfg: ModelConfig) -> float:
    """Slots per expert per token of the causal policy."""
    return cfg.moe.capacity_factor * cfg.moe.top_k / cfg.moe.num_experts


def batch_slots(targets, keep, num_targets: int, limit, choice_major: bool = True):
    """The batch policy's slots: each kept pair's rank among its target's kept pairs,
    choice-major then in token order (token-major when not `choice_major`), against a
    `limit` (a scalar) -> (slot, kept)."""
    tokens, k = targets.shape
    flip = (lambda a: a.T) if choice_major else (lambda a: a)  # noqa: E731
    flat = jnp.where(flip(keep), flip(targets), num_targets).reshape(-1)
    order, _, _, sorted_rank = _sorted_pairs(flat, num_targets + 1)
    rank = jnp.zeros_like(flat).at[order].set(sorted_rank.astype(flat.dtype))
    rank = flip(rank.reshape(flip(targets).shape))
    return rank, keep & (rank < limit)


def capacity_dispatch(x, experts, gates, weights, cfg: ModelConfig, pairs: Pairs):
    tokens, k = experts.shape
    num_experts = cfg.moe.num_experts
    if pairs.slot is None:  # batch policy: the real tokens set the capacity
        capacity = expert_capacity(cfg, tokens)
        real = jnp.sum(jnp.any(pairs.keep, axis=-1))
        limit = jnp.minimum(capacity, jnp.ceil(
            cfg.moe.capacity_factor * cfg.moe.top_k / num_experts * real))
        slot, kept = batch_slots(experts, pairs.keep, num_experts, limit)
    else:  # causal policy: each row its own slots
        capacity = tokens // pairs.length * pairs.row_slots
        kept = pairs.keep & (pairs.slot < pairs.row_slots)
        row = (jnp.arange(tokens) // pairs.length)[:, None]
        slot = row * pairs.row_slots + pairs.slot
    index = jnp.where(kept, slot, capacity)  # out of range: dropped by the scatter
    token = jnp.broadcast_to(jnp.arange(tokens)[:, None], (tokens, k))
    buffer = jnp.zeros((num_experts, capacity, x.shape[-1]), x.dtype)
    buffer = buffer.at[experts, index].set(x[token], mode="drop")
    y = expert_ffn(buffer, *weights, expert_format(cfg))
    pair_out = jnp.where(kept[..., None], y[experts, jnp.minimum(index, capacity - 1)], 0)
    out = jnp.einsum("tkd,tk->td", pair_out, gates.astype(pair_out.dtype))
    return out, kept


# -- expert parallelism ------------------------------------------------------------------

# `model.moe.dispatch` -> dispatch function.
DISPATCH = {"dropless": dropless_dispatch, "capacity": capacity_dispatch}

EP_EXCHANGES = ("gather_scatter", "all_to_all", "ragged")


def _local_cfg(cfg: ModelConfig, num_experts: int) -> ModelConfig:
    moe = dataclasses.replace(cfg.moe, num_experts=num_experts, dispatch="dropless")
    return dataclasses.replace(cfg, moe=moe)


def _gather_weights(weights, embed_axes):
    """This device's experts with their `embed` dimension whole again (FSDP)."""
    if not embed_axes:
        return weights
    gate, up, out = weights
    gather = lambda w, axis: jax.lax.all_gather(w, embed_axes, axis=axis, tiled=True)  # noqa: E731
    return gather(gate, 1), gather(up, 1), gather(out, 2)


def _gather_scatter(x, experts, gates, weights, pairs, *, cfg, embed_axes, mlp_axes):
    gate, up, out = weights = _gather_weights(weights, embed_axes)
    local = gate.shape[0]
    xs, es, gs, keep = (jax.lax.all_gather(a, "expert", axis=0, tiled=True)
                        for a in (x, experts, gates, pairs.keep))
    first = jax.lax.axis_index("expert") * local
    mine = (es >= first) & (es < first + local)
    y, _ = dropless_dispatch(xs, jnp.where(mine, es - first, 0), gs, weights,
                             _local_cfg(cfg, local), Pairs(mine & keep))
    if mlp_axes:
        y = jax.lax.psum(y, mlp_axes)
    return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True), pairs.keep


def _all_to_all(x, experts, gates, weights, pairs, *, cfg, embed_axes, mlp_axes, ep):
    weights = _gather_weights(weights, embed_axes)
    local = weights[0].shape[0]
    tokens, k = experts.shape
    device = experts // local
    if pairs.slot is None:  # batch policy: in token order over this shard's real tokens
        capacity = max(1, math.ceil(cfg.moe.ep_capacity_factor * tokens * k / ep))
        real = jnp.sum(pairs.keep)
        limit = jnp.minimum(capacity, jnp.ceil(cfg.moe.ep_capacity_factor * real / ep))
        slot, kept = batch_slots(device, pairs.keep, ep, limit, choice_major=False)
    else:  # causal policy: each row its own slots per device
        capacity = tokens // pairs.length * pairs.row_slots
        kept = pairs.keep & (pairs.slot < pairs.row_slots)
        slot = (jnp.arange(tokens) // pairs.length)[:, None] * pairs.row_slots + pairs.slot
    index = jnp.where(kept, slot, capacity)
    token = jnp.broadcast_to(jnp.arange(tokens)[:, None], (tokens, k))
    send = jnp.zeros((ep, capacity, x.shape[-1]), x.dtype).at[device, index].set(
        x[token], mode="drop")
    send_ids = jnp.full((ep, capacity), -1, experts.dtype).at[device, index].set(
        experts % local, mode="drop")
    exchange = lambda a: jax.lax.all_to_all(a, "expert", 0, 0)  # noqa: E731
    rows, ids = exchange(send).reshape(ep * capacity, -1), exchange(send_ids).reshape(-1)
    valid = ids >= 0
    y, _ = dropless_dispatch(rows, jnp.where(valid, ids, 0)[:, None],
                             valid[:, None].astype(jnp.float32), weights,
                             _local_cfg(cfg, local), Pairs(valid[:, None]))
    if mlp_axes:
        y = jax.lax.psum(y, mlp_axes)
    back = exchange(y.reshape(ep, capacity, -1))
    pair_out = jnp.where(kept[..., None], back[device, jnp.minimum(index, capacity - 1)], 0)
    out = jnp.einsum("tkd,tk->td", pair_out, gates.astype(pair_out.dtype))
    return out, kept


def _per_shard(x, experts, gates, weights, pairs, *, cfg, embed_axes, mlp_axes):
    y, kept = DISPATCH[cfg.moe.dispatch](x, experts, gates,
                                         _gather_weights(weights, embed_axes), cfg, pairs)
    if mlp_axes:
        y = jax.lax.psum(y, mlp_axes)
    return y, kept


def sharded_dispatch(x, experts, gates, weights, cfg: ModelConfig, pairs: Pairs, mesh,
                     rows: int):
    """The dispatch under a mesh, in shard_map: tokens split as the batch is (XLA would
    otherwise partition the sort and scatter of a global dispatch poorly), expert weights
    as their logical axes say (their `embed` dimension gathered inside for FSDP, their
    gradients reduce-scattered by the transpose). With `mesh.expert` > 1 the experts are
    split over that axis and tokens exchanged (`model.moe.ep_exchange`); otherwise each
    shard runs `model.moe.dispatch` on its own tokens (a batch-policy capacity then
    applies per shard; causal slots are per row, which a shard holds whole: the tokens
    are split as their `rows` sequences are)."""
    from jax.sharding import PartitionSpec as P

    exchange = cfg.moe.ep_exchange
    if exchange == "ragged" and mesh.shape["expert"] > 1:
        raise ConfigError("model.moe.ep_exchange=ragged (jax.lax.ragged_all_to_all) is not "
                          "implemented: XLA:CPU lacks the collective and it has not run on "
                          "GPUs; use gather_scatter or all_to_all")
    ep = mesh.shape["expert"]
    token_axes = mesh_axes_of(mesh, "batch", rows)
    embed_axes = mesh_axes_of(mesh, "embed", cfg.d_model)
    mlp_axes = mesh_axes_of(mesh, "mlp", cfg.moe.expert_d_ff)
    tok = P(token_axes or None, None)
    w_in = P("expert", embed_axes or None, mlp_axes or None)
    w_out = P("expert", mlp_axes or None, embed_axes or None)
    kw = dict(cfg=cfg, embed_axes=embed_axes, mlp_axes=mlp_axes)
    if ep == 1:
        body = functools.partial(_per_shard, **kw)
    elif exchange == "all_to_all":
        body = functools.partial(_all_to_all, ep=ep, **kw)
    else:
        body = functools.partial(_gather_scatter, **kw)
    slots = () if pairs.slot is None else (pairs.slot,)

    def run(x, e, g, keep, *rest):
        *slot, gate, up, out = rest
        return body(x, e, g, (gate, up, out),
                    pairs._replace(keep=keep, slot=slot[0] if slot else None))

    return jax.shard_map(run, mesh=mesh, in_specs=(tok,) * (4 + len(slots)) + (
        w_in, w_in, w_out), out_specs=(tok, tok), check_vma=False)(
        x, experts, gates, pairs.keep, *slots, *weights)
