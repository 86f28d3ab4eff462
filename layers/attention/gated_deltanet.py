"""Gated DeltaNet (`model.attention.kind=gated_deltanet`), from "Gated Delta Networks:
Improving Mamba2 with Delta Rule": the delta rule writes to the state by correcting
what the state already returns for the key, under a data-dependent decay per head.

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t
    S: (dk, dv), float32, dk = head_dim and dv = value_expansion x head_dim; k_t and q_t
    L2-normalised, q_t then scaled by dk^-1/2
    beta_t = sigmoid(w_beta . x_t),  log alpha_t = -exp(c) softplus(w_alpha . x_t + b)
    y_t = W_o (RMSNorm(o_t) * swish(W_g x_t))     (per-head norm; the gate is a setting)

with, per head, exp(c) initialised uniform in (0, 16] and softplus(b) log-uniform in
[0.001, 0.1] (Mamba2's decay rate and time step; parameters `decay_log_scale`, `decay_bias`,
which weight decay leaves alone, as the reference implementation does).

Before the mix, q, k and v each pass a causal depthwise convolution of `conv_width`
taps (drawn from N(0, model.init_std^2) as the reference initialises them, or uniform in
+-conv_width^-1/2 under `conv_init=uniform`) and SiLU
(`short_conv`; SiLU alone without it), settings under `model.attention.gated_deltanet`.
The convolution and the state both restart at every packed segment. Queries and keys
have `model.attention.num_heads` heads of head_dim each, values `value_expansion` times
wider (`num_kv_heads` is not used by this kind, as by the other linear kinds).

Training runs the chunked form (`gated_delta_rule_chunked` in
`efflm.pallas_kernels.gated_delta_rule`, with its derivation), or under
`model.attention.impl=pallas` its Pallas kernels (`gated_delta_rule_pallas`; `auto`
stays on XLA); `gated_delta_rule_recurrent`, one state update per token, is their
reference. Decoding keeps S and each convolution's last conv_width - 1 inputs in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efflm.errors import ConfigError, check_choice, check_positive
from efflm.layers.attention.context_parallel import allscan_delta_rule, strategy
from efflm.layers.attention.linear import ALLSCAN, padded_length, validate_chunk
from efflm.layers.attention.parts import HeadRMSNorm, ShortConvolution, l2_normalize, output_gate
from efflm.layers.common import decoding, resolve_impl
from efflm.layers.contract import Mixer
from efflm.layers.dense import Dense
from efflm.pallas_kernels.gated_delta_rule import (
    delta_value_block,
    gated_delta_rule_chunked,
    gated_delta_rule_pallas,
    gated_delta_rule_recurrent,
)
from efflm.pallas_kernels.linear_attention import padded_head_dim
from efflm.shapes import head_dim

if TYPE_CHECKING:
    from efflm.config import ModelConfig


def delta_rule_impl(cfg: ModelConfig) -> str:
    """`xla` or `pallas`: the kernels only when asked for (`auto` is XLA until a GPU
    measurement says otherwise)."""
    impl = "xla" if cfg.attention.impl == "auto" else cfg.attention.impl
    return resolve_impl(impl, ("xla", "pallas"), "gated_deltanet")


def delta_rule_flops(cfg: ModelConfig, seq_len: int, heads: int, dk: int, dv: int) -> float:
    """Forward matmul FLOPs per token of the delta rule over the padded length. Both
    forms spend 2 dk dv per token on each of K S, Q S and the state update. The XLA form
    (`gated_delta_rule_chunked`) takes k k^T, q k^T and (scores) U over the whole C x C
    block of a chunk of C tokens (2C (2 dk + dv) per token) and substitutes against
    dv + dk columns, each row against all C (2C (dk + dv)). The Pallas kernels take
    k k^T once, T R and P U (2C (dk + 2 dv)), and q k^T once per program of
    `delta_value_block` value columns (n of them: 2C dk n)."""
    chunk = cfg.attention.chunk_size
    if cfg.attention.impl == "pallas":
        columns = padded_head_dim(dv)
        programs = columns // delta_value_block(padded_head_dim(dk), columns)
        mix = 2 * chunk * (dk + 2 * dv) + 2 * chunk * dk * programs
    else:
        mix = 2 * chunk * (2 * dk + dv) + 2 * chunk * (dk + dv)
    return heads * (mix + 6 * dk * dv) * padded_length(cfg, seq_len) / seq_len


def _time_step_bias_init(key, shape, dtype):
    """softplus(bias) log-uniform in [0.001, 0.1] (Mamba2's time-step range)."""
    dt = jnp.exp(jax.random.uniform(key, shape, dtype, np.log(1e-3), np.log(1e-1)))
    return dt + jnp.log(-jnp.expm1(-dt))  # softplus^-1


def _log_scale_init(key, shape, dtype):
    """log of a decay rate uniform in (0, 16]."""
    return jnp.log(16.0 - jax.random.uniform(key, shape, dtype, 0.0, 16.0))


CONV_INITS = ("normal", "uniform")  # model.attention.gated_deltanet.conv_init


@dataclass
class GatedDeltaNetSettings:
    # A causal depthwise convolution of conv_width taps, then SiLU, on q, k and v
    # (short_conv=false: SiLU alone); the output gate swish(W_g x) times the per-head
    # RMSNorm of the output (output_gate=false: the norm alone).
    short_conv: bool = True
    conv_width: int = 4
    # The taps' initialisation: normal, N(0, model.init_std^2) (the reference
    # implementation's); uniform, in +-conv_width^-1/2 (torch.nn.Conv1d's default).
    conv_init: str = "normal"
    output_gate: bool = True
    # Value heads `value_expansion` times head_dim wide (as the paper and its reference
    # implementation): the value projection, its convolution, the state's columns, the
    # norm, the output gate and the output projection's input widen with it.
    value_expansion: int = 2


class GatedDeltaNet(Mixer):
    """Gated DeltaNet: short convolutions, L2-normalised q and k, per-head beta and decay,
    the gated delta rule, per-head RMSNorm and output gate (see the module docstring)."""

    reference: bool = False  # the token scan instead of the chunked form (tests)
    decodes = True
    settings = GatedDeltaNetSettings
    resumable = ("conv_init",)  # the taps' initialisation only
    earlier_defaults = {"value_expansion": 1, "conv_init": "uniform"}
    context_parallel = ALLSCAN  # three passes a chunk (`allscan_delta_rule`)

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        a = cfg.attention
        check_positive("model.attention.gated_deltanet.conv_width",
                       a.gated_deltanet.conv_width)
        check_choice("model.attention.gated_deltanet.conv_init", a.gated_deltanet.conv_init,
                     CONV_INITS)
        expansion = a.gated_deltanet.value_expansion  # an int (the config's type)
        if expansion < 1:
            raise ConfigError("model.attention.gated_deltanet.value_expansion must be a "
                              f"positive integer, got {expansion!r}")
        if a.chunk_size > cfg.max_seq_len:
            raise ConfigError(f"model.attention.chunk_size={a.chunk_size} is larger than "
                              f"model.max_seq_len={cfg.max_seq_len}: gated_deltanet's chunk "
                              "must fit in a sequence; lower it")
        validate_chunk(cfg)

    @staticmethod
    def no_decay(cfg: ModelConfig) -> tuple[str, ...]:
        return ("decay_log_scale", "decay_bias")  # the reference's A_log and dt_bias

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
        """Matmuls only: the short convolutions (elementwise) are not counted."""
        a = cfg.attention
        h, d = a.num_heads, head_dim(cfg)
        dv = d * a.gated_deltanet.value_expansion
        # q and k; v, the output projection and the output gate at the value width.
        projections = 2 * cfg.d_model * h * (2 * d + dv * (3 if a.gated_deltanet.output_gate
                                                           else 2))
        projections += 2 * cfg.d_model * h * 2  # beta and the decay
        return projections + delta_rule_flops(cfg, seq_len, h, d, dv)

    @nn.compact
    def __call__(self, x, positions, segment_ids, mask):
        cfg = self.cfg
        a = cfg.attention
        h, d = a.num_heads, head_dim(cfg)
        own = a.gated_deltanet
        dv = d * own.value_expansion
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=cfg.init_std)
        axes = ("embed", "heads", "head_dim")
        q, k, v = (Dense((h, width), axes, name=name, **kw)(x)
                   for name, width in (("query", d), ("key", d), ("value", dv)))
        if own.short_conv:
            std = cfg.init_std if own.conv_init == "normal" else None  # None: uniform
            q, k, v = (ShortConvolution(own.conv_width, std, name=f"{name}_conv")(y, segment_ids)
                       for name, y in (("query", q), ("key", k), ("value", v)))
        q, k = (l2_normalize(jax.nn.silu(y.astype(jnp.float32))) for y in (q, k))
        q = (q * d ** -0.5).astype(cfg.dtype)
        k = k.astype(cfg.dtype)
        v = jax.nn.silu(v.astype(jnp.float32)).astype(cfg.dtype)
        beta = jax.nn.sigmoid(Dense((h,), ("embed", "heads"), name="beta", **kw)(x)
                              .astype(jnp.float32))
        log_scale = self.param("decay_log_scale", nn.with_logical_partitioning(
            _log_scale_init, ("heads",)), (h,), jnp.float32)
        bias = self.param("decay_bias", nn.with_logical_partitioning(
            _time_step_bias_init, ("heads",)), (h,), jnp.float32)
        step = Dense((h,), ("embed", "heads"), name="decay", **kw)(x).astype(jnp.float32)
        log_alpha = -jnp.exp(log_scale) * jax.nn.softplus(step + bias)
        out = self._mix(q, k, v, log_alpha, beta, segment_ids)
        out = HeadRMSNorm(name="norm")(out)
        if own.output_gate:
            out = output_gate(x, out, h, dv, **kw)
        out = nn.with_logical_constraint(out.astype(cfg.dtype),
                                         ("batch", "length", "heads", "head_dim"))
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        return Dense((cfg.d_model,), ("heads", "head_dim", "embed"), in_dims=2,
                     dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=out_std,
                     name="out")(out)

    def _mix(self, q, k, v, log_alpha, beta, segment_ids):
        """The gated delta rule: chunked (or the token scan for `reference`); while
        decoding, continuing the state in the cache (segments are not used)."""
        b, t, h, dk = q.shape
        chunk = self.cfg.attention.chunk_size
        if decoding(self):
            state = self.variable("cache", "state", jnp.zeros, (b, h, dk, v.shape[-1]),
                                  jnp.float32)
            if t == 1:
                out, state.value = gated_delta_rule_recurrent(
                    q, k, v, log_alpha, beta, initial_state=state.value)
            else:
                out, state.value = gated_delta_rule_chunked(
                    q, k, v, log_alpha, beta, chunk=chunk, initial_state=state.value)
            return out
        if self.reference:
            return gated_delta_rule_recurrent(q, k, v, log_alpha, beta,
                                              segment_ids=segment_ids)[0]
        mix = (gated_delta_rule_pallas if delta_rule_impl(self.cfg) == "pallas"
               else gated_delta_rule_chunked)

        def local(q, k, v, log_alpha, beta, segment_ids, initial_state):
            return mix(q, k, v, log_alpha, beta, chunk=chunk, segment_ids=segment_ids,
                       initial_state=initial_state)

        if strategy(self.cfg, self.context_parallel, t):
            return allscan_delta_rule(q, k, v, log_alpha, beta, segment_ids, local)[0]
        return local(q, k, v, log_alpha, beta, segment_ids, None)[0]
