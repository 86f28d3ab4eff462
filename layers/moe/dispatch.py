"""Dispatch: send each (token, expert) pair to its expert and combine the outputs.

Every dispatch takes the tokens `x` (tokens, d), the router's choices `experts` and
`gates` (tokens, k), the expert weights `(gate, up, out)` shaped (E, d, f), (E, d, f),
(E, f, d), and the config; it returns the combined output (tokens, d) and the fraction
of pairs dropped.

- `dropless_dispatch` ("MegaBlocks: Efficient Sparse Training with Mixture-of-Experts"):
  the pairs sorted by expert, every pair computed, un-sorted, weighted by its gate.
  Backends (`model.moe.impl`): `xla` pads each expert's rows to a multiple of
  `block_rows` and loops over the row blocks, each a matmul with its expert's weights
  (the useful work plus at most `block_rows - 1` padding rows per expert); `ragged`
  is `jax.lax.ragged_dot` (which XLA:CPU computes densely); `pallas` the grouped
  matmul kernel.
- `capacity_dispatch` (GShard, Switch): each expert has
  `ceil(capacity_factor * tokens * k / E)` slots, filled by first choices before
  second choices, each in token order; pairs beyond a full expert are dropped.
  Gather/scatter in and out of an (E, capacity, d) buffer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from efflm.errors import ConfigError
from efflm.layers.common import resolve_impl
from efflm.mesh import mesh_axes_of
from efflm.pallas_kernels.grouped_matmul import grouped_matmul

if TYPE_CHECKING:
    from efflm.config import ModelConfig


def expert_ffn(rows, gate, up, out, spec: str = "nbd,ndf->nbf", back: str = "nbf,nfd->nbd"):
    """SwiGLU `(silu(x W_gate) * x W_up) W_out`, batched over a leading axis."""
    h = jax.nn.silu(jnp.einsum(spec, rows, gate)) * jnp.einsum(spec, rows, up)
    return jnp.einsum(back, h, out)


def _sorted_pairs(flat_experts, num_experts: int):
    """(order, sizes, starts, rank): a stable sort of the pairs by expert, each expert's
    pair count and first sorted position, and each sorted pair's rank in its expert."""
    order = jnp.argsort(flat_experts, stable=True)
    sizes = jnp.zeros((num_experts,), jnp.int32).at[flat_experts].add(1)
    starts = jnp.cumsum(sizes) - sizes
    rank = jnp.arange(flat_experts.shape[0]) - starts[flat_experts[order]]
    return order, sizes, starts, rank


def _blocked(x_sorted, sorted_experts, rank, sizes, weights, block: int):
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

    def one_block(_, block_and_expert):
        rows, expert = block_and_expert
        w = (jax.lax.dynamic_index_in_dim(w, expert, keepdims=False) for w in weights)
        return None, expert_ffn(rows, *w, spec="bd,df->bf", back="bf,fd->bd")

    # A loop over the blocks reads each block's expert weights in place: gathering them
    # for one batched matmul would copy (blocks, d, f) weights forward and backward. The
    # backward recomputes the slices rather than keep them per block.
    one_block = jax.checkpoint(one_block, policy=jax.checkpoint_policies.checkpoint_dots,
                               prevent_cse=False)
    _, y = jax.lax.scan(one_block, None, (rows.reshape(-1, block, d), block_expert))
    return y.reshape(total, d)[dest]


def _grouped(x_sorted, sizes, weights, impl: str):
    gate, up, out = weights
    mm = lambda a, w: grouped_matmul(a, w, sizes, impl=impl)  # noqa: E731
    return mm(jax.nn.silu(mm(x_sorted, gate)) * mm(x_sorted, up), out)


def block_rows(cfg: ModelConfig, pairs: int) -> int:
    """`model.moe.block_rows`, or for 0 the largest power of two from 8 to 256 whose
    padding (at most block_rows - 1 rows per expert) stays within a quarter of `pairs`."""
    if cfg.moe.block_rows:
        return cfg.moe.block_rows
    fit = max(pairs // (4 * cfg.moe.num_experts), 8)
    return min(256, 1 << (fit.bit_length() - 1))


def dropless_dispatch(x, experts, gates, weights, cfg: ModelConfig):
    tokens, k = experts.shape
    flat = experts.reshape(-1)
    order, sizes, _, rank = _sorted_pairs(flat, cfg.moe.num_experts)
    x_sorted = x[order // k]
    impl = cfg.moe.impl
    if impl != "ragged":
        impl = resolve_impl(impl, ("xla", "pallas"), "MoE dropless dispatch")
    if impl == "xla":
        y = _blocked(x_sorted, flat[order], rank, sizes, weights,
                     block_rows(cfg, flat.shape[0]))
    else:
        y = _grouped(x_sorted, sizes, weights, "xla" if impl == "ragged" else "pallas")
    pair_out = jnp.zeros_like(y).at[order].set(y).reshape(tokens, k, -1)
    out = jnp.einsum("tkd,tk->td", pair_out, gates.astype(pair_out.dtype))
    return out, jnp.zeros((), jnp.float32)


def expert_capacity(cfg: ModelConfig, tokens: int) -> int:
    moe = cfg.moe
    return max(1, math.ceil(moe.capacity_factor * tokens * moe.top_k / moe.num_experts))


def capacity_dispatch(x, experts, gates, weights, cfg: ModelConfig):
    tokens, k = experts.shape
    capacity = expert_capacity(cfg, tokens)
    flat = experts.T.reshape(-1)  # choice-major: all first choices, then second, ...
    order, _, _, sorted_rank = _sorted_pairs(flat, cfg.moe.num_experts)
    rank = jnp.zeros_like(flat).at[order].set(sorted_rank.astype(flat.dtype))
    keep = rank < capacity
    token = jnp.arange(flat.shape[0]) % tokens
    buffer = jnp.zeros((cfg.moe.num_experts, capacity, x.shape[-1]), x.dtype)
    buffer = buffer.at[flat, rank].set(x[token], mode="drop")
    y = expert_ffn(buffer, *weights)
    pair_out = jnp.where(keep[:, None], y[flat, jnp.minimum(rank, capacity - 1)], 0)
    out = jnp.einsum("ktd,kt->td", pair_out.reshape(k, tokens, -1),
                     gates.T.astype(pair_out.dtype))
    return out, 1.0 - jnp.mean(keep.astype(jnp.float32))


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


def _gather_scatter(x, experts, gates, weights, *, cfg, embed_axes, mlp_axes):
    gate, up, out = weights = _gather_weights(weights, embed_axes)
    local = gate.shape[0]
    xs, es, gs = (jax.lax.all_gather(a, "expert", axis=0, tiled=True)
                  for a in (x, experts, gates))
    first = jax.lax.axis_index("expert") * local
    mine = (es >= first) & (es < first + local)
    y, _ = dropless_dispatch(xs, jnp.where(mine, es - first, 0), jnp.where(mine, gs, 0),
                             weights, _local_cfg(cfg, local))
    if mlp_axes:
        y = jax.lax.psum(y, mlp_axes)
    return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True), \
        jnp.zeros((), jnp.float32)


def _all_to_all(x, experts, gates, weights, *, cfg, embed_axes, mlp_axes, ep, all_axes):
    weights = _gather_weights(weights, embed_axes)
    local = weights[0].shape[0]
    tokens, k = experts.shape
    capacity = max(1, math.ceil(cfg.moe.ep_capacity_factor * tokens * k / ep))
    flat = experts.reshape(-1)
    device = flat // local
    order, _, _, sorted_rank = _sorted_pairs(device, ep)
    rank = jnp.zeros_like(flat).at[order].set(sorted_rank.astype(flat.dtype))
    keep = rank < capacity
    send = jnp.zeros((ep, capacity, x.shape[-1]), x.dtype).at[device, rank].set(
        x[jnp.arange(flat.shape[0]) // k], mode="drop")
    send_ids = jnp.full((ep, capacity), -1, flat.dtype).at[device, rank].set(
        flat % local, mode="drop")
    exchange = lambda a: jax.lax.all_to_all(a, "expert", 0, 0)  # noqa: E731
    rows, ids = exchange(send).reshape(ep * capacity, -1), exchange(send_ids).reshape(-1)
    valid = ids >= 0
    y, _ = dropless_dispatch(rows, jnp.where(valid, ids, 0)[:, None],
                             valid[:, None].astype(jnp.float32), weights,
                             _local_cfg(cfg, local))
    if mlp_axes:
        y = jax.lax.psum(y, mlp_axes)
    back = exchange(y.reshape(ep, capacity, -1))
    pair_out = jnp.where(keep[:, None], back[device, jnp.minimum(rank, capacity - 1)], 0)
    out = jnp.einsum("tkd,tk->td", pair_out.reshape(tokens, k, -1),
                     gates.astype(pair_out.dtype))
    return out, jax.lax.pmean(1.0 - jnp.mean(keep.astype(jnp.float32)), all_axes)


def _per_shard(x, experts, gates, weights, *, cfg, embed_axes, mlp_axes, all_axes):
    y, dropped = DISPATCH[cfg.moe.dispatch](x, experts, gates,
                                            _gather_weights(weights, embed_axes), cfg)
    if mlp_axes:
        y = jax.lax.psum(y, mlp_axes)
    return y, jax.lax.pmean(dropped, all_axes)


def sharded_dispatch(x, experts, gates, weights, cfg: ModelConfig, mesh):
    """The dispatch under a mesh, in shard_map: tokens split as the batch is (XLA would
    otherwise partition the sort and scatter of a global dispatch poorly), expert weights
    as their logical axes say (their `embed` dimension gathered inside for FSDP, their
    gradients reduce-scattered by the transpose). With `mesh.expert` > 1 the experts are
    split over that axis and tokens exchanged (`model.moe.ep_exchange`); otherwise each
    shard runs `model.moe.dispatch` on its own tokens (a capacity then applies per
    shard)."""
    from jax.sharding import PartitionSpec as P

    exchange = cfg.moe.ep_exchange
    if exchange == "ragged" and mesh.shape["expert"] > 1:
        raise ConfigError("model.moe.ep_exchange=ragged (jax.lax.ragged_all_to_all) is not "
                          "implemented: XLA:CPU lacks the collective and it has not run on "
                          "GPUs; use gather_scatter or all_to_all")
    ep = mesh.shape["expert"]
    token_axes = mesh_axes_of(mesh, "batch", x.shape[0])
    embed_axes = mesh_axes_of(mesh, "embed", cfg.d_model)
    mlp_axes = mesh_axes_of(mesh, "mlp", cfg.moe.expert_d_ff)
    tok = P(token_axes or None, None)
    w_in = P("expert", embed_axes or None, mlp_axes or None)
    w_out = P("expert", mlp_axes or None, embed_axes or None)
    kw = dict(cfg=cfg, embed_axes=embed_axes, mlp_axes=mlp_axes)
    all_axes = tuple(mesh.axis_names)
    if ep == 1:
        body = functools.partial(_per_shard, all_axes=all_axes, **kw)
    elif exchange == "all_to_all":
        body = functools.partial(_all_to_all, ep=ep, all_axes=all_axes, **kw)
    else:
        body = functools.partial(_gather_scatter, **kw)
    return jax.shard_map(lambda x, e, g, *w: body(x, e, g, w), mesh=mesh,
                         in_specs=(tok, tok, tok, w_in, w_in, w_out), out_specs=(tok, P()),
                         check_vma=False)(x, experts, gates, *weights)
