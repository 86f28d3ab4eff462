"""Layerwise Recurrent Router for Mixture-of-Experts ("RMoE",
`model.moe.router=recurrent`).

Each MoE layer's router projects its tokens to `model.moe.recurrent.hidden` dims, runs a
GRU cell on that with, as state, the previous MoE layer's GRU output for the same token
(zeros at the first MoE layer), and takes its router logits from the new GRU output;
the choice from the logits is the top-k router's (softmax, top-k, balance and z-losses,
`softmax_topk`). So routing can depend on how earlier layers routed the token, and all
tokens still run in parallel.

The GRU output travels between MoE layers in the layer carry (`efflm.layers.depth.plain`)
as `moe_router_state`, (batch, length, router_hidden) in float32; layers without MoE
pass it on unchanged. It is per token and rebuilt in every forward pass, so decoding
with the cache needs nothing more. The paper shares one GRU across the layers; here
each MoE layer has its own (its parameters live with the layer, as the stack scans
them), beside its own projection and logit weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflm.errors import check_positive
from efflm.layers.contract import Router
from efflm.layers.moe.topk import jittered, real_tokens, router_kernel, softmax_topk

if TYPE_CHECKING:
    from efflm.config import ModelConfig

CARRY = "moe_router_state"


def _constrained(state):
    """The carried state (batch, length, router_hidden), sharded as the tokens are."""
    if state.ndim != 3:
        return state
    return nn.with_logical_constraint(state, ("batch", "length", None))


def gru_cell(x, h, w_input, w_hidden, b_input, b_hidden):
    """One GRU step (the gate layout of torch.nn.GRUCell): `x` and `h` (..., r), each
    kernel (r, 3r) holding the reset, update and candidate blocks in that order."""
    r_x, z_x, n_x = jnp.split(x @ w_input + b_input, 3, axis=-1)
    r_h, z_h, n_h = jnp.split(h @ w_hidden + b_hidden, 3, axis=-1)
    reset = jax.nn.sigmoid(r_x + r_h)
    update = jax.nn.sigmoid(z_x + z_h)
    candidate = jnp.tanh(n_x + reset * n_h)
    return (1.0 - update) * candidate + update * h


@dataclass
class RecurrentSettings:
    hidden: int = 64  # width of the projected router input and of the carried GRU state


class RecurrentRouter(Router):
    """GRU-carried token-choice router (see the module)."""

    settings = RecurrentSettings

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        check_positive("model.moe.recurrent.hidden", cfg.moe.recurrent.hidden)

    @staticmethod
    def takes_carry(cfg: ModelConfig) -> bool:
        return True

    @staticmethod
    def initial_carry(cfg: ModelConfig, x) -> dict:
        state = jnp.zeros((*x.shape[:-1], cfg.moe.recurrent.hidden), jnp.float32)
        return {CARRY: _constrained(state)}

    @nn.compact
    def __call__(self, x, carry: dict, segment_ids=None):
        moe, r = self.cfg.moe, self.cfg.moe.recurrent.hidden
        state = carry[CARRY]
        x = jittered(self, x.reshape(-1, x.shape[-1]).astype(jnp.float32))
        gru_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        projected = x @ router_kernel(self, "proj", (x.shape[-1], r))
        h = gru_cell(projected, state.reshape(x.shape[0], r),
                     router_kernel(self, "gru_input", (r, 3 * r), (None, None), gru_init),
                     router_kernel(self, "gru_hidden", (r, 3 * r), (None, None), gru_init),
                     router_kernel(self, "gru_input_bias", (3 * r,), (None,),
                                   nn.initializers.zeros),
                     router_kernel(self, "gru_hidden_bias", (3 * r,), (None,),
                                   nn.initializers.zeros))
        logits = h @ router_kernel(self, "kernel", (r, moe.num_experts), (None, None))
        h = h.reshape(state.shape)
        return (softmax_topk(self, logits, real_tokens(segment_ids, x.shape[0])),
                {**carry, CARRY: _constrained(h)})

    @staticmethod
    def flops_per_token(cfg: ModelConfig) -> float:
        """Projection, the GRU's two (r, 3r) matmuls and the logits."""
        r = cfg.moe.recurrent.hidden
        return 2 * cfg.d_model * r + 2 * 2 * r * 3 * r + 2 * r * cfg.moe.num_experts
