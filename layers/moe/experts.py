"""The Mixture-of-Experts MLP (`model.mlp.kind=moe`, settings under `model.moe`).

SwiGLU experts of their own width (`expert_d_ff`; many small ones are fine-grained
experts, "Towards Greater Leverage: Scaling Laws for Efficient Mixture-of-Experts
Language Models"), optional shared experts that every token uses, a router from
`efflm.layers.moe.ROUTERS` and a dispatch from `DISPATCH`. `moe_reference` is the
plain per-token loop the fast paths are tested against.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efflm.config import ModelConfig, check_choice, check_positive
from efflm.errors import ConfigError
from efflm.layers.common import param_dtype, sow_stat
from efflm.layers.mlp.swiglu import SwiGLU
from efflm.layers.moe.dispatch import sharded_dispatch

IMPLS = ("auto", "xla", "ragged", "pallas")


def _expert_init(std: float, axes):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _sharded(mesh, tokens: int) -> bool:
    """Whether the dispatch runs per shard: under a mesh of several devices whose batch
    axes split these tokens, the `expert` axis among them when it is > 1 (a batch they
    do not divide, as at init, runs as one global dispatch)."""
    from efflm.mesh import mesh_axes_of

    if mesh.empty or mesh.size == 1:
        return False
    axes = mesh_axes_of(mesh, "batch", tokens)
    return bool(axes) and (mesh.shape.get("expert", 1) == 1 or "expert" in axes)


class MoE(nn.Module):
    """Mixture-of-Experts MLP; under a mesh the dispatch runs per shard, its experts
    split over devices with `mesh.expert` > 1 (`sharded_dispatch`)."""

    cfg: ModelConfig

    @staticmethod
    def takes_carry(cfg: ModelConfig) -> bool:
        """Whether the layer carry passes through: when the router carries state."""
        from efflm.layers.moe import ROUTERS

        return getattr(ROUTERS[cfg.moe.router], "takes_carry", False)

    @staticmethod
    def initial_carry(cfg: ModelConfig, x) -> dict:
        from efflm.layers.moe import ROUTERS

        return ROUTERS[cfg.moe.router].initial_carry(cfg, x) if MoE.takes_carry(cfg) else {}

    @nn.compact
    def __call__(self, x, carry: dict | None = None):
        """`x` (batch, length, d_model) -> the output, or `(output, carry)` when given
        the layer carry (which a router that takes one reads and updates)."""
        from efflm.layers.moe import DISPATCH, ROUTERS

        cfg, moe = self.cfg, self.cfg.moe
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        router = ROUTERS[moe.router](cfg, name="router")
        sequences = math.prod(shape[:-2]) if len(shape) > 2 else 1
        if self.takes_carry(cfg):
            start = self.initial_carry(cfg, x) if carry is None else carry
            routing, new_carry = router(tokens, start, sequences=sequences)
        else:
            routing, new_carry = router(tokens, sequences=sequences), carry
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
        args = (tokens.astype(cfg.dtype), routing.experts, routing.gates, weights, cfg)
        mesh = jax.sharding.get_abstract_mesh()
        if _sharded(mesh, tokens.shape[0]):
            out, dropped = sharded_dispatch(*args, mesh)
        else:
            out, dropped = DISPATCH[moe.dispatch](*args)
        out = out.reshape(shape).astype(cfg.dtype)
        if moe.num_shared_experts:  # on (batch, length, d): its sharding constraints fit
            out = out + SwiGLU(cfg, d_ff=moe.num_shared_experts * f, name="shared")(x)
        self._statistics(routing, dropped)
        return out if carry is None else (out, new_carry)

    def _statistics(self, routing, dropped):
        moe = self.cfg.moe
        load = jnp.zeros((moe.num_experts,), jnp.float32).at[
            routing.experts.reshape(-1)].add(1.0)
        load = load / jnp.mean(load)  # 1 = an even share
        sow_stat(self, "expert_load_max", jnp.max(load), reduce="max")
        sow_stat(self, "expert_load_min", jnp.min(load), reduce="min")
        sow_stat(self, "expert_load_cv", jnp.std(load))
        sow_stat(self, "moe_dropped_fraction", dropped)
        p = routing.probs
        entropy = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1)
        sow_stat(self, "router_entropy", jnp.mean(entropy))

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
        """Active FLOPs: the router, the k routed experts and the shared ones. Dispatch
        padding (capacity slots, dropless row blocks) is not counted."""
        from efflm.layers.moe import ROUTERS

        moe = cfg.moe
        expert = 2 * 3 * cfg.d_model * moe.expert_d_ff
        return (ROUTERS[moe.router].flops_per_token(cfg)
                + (moe.top_k + moe.num_shared_experts) * expert)

    @staticmethod
    def inactive_params(cfg: ModelConfig) -> int:
        """Parameters a token does not use: the experts it is not routed to."""
        moe = cfg.moe
        return (moe.num_experts - moe.top_k) * 3 * cfg.d_model * moe.expert_d_ff

    @staticmethod
    def check_mesh(cfg: ModelConfig, mesh_shape: dict) -> None:
        moe, ep = cfg.moe, mesh_shape.get("expert", 1)
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
        from efflm.layers.moe import DISPATCH, ROUTERS
        from efflm.layers.moe.dispatch import EP_EXCHANGES

        moe = cfg.moe
        check_choice("model.moe.ep_exchange", moe.ep_exchange, EP_EXCHANGES)
        if not moe.ep_capacity_factor > 0:
            raise ConfigError(f"model.moe.ep_capacity_factor must be > 0, got "
                              f"{moe.ep_capacity_factor}")
        check_choice("model.moe.router", moe.router, ROUTERS)
        check_choice("model.moe.dispatch", moe.dispatch, DISPATCH)
        check_choice("model.moe.impl", moe.impl, IMPLS)
        for key in ("num_experts", "top_k", "expert_d_ff", "router_hidden"):
            check_positive(f"model.moe.{key}", getattr(moe, key))
        for key in ("num_shared_experts", "balance_loss", "router_z_loss", "jitter",
                    "block_rows", "bias_rate", "seq_balance_loss"):
            check_positive(f"model.moe.{key}", getattr(moe, key), allow_zero=True)
        if moe.top_k > moe.num_experts:
            raise ConfigError(f"model.moe.top_k={moe.top_k} is larger than "
                              f"model.moe.num_experts={moe.num_experts}")
        if not moe.capacity_factor > 0:
            raise ConfigError(f"model.moe.capacity_factor must be > 0, got "
                              f"{moe.capacity_factor}")
        if moe.jitter >= 1:
            raise ConfigError(f"model.moe.jitter must be in [0, 1), got {moe.jitter}")
        check = getattr(ROUTERS[moe.router], "validate_config", None)
        if check is not None:  # the router's own settings
            check(cfg)


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
