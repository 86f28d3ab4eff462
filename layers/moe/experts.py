"""The Mixture-of-Experts MLP (`model.mlp.kind=moe`, settings under `model.moe`).

SwiGLU experts of their own width (`expert_d_ff`; many small ones are fine-grained
experts, "Towards Greater Leverage: Scaling Laws for Efficient Mixture-of-Experts
Language Models"), optional shared experts that every token uses, a router from
`efflm.layers.moe.ROUTERS` and a dispatch from `DISPATCH`. `moe_reference` is the
plain per-token loop the fast paths are tested against.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efflm.errors import ConfigError, check_choice, check_positive
from efflm.layers.common import param_dtype, sow_stat
from efflm.layers.contract import FeedForward
from efflm.layers.mlp.swiglu import SwiGLU
from efflm.layers.moe import DISPATCH, ROUTERS
from efflm.layers.moe.dispatch import EP_EXCHANGES, sharded_dispatch
from efflm.mesh import mesh_axes_of

if TYPE_CHECKING:
    from efflm.config import ModelConfig

IMPLS = ("auto", "xla", "ragged", "pallas")


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
    # dropless: every (token, expert) pair is computed; capacity: each expert takes at
    # most ceil(capacity_factor * tokens * top_k / num_experts), first choices first.
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    # dropless backend. xla: each expert's rows padded to a multiple of `block_rows` and
    # a loop of matmuls over the row blocks (only useful work plus padding); ragged:
    # jax.lax.ragged_dot (computed densely by XLA:CPU); pallas: the grouped matmul
    # kernel. auto: pallas on GPU, xla elsewhere.
    impl: str = "auto"
    # With mesh.expert > 1 the experts are split over the `expert` mesh axis and tokens
    # are exchanged, inside shard_map. gather_scatter: every device gathers its expert
    # group's tokens, computes its experts' share, and the outputs are reduce-scattered
    # (dropless). all_to_all: the pairs are sent to their experts' devices, at most
    # ceil(ep_capacity_factor * pairs / mesh.expert) to each, the rest dropped and
    # counted. Under expert parallelism the local experts run the dropless dispatch.
    ep_exchange: str = "gather_scatter"
    ep_capacity_factor: float = 2.0
    # 0: the largest power of two (8 to 256) with num_experts * block_rows at most a
    # quarter of the (token, expert) pairs, which bounds the padding to that quarter.
    block_rows: int = 0


def _expert_init(std: float, axes):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _sharded(mesh, tokens: int) -> bool:
    """Whether the dispatch runs per shard: under a mesh of several devices whose batch
    axes split these tokens, the `expert` axis among them when it is > 1 (a batch they
    do not divide, as at init, runs as one global dispatch)."""
    if mesh.empty or mesh.size == 1:
        return False
    axes = mesh_axes_of(mesh, "batch", tokens)
    return bool(axes) and (mesh.shape.get("expert", 1) == 1 or "expert" in axes)


class MoE(FeedForward):
    """Mixture-of-Experts MLP; under a mesh the dispatch runs per shard, its experts
    split over devices with `mesh.expert` > 1 (`sharded_dispatch`)."""

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
        takes one reads and updates). `segment_ids` (batch, length): 0 marks padding."""
        cfg, moe = self.cfg, self.cfg.moe
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        sequences = x if x.ndim == 3 else tokens[None]
        start = self.initial_carry(cfg, sequences) if carry is None else carry
        routing, new_carry = ROUTERS[moe.router](cfg, name="router")(
            sequences, start, segment_ids)
        e, d, f = moe.num_experts, cfg.d_model, moe.expert_d_ff
        pdt = param_dtype(cfg.param_dtype)
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        weights = (
            self.param("gate", _expert_init(cfg.init_std, ("expert", "embed", "mlp")),
                       (e, d, f), pdt),
            self.param("up", _expert_init(cfg.init_std, ("expert", "embed", "mlp")),
                       (e, d, f), pdt),
            self.param("out", _expert_init(out_std, ("expert", "mlp", "embed")), (e, f, d),
                       pdt))
        weights = tuple(w.astype(cfg.dtype) for w in weights)
        if routing.rows is None:
            out, dropped = self._dispatch(tokens, routing.experts, routing.gates, weights,
                                          cfg, tokens.shape[0])
        else:
            out, dropped = self._dispatch_rows(sequences, routing, weights)
        out = out.reshape(shape).astype(cfg.dtype)
        if moe.num_shared_experts:  # on (batch, length, d): its sharding constraints fit
            out = out + SwiGLU(cfg, d_ff=moe.num_shared_experts * f, name="shared")(x)
        self._statistics(routing, dropped)
        return out if carry is None else (out, new_carry)

    @staticmethod
    def _dispatch(tokens, experts, gates, weights, cfg, batch: int):
        args = (tokens.astype(cfg.dtype), experts, gates, weights, cfg)
        mesh = jax.sharding.get_abstract_mesh()
        if _sharded(mesh, batch):
            return sharded_dispatch(*args, mesh)
        return DISPATCH[cfg.moe.dispatch](*args)

    def _dispatch_rows(self, x, routing, weights):
        """A per-sequence router's rows: each row one (token, expert) pair, gathered from
        its sequence, dispatched as a token with one choice, summed back into its token.
        A capacity dispatch gets each expert's share of the rows as its capacity (exact
        for expert choice, whose experts have equal rows in every sequence; the sharded
        path splits whole sequences)."""
        cfg = self.cfg
        batch, length, d = x.shape
        rows = routing.rows.shape[1]
        x_rows = jnp.take_along_axis(x, routing.rows[..., None], axis=1).reshape(-1, d)
        one = dataclasses.replace(cfg, moe=dataclasses.replace(
            cfg.moe, top_k=1, capacity_factor=1.0))
        out_rows, dropped = self._dispatch(
            x_rows, routing.experts.reshape(-1, 1), routing.gates.reshape(-1, 1), weights,
            one, batch)
        out = jnp.zeros((batch, length, d), jnp.float32).at[
            jnp.arange(batch)[:, None], routing.rows].add(
            out_rows.reshape(batch, rows, d).astype(jnp.float32))
        return out, dropped

    def _statistics(self, routing, dropped):
        moe = self.cfg.moe
        # Rows with gate 0 (a per-sequence router's unused rows) carry no load.
        used = 1.0 if routing.rows is None else (routing.gates != 0).astype(jnp.float32)
        load = jnp.zeros((moe.num_experts,), jnp.float32).at[
            routing.experts.reshape(-1)].add(jnp.broadcast_to(used, routing.experts.shape)
                                             .reshape(-1))
        load = load / jnp.maximum(jnp.mean(load), 1e-9)  # 1 = an even share
        sow_stat(self, "expert_load_max", jnp.max(load), reduce="max")
        sow_stat(self, "expert_load_min", jnp.min(load), reduce="min")
        sow_stat(self, "expert_load_cv", jnp.std(load))
        sow_stat(self, "moe_dropped_fraction", dropped)
        p = routing.probs
        entropy = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1)
        sow_stat(self, "router_entropy", jnp.mean(entropy))

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
        return ROUTERS[cfg.moe.router].not_causal(cfg)

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


def moe_reference(x, experts, gates, weights, capacity: int | None = None):
    """Token by token: `sum_k gate_k * expert_k(x_t)`. With `capacity`, each expert takes
    pairs in choice-major, then token, order until full; the rest contribute nothing.
    `experts` must be concrete (the kept pairs are found by a Python loop)."""
    experts = np.asarray(experts)
    tokens, k = experts.shape
    keep = np.ones((tokens, k), bool)
    if capacity is not None:
        taken = np.zeros(weights[0].shape[0], int)
        for j in range(k):
            for t in range(tokens):
                keep[t, j] = taken[experts[t, j]] < capacity
                taken[experts[t, j]] += 1
    gate_w, up_w, out_w = weights
    rows = []
    for t in range(tokens):
        y = jnp.zeros((x.shape[-1],), jnp.float32)
        for j in range(k):
            if keep[t, j]:
                e = experts[t, j]
                h = jax.nn.silu(x[t] @ gate_w[e]) * (x[t] @ up_w[e])
                y = y + gates[t, j] * (h @ out_w[e])
        rows.append(y)
    return jnp.stack(rows), 1.0 - keep.mean()
