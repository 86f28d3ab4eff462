"""Auxiliary-loss-free load balancing (`model.moe.router=sigmoid_bias`), from the
"DeepSeek-V3 Technical Report" (after "Auxiliary-Loss-Free Load Balancing Strategy for
Mixture-of-Experts").

Scores `s = sigmoid(x W)` (tokens, experts). Each token takes the top-k experts of
`s + b`, where `b` is a per-expert bias; its gates are the chosen scores without the
bias, divided by their sum when `model.moe.renormalize`. The bias only steers the
choice: it is model state (`STATE_COLLECTIONS`, outside the gradient), and after each
train step `b += bias_rate * sign(mean(load) - load)`, where `load` counts each
expert's (token, choice) pairs of real tokens (padding is not counted) over the whole
step, every device and microbatch.

How the step does that: each forward pass of the train step writes its load into the
state variable `aux_free_balance` (a dict of `bias` and `load`); the step averages the
microbatches' values, which keeps the sign of `mean(load) - load`, and then applies
`update_bias` once (`efflm.layers.common.STEP_UPDATES`). Eval and generation do not
write the state, so they leave the bias as it is.

`model.moe.sigmoid_bias.seq_balance_loss` weighs the report's complementary sequence-wise balance
loss `sum_i f_i P_i` per sequence (a row of the batch, whatever documents it packs; its
real tokens), averaged over the sequences: `f_i` is `E / k` times expert i's share of the sequence's
(token, choice) pairs, `P_i` the mean over its tokens of `s_i / sum_j s_j`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflm.errors import check_positive
from efflm.layers.common import sow_loss, sow_stat, step_update
from efflm.layers.contract import Router, Routing
from efflm.layers.moe.topk import jittered, real_tokens, router_kernel

if TYPE_CHECKING:
    from efflm.config import ModelConfig

BALANCE = "aux_free_balance"  # the model-state variable, named in STEP_UPDATES


def expert_counts(experts, num_experts: int, valid, sequences: int = 1):
    """The real tokens' (token, choice) pairs per expert, float32: (num_experts,), or
    per sequence (sequences, num_experts) when `sequences` > 1."""
    rows = experts.reshape(sequences, -1)
    weights = jnp.broadcast_to(valid[:, None], experts.shape).reshape(sequences, -1)
    counts = jnp.zeros((sequences, num_experts), jnp.float32).at[
        jnp.arange(sequences)[:, None], rows].add(weights)
    return counts[0] if sequences == 1 else counts


def sequence_balance_loss(experts, scores, valid, sequences: int, top_k: int):
    """DeepSeek-V3's sequence-wise balance loss (without its weight) over the real
    tokens, averaged over `sequences` equal runs of the tokens that hold any."""
    num_experts = scores.shape[-1]
    share = scores / jnp.sum(scores, axis=-1, keepdims=True)
    mask = valid.reshape(sequences, -1, 1)
    real = jnp.sum(mask, axis=1)  # (sequences, 1)
    prob = jnp.sum(share.reshape(sequences, -1, num_experts) * mask, axis=1) / jnp.maximum(
        real, 1.0)
    counts = expert_counts(experts, num_experts, valid, sequences).reshape(
        sequences, num_experts)
    f = num_experts / (top_k * jnp.maximum(real, 1.0)) * counts
    held = (real[:, 0] > 0).astype(jnp.float32)
    return jnp.sum(jnp.sum(f * prob, axis=-1) * held) / jnp.maximum(jnp.sum(held), 1.0)


@step_update(BALANCE)
def update_bias(cfg: ModelConfig, value: dict) -> dict:
    """`b += bias_rate * sign(mean(load) - load)` over the experts (the last axis)."""
    load = value["load"]
    direction = jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
    return {**value, "bias": value["bias"] + cfg.moe.sigmoid_bias.bias_rate * direction}


@dataclass
class SigmoidBiasSettings:
    # After each step every expert's selection bias moves by bias_rate toward an even
    # load (b += bias_rate * sign(mean load - load)); seq_balance_loss weighs the
    # complementary sequence-wise balance loss (0: off).
    bias_rate: float = 0.001
    seq_balance_loss: float = 0.0001


class SigmoidBiasRouter(Router):
    """Sigmoid scores, top-k of score + bias, gates from the scores (see the module);
    `probs` in its Routing are the scores normalised over the experts."""

    settings = SigmoidBiasSettings

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        own = cfg.moe.sigmoid_bias
        check_positive("model.moe.sigmoid_bias.bias_rate", own.bias_rate, allow_zero=True)
        check_positive("model.moe.sigmoid_bias.seq_balance_loss", own.seq_balance_loss,
                       allow_zero=True)

    @nn.compact
    def __call__(self, x, carry: dict, segment_ids=None) -> tuple[Routing, dict]:
        moe = self.cfg.moe
        sequences = x.shape[0]
        x = jittered(self, x.reshape(-1, x.shape[-1]).astype(jnp.float32))
        valid = real_tokens(segment_ids, x.shape[0])
        kernel = router_kernel(self, "kernel", (x.shape[-1], moe.num_experts))
        logits = x @ kernel
        scores = jax.nn.sigmoid(logits)
        balance = self.variable("state", BALANCE, lambda: {
            "bias": jnp.zeros((moe.num_experts,), jnp.float32),
            "load": jnp.zeros((moe.num_experts,), jnp.float32)})
        bias = balance.value["bias"]
        _, experts = jax.lax.top_k(jax.lax.stop_gradient(scores) + bias, moe.top_k)
        gates = jnp.take_along_axis(scores, experts, axis=-1)
        if moe.renormalize:
            gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
        if self.is_mutable_collection("state") and not self.is_initializing():
            balance.value = {"bias": bias,
                             "load": expert_counts(experts, moe.num_experts, valid)}
        if moe.sigmoid_bias.seq_balance_loss:
            sow_loss(self, "seq_balance", moe.sigmoid_bias.seq_balance_loss * sequence_balance_loss(
                experts, scores, valid, sequences, moe.top_k))
        sow_stat(self, "router_bias_range", jnp.max(bias) - jnp.min(bias), reduce="max")
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
        return Routing(experts.astype(jnp.int32), gates, probs, logits), carry

    @staticmethod
    def flops_per_token(cfg: ModelConfig) -> float:
        return 2 * cfg.d_model * cfg.moe.num_experts
