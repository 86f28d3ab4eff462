"""Causal linear attention (`model.attention.kind=linear`), from "Transformers are RNNs:
Fast Autoregressive Transformers with Linear Attention", and the machinery the linear
kinds share (gla.py, based.py): the chunked mix over packed segments, the running
normaliser, the recurrent decoding state and the FLOPs of the chunked form.

    o_t = phi(q_t) S_t [/ phi(q_t) . z_t],  S_t = S_{t-1} + phi(k_t) v_t^T,
    z_t = z_{t-1} + phi(k_t)

Training runs `efflm.pallas_kernels.linear_attention.chunked_linear_attention`: quadratic
inside a chunk of `model.attention.chunk_size` tokens, a float32 state between chunks,
restarted at every packed segment. Decoding keeps S (and z) in the cache: a fixed
size, whatever the length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflm.errors import ConfigError, check_choice
from efflm.layers.attention.context_parallel import allscan_linear_attention, strategy
from efflm.layers.common import decoding, resolve_impl
from efflm.layers.contract import Mixer
from efflm.layers.dense import Dense
from efflm.pallas_kernels.linear_attention import (
    chunked_linear_attention,
    compiled_chunk_problem,
    linear_attention_recurrent,
    segment_cumsum,
)
from efflm.shapes import head_dim

if TYPE_CHECKING:
    from efflm.config import ModelConfig

FEATURE_MAPS = {
    "elu": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
    "identity": lambda x: x,
}


# Under mesh.sequence: the state goes between devices by an all-scan
# (`context_parallel.allscan_linear_attention`).
ALLSCAN = ("allscan",)


def mix_impl(cfg: ModelConfig, what: str) -> str:
    """`resolve_impl` for the chunked kernel (both forms mask packed segments). Pallas on
    a GPU with a chunk the compiled kernel cannot take (under `auto`) is a ConfigError."""
    impl = resolve_impl(cfg.attention.impl, ("xla", "pallas"), what)
    if impl == "pallas" and jax.default_backend() == "gpu":
        check_pallas_chunk(cfg)
    return impl


def check_pallas_chunk(cfg: ModelConfig) -> None:
    """ConfigError naming model.attention.chunk_size when the compiled Pallas kernel
    cannot take it (not a power of two)."""
    reason = compiled_chunk_problem(cfg.attention.chunk_size, "model.attention.chunk_size")
    if reason is not None:
        raise ConfigError(f"{reason}; change it or set model.attention.impl=xla")


def validate_chunk(cfg: ModelConfig) -> None:
    """The linear kinds' config check: under model.attention.impl=pallas the chunk must
    suit the compiled kernel, whatever machine validates the config."""
    if cfg.attention.impl == "pallas":
        check_pallas_chunk(cfg)


def linear_mix(module: nn.Module, cfg: ModelConfig, q, k, v, segment_ids, log_decay=None,
               normalize: bool = False, what: str = "linear attention",
               reference: bool = False):
    """The causal mix of every linear kind: q, k (batch, length, heads, dk) (features
    already applied), v (..., dv), log_decay None, (batch, length, heads) or
    (..., heads, dk). With `normalize`, outputs are divided by q_t . z_t, z_t the sum of
    the segment's keys so far. Returns (batch, length, heads, dv) in v's dtype.

    While decoding, the state S (batch, heads, dk, dv) and z (batch, heads, dk), float32,
    live in the cache, and each call continues them (segments are not used).
    `reference`: the token scan instead, q . z as a scan with values of one.
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    chunk = cfg.attention.chunk_size
    if decoding(module):
        state = module.variable("cache", "state", jnp.zeros, (b, h, dk, dv), jnp.float32)
        kw = dict(log_decay=log_decay, initial_state=state.value)
        if t == 1:
            out, state.value = linear_attention_recurrent(q, k, v, **kw)
        else:
            out, state.value = chunked_linear_attention(q, k, v, chunk=chunk, impl="xla", **kw)
        if normalize:
            z = module.variable("cache", "normaliser", jnp.zeros, (b, h, dk), jnp.float32)
            sums = z.value[:, None] + jnp.cumsum(k.astype(jnp.float32), axis=1)
            z.value = sums[:, -1]
    elif reference:
        kw = dict(log_decay=log_decay, segment_ids=segment_ids)
        out, _ = linear_attention_recurrent(q, k, v, **kw)
        if normalize:
            ones = jnp.ones((b, t, h, 1), jnp.float32)
            den = linear_attention_recurrent(q.astype(jnp.float32), k, ones, **kw)[0]
            return (out.astype(jnp.float32) / (den + 1e-6)).astype(v.dtype)
    else:
        impl = mix_impl(cfg, what)

        def local(q, k, v, log_decay, segment_ids):
            return chunked_linear_attention(q, k, v, log_decay=log_decay, chunk=chunk,
                                            impl=impl, segment_ids=segment_ids)

        if strategy(cfg, ALLSCAN, t):
            out, sums, _ = allscan_linear_attention(q, k, v, log_decay, segment_ids, local,
                                                    normalize)
        else:
            out, _ = local(q, k, v, log_decay, segment_ids)
            if normalize:
                sums = segment_cumsum(k.astype(jnp.float32), segment_ids)
    if normalize:
        den = jnp.einsum("blhk,blhk->blh", q.astype(jnp.float32), sums)
        out = out.astype(jnp.float32) / (den[..., None] + 1e-6)
    return out.astype(v.dtype)


def padded_length(cfg: ModelConfig, seq_len: int) -> int:
    """The length the chunked form runs: padded to whole chunks."""
    chunk = cfg.attention.chunk_size
    return -(-seq_len // chunk) * chunk


def chunked_mix_flops(cfg: ModelConfig, seq_len: int, heads: int, dk: int, dv: int,
                      sub: int = 0) -> float:
    """Forward matmul FLOPs per token of the chunked XLA form, over the padded length:
    per chunk of C tokens, q k^T and (scores) v over the whole C x C block (2C(dk + dv)
    per token), the incoming state read and the state update (2 dk dv each). With
    per-key-dimension gates (`sub`: the sub-chunk), the gated scores inside each
    sub-chunk add sub (4 dk + 2 dv): the (sub x sub x dk) products, their sum over dk
    and the values."""
    chunk = cfg.attention.chunk_size
    per_token = 2 * chunk * (dk + dv) + 4 * dk * dv + sub * (4 * dk + 2 * dv)
    return heads * per_token * padded_length(cfg, seq_len) / seq_len


@dataclass
class LinearSettings:
    # The feature map phi: elu (elu+1) | relu | identity; and whether outputs are divided
    # by phi(q).sum(phi(k)) (refused with identity, where it can be zero or negative).
    feature_map: str = "elu"
    normalize: bool = True


class LinearAttention(Mixer):
    """Causal linear attention with a feature map (elu+1, relu or identity) and, by
    default, the normaliser phi(q) . sum phi(k). phi(q) is scaled by head_dim^-1/2 (which
    the normaliser cancels). No rotary positions; K/V heads as many as query heads."""

    reference: bool = False  # the token scan instead of the chunked form (tests)
    decodes = True
    settings = LinearSettings
    context_parallel = ALLSCAN

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        a = cfg.attention.linear
        validate_chunk(cfg)
        check_choice("model.attention.linear.feature_map", a.feature_map, FEATURE_MAPS)
        if a.feature_map == "identity" and a.normalize:
            raise ConfigError("model.attention.linear.feature_map=identity cannot be "
                              "normalised (its phi(q).sum(phi(k)) can be zero or negative); set "
                              "model.attention.linear.normalize=false or another feature_map")

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
        h, d = cfg.attention.num_heads, head_dim(cfg)
        projections = 2 * cfg.d_model * h * d * 4
        normaliser = 2 * h * d if cfg.attention.linear.normalize else 0  # q . z, unpadded
        return projections + chunked_mix_flops(cfg, seq_len, h, d, d) + normaliser

    @nn.compact
    def __call__(self, x, positions, segment_ids, mask):
        cfg = self.cfg
        h, d = cfg.attention.num_heads, head_dim(cfg)
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=cfg.init_std)
        axes = ("embed", "heads", "head_dim")
        q = Dense((h, d), axes, name="query", **kw)(x)
        k = Dense((h, d), axes, name="key", **kw)(x)
        v = Dense((h, d), axes, name="value", **kw)(x)
        phi = FEATURE_MAPS[cfg.attention.linear.feature_map]
        q = phi(q) * jnp.asarray(d ** -0.5, q.dtype)
        k = phi(k)
        out = linear_mix(self, cfg, q, k, v, segment_ids, normalize=cfg.attention.linear.normalize,
                         reference=self.reference)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        return Dense((cfg.d_model,), ("heads", "head_dim", "embed"), in_dims=2,
                     dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=out_std,
                     name="out")(out)
