"""Expert choice routing (`model.moe.router=expert_choice`), "Mixture-of-Experts with
Expert Choice Routing".

Each token's affinities are a softmax over the experts (float32). Each expert then takes
the `capacity` tokens of a sequence with the highest affinity for it,
`capacity = min(n, ceil(capacity_factor * n * top_k / num_experts))` for a sequence of n
real tokens (padding is never taken; the rows are static, sized for a sequence without
padding, and the ones past the capacity have gate 0), and a
token's output is the sum of the outputs of the experts that took it, each weighted by
its affinity. A token is taken by 0 to num_experts experts; every expert computes exactly
`capacity` rows per sequence, so the load is balanced by construction and the rows go
through the capacity dispatch (`model.moe.dispatch=capacity`, the only one allowed)
with no padding and nothing dropped.

Not causal. The group an expert chooses from is one sequence (a row of the batch): a
token's output depends on the later tokens of its sequence, and documents packed into
one row share the group, so a choice in one document also depends on the documents
before and after it in that row. Evaluation rows of such a model carry `causal: false`
and `efflm generate` refuses it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efflm.errors import ConfigError
from efflm.layers.common import sow_loss
from efflm.layers.contract import Router, Routing
from efflm.layers.moe.topk import real_tokens, z_loss

if TYPE_CHECKING:
    from efflm.config import ModelConfig


def sequence_capacity(cfg: ModelConfig, length: int) -> int:
    """Tokens each expert takes from a sequence of `length` tokens."""
    moe = cfg.moe
    return min(length, max(1, math.ceil(moe.capacity_factor * length * moe.top_k
                                        / moe.num_experts)))


NOT_CAUSAL = ("model.moe.router=expert_choice is not causal: each expert chooses among "
              "all tokens of a sequence, so a token's output depends on later tokens")


class ExpertChoiceRouter(Router):
    """Expert choice over each sequence; returns its rows expert-major: expert 0's
    `capacity` tokens, then expert 1's, ... (`Routing.rows`)."""

    balanced = True

    @nn.compact
    def __call__(self, x, carry: dict, segment_ids=None) -> tuple[Routing, dict]:
        moe = self.cfg.moe
        batch, length, d = x.shape
        x = x.astype(jnp.float32)
        if moe.jitter and self.has_rng("router"):
            x = x * jax.random.uniform(self.make_rng("router"), x.shape, jnp.float32,
                                       1.0 - moe.jitter, 1.0 + moe.jitter)
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(self.cfg.init_std), ("embed", None)),
            (d, moe.num_experts), jnp.float32)
        logits = x @ kernel
        probs = jax.nn.softmax(logits, axis=-1)
        valid = real_tokens(segment_ids, batch * length).reshape(batch, length)
        # Padding ranks below every real token, and each expert takes its share of the
        # real tokens: rows past it keep gate 0.
        capacity = sequence_capacity(self.cfg, length)
        gates, positions = jax.lax.top_k(jnp.swapaxes(
            jnp.where(valid[..., None] > 0, probs, -1.0), 1, 2), capacity)
        real = jnp.sum(valid, axis=1)
        share = jnp.minimum(real, jnp.ceil(moe.capacity_factor * moe.top_k / moe.num_experts
                                           * real))
        gates = jnp.where(jnp.arange(capacity) < share[:, None, None], gates, 0.0)
        experts = jnp.broadcast_to(jnp.arange(moe.num_experts, dtype=jnp.int32)[:, None],
                                   (batch, moe.num_experts, capacity))
        if moe.router_z_loss:
            sow_loss(self, "router_z", moe.router_z_loss * z_loss(
                logits.reshape(-1, moe.num_experts), valid.reshape(-1)))
        rows = moe.num_experts * capacity
        return Routing(experts.reshape(batch, rows), gates.reshape(batch, rows),
                       probs.reshape(-1, moe.num_experts), logits.reshape(-1, moe.num_experts),
                       rows=positions.reshape(batch, rows).astype(jnp.int32)), carry

    @staticmethod
    def flops_per_token(cfg: ModelConfig) -> float:
        return 2 * cfg.d_model * cfg.moe.num_experts

    @staticmethod
    def rows_per_token(cfg: ModelConfig, seq_len: int = 0) -> float:
        """Expert rows computed per token: num_experts * capacity / length (for an
        unknown length, its limit capacity_factor * top_k)."""
        moe = cfg.moe
        if not seq_len:
            return min(moe.num_experts, moe.capacity_factor * moe.top_k)
        return moe.num_experts * sequence_capacity(cfg, seq_len) / seq_len

    @staticmethod
    def not_causal(cfg: ModelConfig) -> str:
        return NOT_CAUSAL

    @staticmethod
    def check_mesh(cfg: ModelConfig, mesh_shape: dict) -> None:
        ep = mesh_shape.get("expert", 1)
        if ep > 1:
            raise ConfigError(f"model.moe.router=expert_choice cannot run under "
                              f"mesh.expert={ep}: expert parallelism runs each device's "
                              "experts dropless, and expert choice needs its capacity "
                              "dispatch; use mesh.expert=1 (data or fsdp shards work)")

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        if cfg.moe.dispatch != "capacity":
            raise ConfigError(f"model.moe.router=expert_choice needs "
                              f"model.moe.dispatch=capacity (each expert computes its fixed "
                              f"number of chosen tokens), got {cfg.moe.dispatch!r}")
        if cfg.moe.capacity_policy != "batch":
            raise ConfigError(f"model.moe.capacity_policy={cfg.moe.capacity_policy} cannot "
                              "apply to model.moe.router=expert_choice, which fills each "
                              "expert per sequence by construction (not causal); set "
                              "model.moe.capacity_policy=batch")


def expert_choice_picks(probs, capacity: int) -> list[list[list[int]]]:
    """`picks[b][e]`: the `capacity` positions of sequence b with the largest affinity
    for expert e, by a plain sort (`probs` concrete, (batch, length, experts))."""
    p = np.asarray(probs)
    batch, length, experts = p.shape
    return [[sorted(range(length), key=lambda t: -p[b, t, e])[:capacity]
             for e in range(experts)] for b in range(batch)]


def expert_choice_reference(x, kernel, weights, picks):
    """Every expert on every token, kept where `picks` (`expert_choice_picks`, fixed so
    that gradients can be taken) has the expert take the token, weighted by the
    affinity, summed per token. `x` (batch, length, d)."""
    gate_w, up_w, out_w = weights
    batch, length, _ = x.shape
    probs = jax.nn.softmax(x.astype(jnp.float32) @ kernel, axis=-1)
    taken = np.zeros(probs.shape, np.float32)
    for b in range(batch):
        for e, tokens in enumerate(picks[b]):
            taken[b, tokens, e] = 1.0
    h = jax.nn.silu(jnp.einsum("bld,edf->blef", x, gate_w)) * jnp.einsum(
        "bld,edf->blef", x, up_w)
    every = jnp.einsum("blef,efd->bled", h, out_w)
    return jnp.einsum("bled,ble->bld", every, probs * taken)
