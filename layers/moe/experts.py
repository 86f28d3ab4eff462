"""The Mixture-of-Experts MLP (`model.mlp.kind=moe`, settings under `model.moe`).

SwiGLU experts of their own width (`expert_d_ff`; many small ones are fine-grained
experts, "Towards Greater Leverage: Scaling Laws for Efficient Mixture-of-Experts
Language Models"), optional shared experts that every token uses, a router from
`efflm.layers.moe.ROUTERS` and a dispatch from `DISPATCH`. `moe_reference` is the
plain per-token loop the fast paths are tested against.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efflm.errors import ConfigError, check_choice, check_positive
from efflm.layers.common import decoding, param_dtype, sow_stat
from efflm.layers.contract import FeedForward
from efflm.layers.mlp.swiglu import SwiGLU
from efflm.layers.moe import DISPATCH, ROUTERS
from efflm.layers.moe.capacity import (
    causal_pairs,
    causal_picks,
    counters_init,
    documents,
    row_capacity,
)
from efflm.layers.moe.dispatch import EP_EXCHANGES, Pairs, capacity_rate, sharded_dispatch
from efflm.layers.moe.topk import real_tokens, token_mean
from efflm.layers.quant.matmul import fake_quantize_experts, fake_quantize_rows, sparsify
from efflm.mesh import mesh_axes_of

if TYPE_CHECKING:
    from efflm.config import ModelConfig

IMPLS = ("auto", "xla", "ragged", "pallas")
CAPACITY_POLICIES = ("causal", "batch")


@dataclass
class MoESettings:
    """`model.moe`: what every router shares; each router's own settings are under
    `model.moe.<router>`."""

    num_experts: int = 8
    top_k: int = 2
    expert_d_ff: int = 512  # each expert's hidden width (small: fine-grained experts)
    num_shared_experts: int = 0  # experts every token uses, beside the routed ones
    router: str = "topk"
    renormalize: bool = True  # divide the k gates by their sum
    jitter: float = 0.0  # training only: router input times uniform(1 - jitter, 1 + jitter)
    balance_loss: float = 0.01  # weight of E * sum_i f_i * P_i
    router_z_loss: float = 0.001  # weight of mean(logsumexp(logits)^2)
    # dropless: every (token, expert) pair is computed; capacity: each expert computes
    # about capacity_factor * top_k / num_experts slots per token, granted by
    # capacity_policy: causal (by position in the document, `efflm.layers.moe.capacity`)
    # or batch (first choices first, in token order over the batch; not causal).
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    capacity_policy: str = "causal"
    # dropless backend. xla: each expert's rows padded to a multiple of `block_rows` and
    # a loop of matmuls over the row blocks (only useful work plus padding); ragged:
    # jax.lax.ragged_dot (computed densely by XLA:CPU); pallas: the grouped matmul
    # kernel. auto: pallas on GPU, xla elsewhere.
    impl: str = "auto"
    # With mesh.expert > 1 the experts are split over the `expert` mesh axis and tokens
    # are exchanged, inside shard_map. gather_scatter: every device gathers its expert
    # group's tokens, computes its experts' share, and the outputs are reduce-scattered
    # (dropless). all_to_all: the pairs are sent to their experts' devices, each taking
    # about ep_capacity_factor * top_k / mesh.expert pairs per token (granted by
    # capacity_policy), the rest dropped and counted. Under expert parallelism the local
    # experts run the dropless dispatch.
    ep_exchange: str = "gather_scatter"
    ep_capacity_factor: float = 2.0
    # 0: the largest power of two (8 to 256) with num_experts * block_rows at most a
    # quarter of the (token, expert) pairs, which bounds the padding to that quarter.
    block_rows: int = 0


def _expert_init(std: float, axes):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _sharded(mesh, rows: int) -> bool:
    """Whether the dispatch runs per shard: under a mesh of several devices whose batch
    axes split these rows (sequences), the `expert` axis among them when it is > 1 (a
    batch they do not divide, as at init, runs as one global dispatch)."""
    if mesh.empty or mesh.size == 1:
        return False
    axes = mesh_axes_of(mesh, "batch", rows)
    return bool(axes) and (mesh.shape.get("expert", 1) == 1 or "expert" in axes)


def _expert_parallel(cfg: ModelConfig, rows: int) -> int:
    """`mesh.expert` when the dispatch of these rows runs expert-parallel, else 1."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.shape.get("expert", 1) if _sharded(mesh, rows) else 1


class MoE(FeedForward):
    """Mixture-of-Experts MLP; under a mesh the dispatch runs per shard, its experts
    split over devices with `mesh.expert` > 1 (`sharded_dispatch`)."""

    @staticmethod
    def no_decay(cfg: ModelConfig) -> tuple[str, ...]:
        return ROUTERS[cfg.moe.router].no_decay(cfg)

    @staticmethod
    def takes_carry(cfg: ModelConfig) -> bool:
        """Whether the layer carry passes through: when the router carries state."""
        return ROUTERS[cfg.moe.router].takes_carry(cfg)

    @staticmethod
    def initial_carry(cfg: ModelConfig, x) -> dict:
        return ROUTERS[cfg.moe.router].initial_carry(cfg, x)

    @nn.compact
    def __call__(self, x, carry: dict | None = None, *, segment_ids=None):
        """`x` (batch, length, d_model), or (tokens, d_model) as one sequence -> the
        output, or `(output, carry)` when given the layer carry (which a router that
        takes one reads and updates). `segment_ids` (batch, length): 0 marks padding,
        which gets no expert and is in no load, loss or statistic."""
        cfg, moe = self.cfg, self.cfg.moe
        shape = x.shape
        sequences = x if x.ndim == 3 else x[None]
        batch, length, d = sequences.shape
        tokens = sequences.reshape(-1, d)
        start = self.initial_carry(cfg, sequences) if carry is None else carry
        routing, new_carry = ROUTERS[moe.router](cfg, name="router")(
            sequences, start, segment_ids)
        e, f = moe.num_experts, moe.expert_d_ff
        pdt = param_dtype(cfg.param_dtype)
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        weights = (
            self.param("gate", _expert_init(cfg.init_std, ("expert", "embed", "mlp")),
                       (e, d, f), pdt),
            self.param("up", _expert_init(cfg.init_std, ("expert", "embed", "mlp")),
                       (e, d, f), pdt),
            self.param("out", _expert_init(out_std, ("expert", "mlp", "embed")), (e, f, d),
                       pdt))
        if cfg.sparsity.nm and "experts" in cfg.quant.targets:  # each expert's own mask
            weights = tuple(
                sparsify(self, cfg.sparsity, w, 1, axes, f"nm_mask_{name}", in_axis=1)
                for w, name, axes in zip(weights, ("gate", "up", "out"), (
                    ("expert", "embed", "mlp"), ("expert", "embed", "mlp"),
                    ("expert", "mlp", "embed"))))
        weights = tuple(w.astype(cfg.dtype) for w in weights)
        if routing.rows is None:
            asking, pairs = self._pairs(routing.experts.reshape(batch, length, -1),
                                        segment_ids)
            out, kept = self._dispatch(tokens, routing.experts, routing.gates, weights, cfg,
                                       pairs, batch)
            self._statistics(routing, asking, kept, segment_ids, (batch, length))
        else:
            out, kept = self._dispatch_rows(sequences, routing, weights)
            self._statistics(routing, None, kept, segment_ids, (batch, length))
        out = out.reshape(shape).astype(cfg.dtype)
        if moe.num_shared_experts:  # on (batch, length, d): its sharding constraints fit
            out = out + SwiGLU(cfg, d_ff=moe.num_shared_experts * f, name="shared")(x)
        return out if carry is None else (out, new_carry)

    def _pairs(self, experts, segment_ids) -> tuple[jax.Array, Pairs]:
        """The real tokens' choices (tokens, k), and which may run: all of them, or under
        causal capacity (the capacity dispatch, or the all_to_all exchange) those the
        rule keeps, with their slots, decided per document and, while decoding, from the
        slot counters in the `cache`."""
        cfg, moe = self.cfg, self.cfg.moe
        batch, length, k = experts.shape
        ep = _expert_parallel(cfg, batch)
        if ep > 1 and moe.ep_exchange == "all_to_all":
            targets, count, rate = experts // (moe.num_experts // ep), ep, (
                moe.ep_capacity_factor * k / ep)
        elif ep == 1 and moe.dispatch == "capacity":
            targets, count, rate = experts, moe.num_experts, capacity_rate(cfg)
        else:
            targets = None
        asking = jnp.broadcast_to(documents(segment_ids, batch, length)[0][..., None],
                                  experts.shape)
        if targets is None or moe.capacity_policy != "causal":
            return asking.reshape(-1, k), Pairs(asking.reshape(-1, k))
        counters = None
        if decoding(self):  # the slot counters, carried from token to token
            counters = self.variable("cache", "capacity", counters_init, batch, count)
        keep, slot, after = causal_pairs(targets, asking, rate, segment_ids, count,
                                         None if counters is None else counters.value)
        if counters is not None:
            counters.value = after
        # A decoded chunk continues its document: its pairs may need up to a slot each.
        row_slots = length if counters is not None else row_capacity(rate, length)
        return asking.reshape(-1, k), Pairs(keep.reshape(-1, k), slot.reshape(-1, k),
                                            row_slots, length)

    @staticmethod
    def _dispatch(tokens, experts, gates, weights, cfg, pairs: Pairs, rows: int):
        """Under a mesh whose batch axes split the `rows` (sequences) the tokens come in,
        per shard (`sharded_dispatch`); otherwise one dispatch."""
        args = (tokens.astype(cfg.dtype), experts, gates, weights, cfg, pairs)
        mesh = jax.sharding.get_abstract_mesh()
        if _sharded(mesh, rows):
            return sharded_dispatch(*args, mesh, rows)
        return DISPATCH[cfg.moe.dispatch](*args)

    def _dispatch_rows(self, x, routing, weights):
        """A per-sequence router's rows: each row one (token, expert) pair, gathered from
        its sequence, dispatched as a token with one choice, summed back into its token.
        A capacity dispatch gets each expert's share of the rows as its capacity (exact
        for expert choice, whose experts have equal rows in every sequence; the sharded
        path splits whole sequences). Returns the output and the used rows (computed, gate
        not 0)."""
        cfg = self.cfg
        batch, length, d = x.shape
        rows = routing.rows.shape[1]
        x_rows = jnp.take_along_axis(x, routing.rows[..., None], axis=1).reshape(-1, d)
        one = dataclasses.replace(cfg, moe=dataclasses.replace(
            cfg.moe, top_k=1, capacity_factor=1.0, capacity_policy="batch"))
        every = jnp.ones((batch * rows, 1), bool)
        out_rows, computed = self._dispatch(
            x_rows, routing.experts.reshape(-1, 1), routing.gates.reshape(-1, 1), weights,
            one, Pairs(every), batch)
        out = jnp.zeros((batch, length, d), jnp.float32).at[
            jnp.arange(batch)[:, None], routing.rows].add(
            out_rows.reshape(batch, rows, d).astype(jnp.float32))
        return out, (routing.gates != 0) & computed.reshape(batch, rows)

    def _statistics(self, routing, asking, kept, segment_ids, shape):
        """Load per expert as requested (the real tokens' choices) and as processed
        (after drops), each over the mean requested load (1: an even share); per-token
        expert counts; the dropped fraction; the router's entropy."""
        moe = self.cfg.moe
        batch, length = shape
        valid = real_tokens(segment_ids, batch * length)
        per_token = routing.rows is not None
        if per_token:  # a row per used pair: requested is what is processed
            asking = kept
            counts = jnp.zeros((batch, length), jnp.float32).at[
                jnp.arange(batch)[:, None], routing.rows].add(kept.astype(jnp.float32))
        else:
            counts = jnp.sum(kept, axis=-1).astype(jnp.float32)
        experts = routing.experts.reshape(-1)

        def load(mask):
            return jnp.zeros((moe.num_experts,), jnp.float32).at[experts].add(
                mask.reshape(-1).astype(jnp.float32))

        requested = load(asking)
        mean = jnp.maximum(jnp.mean(requested), 1e-9)
        counts = counts.reshape(-1)
        if not ROUTERS[moe.router].balanced:
            sow_stat(self, "expert_load_max", jnp.max(requested) / mean, reduce="max")
            sow_stat(self, "expert_load_min", jnp.min(requested) / mean, reduce="min")
            sow_stat(self, "expert_load_cv", jnp.std(requested) / mean)
        if not per_token:
            processed = load(kept) / mean
            sow_stat(self, "expert_processed_load_max", jnp.max(processed), reduce="max")
            sow_stat(self, "expert_processed_load_min", jnp.min(processed), reduce="min")
            sow_stat(self, "moe_dropped_fraction",
                     1.0 - jnp.sum(kept) / jnp.maximum(jnp.sum(asking), 1))
        else:
            sow_stat(self, "moe_experts_per_token_mean", token_mean(counts, valid))
            sow_stat(self, "moe_experts_per_token_max", jnp.max(counts * valid), reduce="max")
        sow_stat(self, "moe_tokens_without_expert", token_mean(
            (counts == 0).astype(jnp.float32), valid))
        p = routing.probs
        entropy = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1)
        sow_stat(self, "router_entropy", token_mean(entropy, valid))

    @staticmethod
    def quant_targets(cfg: ModelConfig) -> tuple[str, ...]:
        """Routed experts: `experts`; shared experts are a SwiGLU: `mlp`."""
        return ("experts", "mlp") if cfg.moe.num_shared_experts else ("experts",)

    @staticmethod
    def routed_rows_per_token(cfg: ModelConfig, seq_len: int = 0) -> float:
        """Expert rows a token costs: the router's `rows_per_token` (top_k for token
        choice; a per-sequence router's static rows over the sequence)."""
        return ROUTERS[cfg.moe.router].rows_per_token(cfg, seq_len)

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
        """Active FLOPs: the router, the routed expert rows and the shared experts.
        Dispatch padding (capacity slots, dropless row blocks) is not counted; a
        per-sequence router's rows are all counted, used or not."""
        moe = cfg.moe
        expert = 2 * 3 * cfg.d_model * moe.expert_d_ff
        return (ROUTERS[moe.router].flops_per_token(cfg)
                + (MoE.routed_rows_per_token(cfg, seq_len) + moe.num_shared_experts) * expert)

    @staticmethod
    def inactive_params(cfg: ModelConfig) -> int:
        """Parameters a token does not use: the experts it is not routed to (for a
        per-sequence router, the experts beyond its rows per token, long-sequence limit)."""
        moe = cfg.moe
        unused = moe.num_experts - MoE.routed_rows_per_token(cfg)
        return round(unused * 3 * cfg.d_model * moe.expert_d_ff)

    @staticmethod
    def not_causal(cfg: ModelConfig) -> str:
        """Why this layer's outputs depend on later tokens ("" when they do not)."""
        moe = cfg.moe
        if ROUTERS[moe.router].not_causal(cfg):
            return ROUTERS[moe.router].not_causal(cfg)
        if moe.capacity_policy == "batch" and moe.dispatch == "capacity":
            return ("model.moe.capacity_policy=batch is not causal: a pair's capacity slot "
                    "depends on the whole batch's choices")
        if moe.capacity_policy == "batch" and moe.ep_exchange == "all_to_all":
            return ("model.moe.capacity_policy=batch is not causal under "
                    "model.moe.ep_exchange=all_to_all: a pair's place in its device's "
                    "capacity depends on the whole shard's choices")
        return ""

    @staticmethod
    def check_mesh(cfg: ModelConfig, mesh_shape: dict) -> None:
        moe, ep = cfg.moe, mesh_shape.get("expert", 1)
        ROUTERS[moe.router].check_mesh(cfg, mesh_shape)
        if moe.num_experts % ep:
            raise ConfigError(f"model.moe.num_experts={moe.num_experts} is not divisible by "
                              f"mesh.expert={ep}")
        if ep > 1 and moe.dispatch != "dropless":
            raise ConfigError(f"model.moe.dispatch={moe.dispatch} under mesh.expert={ep}: "
                              "the experts of each device run dropless; the all_to_all "
                              "exchange has its own model.moe.ep_capacity_factor")
        sequence = mesh_shape.get("sequence", 1)
        causal = (moe.dispatch == "capacity" or (ep > 1 and moe.ep_exchange == "all_to_all"))
        if sequence > 1 and causal and moe.capacity_policy == "causal":
            raise ConfigError(f"model.moe.capacity_policy=causal under mesh.sequence="
                              f"{sequence}: its slot counts run along whole rows, which "
                              "that mesh splits; use mesh.sequence=1 or "
                              "model.moe.dispatch=dropless")
        if moe.expert_d_ff % mesh_shape.get("tensor", 1):
            raise ConfigError(f"model.moe.expert_d_ff={moe.expert_d_ff} is not divisible by "
                              f"mesh.tensor={mesh_shape['tensor']}")

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        moe = cfg.moe
        check_choice("model.moe.ep_exchange", moe.ep_exchange, EP_EXCHANGES)
        if not moe.ep_capacity_factor > 0:
            raise ConfigError(f"model.moe.ep_capacity_factor must be > 0, got "
                              f"{moe.ep_capacity_factor}")
        check_choice("model.moe.router", moe.router, ROUTERS)
        check_choice("model.moe.dispatch", moe.dispatch, DISPATCH)
        check_choice("model.moe.impl", moe.impl, IMPLS)
        check_choice("model.moe.capacity_policy", moe.capacity_policy, CAPACITY_POLICIES)
        for key in ("num_experts", "top_k", "expert_d_ff"):
            check_positive(f"model.moe.{key}", getattr(moe, key))
        for key in ("num_shared_experts", "balance_loss", "router_z_loss", "jitter",
                    "block_rows"):
            check_positive(f"model.moe.{key}", getattr(moe, key), allow_zero=True)
        if moe.top_k > moe.num_experts:
            raise ConfigError(f"model.moe.top_k={moe.top_k} is larger than "
                              f"model.moe.num_experts={moe.num_experts}")
        if not moe.capacity_factor > 0:
            raise ConfigError(f"model.moe.capacity_factor must be > 0, got "
                              f"{moe.capacity_factor}")
        if moe.jitter >= 1:
            raise ConfigError(f"model.moe.jitter must be in [0, 1), got {moe.jitter}")
        ROUTERS[moe.router].validate_config(cfg)  # the router's own settings

    @staticmethod
    def check_plan(cfg: ModelConfig, plan: tuple) -> None:
        """A router that carries state from one MoE layer to the next needs two or more
        of them, and every token in each (no routed layers)."""
        moe = cfg.moe
        ROUTERS[moe.router].check_plan(cfg, plan)
        if not MoE.takes_carry(cfg):
            return
        moe_layers = sum(s.mlp_kind is MoE for s in plan)
        if moe_layers < 2:
            raise ConfigError(f"model.moe.router={moe.router} carries router state from one "
                              f"MoE layer to the next, but this model has {moe_layers} MoE "
                              "layer(s); use two or more, or another router")
        if any(s.routed for s in plan):
            raise ConfigError(f"model.moe.router={moe.router} carries per-token router state "
                              f"through every layer, which the routed layers of "
                              f"model.depth.kind={cfg.depth.kind} skip for some tokens; "
                              "use another router or depth kind")


def moe_reference(x, experts, gates, weights, capacity: float | None = None,
                  policy: str = "causal", segment_ids=None, fmt=None):
    """Every expert on every token, each token's output the sum over its kept choices of
    `gate * expert(x_t)` (differentiable in `x`, `gates` and `weights`). `x` (batch,
    length, d); `experts` (batch * length, k) concrete, `gates` the same shape. With
    `capacity` (slots per expert per token, `capacity_factor * k / E`) the kept pairs
    follow `policy`: causal by `causal_picks`, batch by a loop over choices then tokens
    that takes the real tokens' pairs while their expert has fewer than
    `ceil(capacity * real tokens)`.
    Padding (segment 0) keeps nothing. With a number format `fmt`, every expert matmul
    takes fake-quantised operands: x per token, each expert's weights, and the hidden
    activations per (token, expert). Returns (output (batch, length, d), kept (batch *
    length, k) bool)."""
    batch, length, _ = x.shape
    experts = np.asarray(experts).reshape(batch, length, -1)
    k = experts.shape[-1]
    seg = np.ones((batch, length), int) if segment_ids is None else np.asarray(segment_ids)
    asking = np.broadcast_to((seg > 0)[..., None], experts.shape)
    if capacity is None:
        keep = asking.copy()
    elif policy == "causal":
        keep = causal_picks(experts, asking, capacity, seg)
    else:
        flat, ask = experts.reshape(-1, k), asking.reshape(-1, k)
        slots = math.ceil(capacity * ask[:, 0].sum() - 1e-6)
        keep, taken = np.zeros(flat.shape, bool), np.zeros(weights[0].shape[0], int)
        for j in range(k):
            for t in range(flat.shape[0]):
                if ask[t, j] and taken[flat[t, j]] < slots:
                    keep[t, j] = True
                    taken[flat[t, j]] += 1
        keep = keep.reshape(experts.shape)
    gate_w, up_w, out_w = weights
    rows = lambda a: a  # noqa: E731
    if fmt is not None:
        gate_w, up_w, out_w = (fake_quantize_experts(fmt, w) for w in weights)

        def rows(a):  # quantised along the last axis, one scale per row
            return fake_quantize_rows(fmt, a.reshape(-1, a.shape[-1])).reshape(a.shape)
    h = jax.nn.silu(jnp.einsum("bld,edf->blef", rows(x), gate_w)) * jnp.einsum(
        "bld,edf->blef", rows(x), up_w)
    every = jnp.einsum("blef,efd->bled", rows(h), out_w)
    chosen = np.eye(gate_w.shape[0], dtype=np.float32)[experts] * keep[..., None]
    weight = jnp.einsum("blke,blk->ble", chosen, gates.reshape(experts.shape))
    return jnp.einsum("bled,ble->bld", every, weight), keep.reshape(-1, k)
