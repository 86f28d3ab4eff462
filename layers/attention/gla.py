"""Gated linear attention (`model.attention.kind=gla`), from "Gated Linear Attention
Transformers with Hardware-Efficient Training"; with `model.attention.gla.decay=fixed`,
RetNet's fixed per-head decay ("Retentive Network: A Successor to Transformer for
Large Language Models") in the same layer.

    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,   o_t = q_t S_t
    data:  log alpha_t = logsigmoid(W2 W1 x_t + b) / temperature, one per key dimension
    fixed: alpha = 1 - 2^(-5 - h) for head h
    y_t = W_o (swish(W_r x_t) * RMSNorm(o_t))     (per-head norm, output gate)

Queries are scaled by head_dim^-1/2; no feature map, no normaliser, no rotary positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efflm.errors import check_choice, check_positive
from efflm.layers.attention.linear import ALLSCAN, chunked_mix_flops, linear_mix, validate_chunk
from efflm.layers.attention.parts import HeadRMSNorm, output_gate
from efflm.layers.contract import Mixer
from efflm.layers.dense import Dense
from efflm.pallas_kernels.linear_attention import sub_chunk
from efflm.shapes import head_dim

if TYPE_CHECKING:
    from efflm.config import ModelConfig


def retnet_log_decay(heads: int):
    """RetNet's per-head log decays, log(1 - 2^(-5 - h))."""
    return np.log1p(-(2.0 ** (-5.0 - np.arange(heads)))).astype(np.float32)


@dataclass
class GLASettings:
    decay: str = "data"  # data: per-key-dimension gates from x (GLA) | fixed (RetNet)
    gate_rank: int = 16  # rank of the gate projection
    gate_temperature: float = 16.0  # log gates are logsigmoid(.) / this


DECAYS = ("data", "fixed")


class GatedLinearAttention(Mixer):
    """GLA (data-dependent per-key-dimension gates from a rank-`gate_rank` projection)
    or RetNet's fixed per-head decay, with the output gate and per-head RMSNorm."""

    reference: bool = False  # the token scan instead of the chunked form (tests)
    decodes = True
    settings = GLASettings
    context_parallel = ALLSCAN

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        g = cfg.attention.gla
        validate_chunk(cfg)
        check_choice("model.attention.gla.decay", g.decay, DECAYS)
        check_positive("model.attention.gla.gate_rank", g.gate_rank)
        check_positive("model.attention.gla.gate_temperature", g.gate_temperature)

    @staticmethod
    def no_decay(cfg: ModelConfig) -> tuple[str, ...]:
        return ("gate_bias",) if cfg.attention.gla.decay == "data" else ()

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
        a = cfg.attention
        h, d = a.num_heads, head_dim(cfg)
        projections = 2 * cfg.d_model * h * d * 5  # q, k, v, output gate, out
        if a.gla.decay == "data":
            projections += 2 * a.gla.gate_rank * (cfg.d_model + h * d)
            return projections + chunked_mix_flops(cfg, seq_len, h, d, d,
                                                   sub=sub_chunk(a.chunk_size))
        return projections + chunked_mix_flops(cfg, seq_len, h, d, d)

    @nn.compact
    def __call__(self, x, positions, segment_ids, mask):
        cfg = self.cfg
        a = cfg.attention
        h, d = a.num_heads, head_dim(cfg)
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=cfg.init_std)
        axes = ("embed", "heads", "head_dim")
        q = Dense((h, d), axes, name="query", **kw)(x) * jnp.asarray(d ** -0.5, cfg.dtype)
        k = Dense((h, d), axes, name="key", **kw)(x)
        v = Dense((h, d), axes, name="value", **kw)(x)
        if a.gla.decay == "data":
            low = Dense((a.gla.gate_rank,), ("embed", None), name="gate_down", **kw)(x)
            logits = Dense((h, d), (None, "heads", "head_dim"), name="gate_up", **kw)(low)
            bias = self.param("gate_bias", nn.with_logical_partitioning(
                nn.initializers.zeros, ("heads", "head_dim")), (h, d), jnp.float32)
            log_decay = jax.nn.log_sigmoid(logits.astype(jnp.float32) + bias)
            log_decay = log_decay / a.gla.gate_temperature
        else:
            log_decay = jnp.broadcast_to(jnp.asarray(retnet_log_decay(h)), x.shape[:2] + (h,))
        out = linear_mix(self, cfg, q, k, v, segment_ids, log_decay=log_decay,
                         what="gated linear attention", reference=self.reference)
        out = output_gate(x, HeadRMSNorm(name="norm")(out), h, d, **kw)
        out = nn.with_logical_constraint(out.astype(cfg.dtype),
                                         ("batch", "length", "heads", "head_dim"))
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        return Dense((cfg.d_model,), ("heads", "head_dim", "embed"), in_dims=2,
                     dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=out_std,
                     name="out")(out)
