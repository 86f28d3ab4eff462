"""The top-k router (`model.moe.router=topk`), and the token-choice parts other routers
share: jitter, the router weight, softmax top-k with its balance and z-losses.

Every router (`efflm.layers.contract.Router`) maps the tokens `x` (batch, length,
d_model), the layer carry and the segment ids to `(Routing, carry)`: the chosen experts
(tokens, top_k), their gates, the full probabilities and the logits (float32); a
per-sequence router instead chooses a static list of rows itself (`Routing.rows`):
expert choice (`expert_choice.py`) and BlockFFN's ReLU router (`relu.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflm.layers.common import sow_loss
from efflm.layers.contract import Router, Routing

if TYPE_CHECKING:
    from efflm.config import ModelConfig


def real_tokens(segment_ids, tokens: int):
    """(tokens,) float32: 1 for a real token, 0 for padding (segment id 0)."""
    if segment_ids is None:
        return jnp.ones((tokens,), jnp.float32)
    return (segment_ids.reshape(-1) > 0).astype(jnp.float32)


def token_mean(values, valid):
    """Mean of `values` (tokens, ...) over the real tokens (`valid` from `real_tokens`)."""
    weights = valid.reshape(valid.shape + (1,) * (values.ndim - 1))
    count = jnp.maximum(jnp.sum(valid), 1.0)
    return jnp.sum(values * weights, axis=0) / count


def balance_loss(experts, probs, num_experts: int, valid=None):
    """`E * sum_i f_i * P_i` over the real tokens: f_i the fraction of their (token,
    choice) pairs sent to expert i, P_i its mean router probability (1 when both are
    uniform)."""
    valid = jnp.ones(experts.shape[:1], jnp.float32) if valid is None else valid
    weights = jnp.broadcast_to(valid[:, None], experts.shape).reshape(-1)
    counts = jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(weights)
    fraction = counts / jnp.maximum(jnp.sum(weights), 1.0)
    return num_experts * jnp.sum(fraction * token_mean(probs, valid))


def z_loss(logits, valid=None):
    """`mean(logsumexp(logits)^2)` ("ST-MoE") over the real tokens: keeps router logits
    small."""
    valid = jnp.ones(logits.shape[:1], jnp.float32) if valid is None else valid
    return token_mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)), valid)


def jittered(module: nn.Module, x):
    """Training only (a `router` key given): `x` times uniform(1 - jitter, 1 + jitter)."""
    jitter = module.cfg.moe.jitter
    if jitter and module.has_rng("router"):
        x = x * jax.random.uniform(module.make_rng("router"), x.shape, jnp.float32,
                                   1.0 - jitter, 1.0 + jitter)
    return x


def softmax_topk(module: nn.Module, logits, valid) -> Routing:
    """Token choice from router logits (tokens, num_experts): softmax in float32, each
    token's top-k, the gates optionally renormalised over the k; sows the balance and
    z-losses of the real tokens (`valid`, from `real_tokens`) into `module` at their
    configured weights."""
    moe = module.cfg.moe
    probs = jax.nn.softmax(logits, axis=-1)
    gates, experts = jax.lax.top_k(probs, moe.top_k)
    if moe.renormalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    if moe.balance_loss:
        sow_loss(module, "balance", moe.balance_loss * balance_loss(
            experts, probs, moe.num_experts, valid))
    if moe.router_z_loss:
        sow_loss(module, "router_z", moe.router_z_loss * z_loss(logits, valid))
    return Routing(experts.astype(jnp.int32), gates, probs, logits)


def router_kernel(module: nn.Module, name: str, shape, axes=("embed", None), init=None):
    """A float32 router weight (normal(init_std) unless `init` is given)."""
    init = init or nn.initializers.normal(module.cfg.init_std)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class TopKRouter(Router):
    """Token choice ("Switch Transformers", GShard): softmax over experts in float32,
    each token takes its top-k; gates optionally renormalised over the k."""

    @nn.compact
    def __call__(self, x, carry: dict, segment_ids=None) -> tuple[Routing, dict]:
        x = jittered(self, x.reshape(-1, x.shape[-1]).astype(jnp.float32))
        kernel = router_kernel(self, "kernel", (x.shape[-1], self.cfg.moe.num_experts))
        return softmax_topk(self, x @ kernel, real_tokens(segment_ids, x.shape[0])), carry

    @staticmethod
    def flops_per_token(cfg: ModelConfig) -> float:
        return 2 * cfg.d_model * cfg.moe.num_experts
