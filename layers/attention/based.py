"""Based (`model.attention.kind=based`), from "Simple linear attention language models
balance the recall-throughput tradeoff": in one layer, linear attention with the
second-order Taylor feature map over a small projected feature dim, plus sliding-window
softmax attention over the last `model.attention.based.window` tokens; the two branches share
the values and are summed per head before the output projection.

    phi(x) = [1, x, vec(x x^T) / sqrt(2)]   (1 + d + d^2 features for d = feature_dim)
    phi(q / sqrt(d)) . phi(k) = 1 + s + s^2 / 2,  s = q . k / sqrt(d)   (> 0, exp's Taylor)

The linear branch is normalised by phi(q) . sum phi(k). On the Pallas path the features
are zero-padded to a power of two (Triton's blocks; 273 -> 512 for d = 16), which leaves
every product unchanged. Decoding keeps the linear state and a ring buffer of the last
`window` keys and values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import flax.linen as nn
import jax.numpy as jnp

from efflm.errors import ConfigError, check_positive
from efflm.layers.attention.context_parallel import context_parallel_attention, strategy
from efflm.layers.attention.linear import (
    ALLSCAN,
    chunked_mix_flops,
    linear_mix,
    mix_impl,
    validate_chunk,
)
from efflm.layers.attention.softmax import dot_product_attention
from efflm.layers.common import decoding
from efflm.layers.contract import Mixer
from efflm.layers.dense import Dense
from efflm.layers.rotary import apply_rotary
from efflm.shapes import head_dim

if TYPE_CHECKING:
    from efflm.config import ModelConfig


def taylor_features(x):
    """[1, x, vec(x x^T) / sqrt(2)] over the last axis (float32)."""
    x = x.astype(jnp.float32)
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], -1)
    return jnp.concatenate([jnp.ones_like(x[..., :1]), x, outer * 2 ** -0.5], axis=-1)


def num_features(feature_dim: int) -> int:
    return 1 + feature_dim + feature_dim ** 2


def pad_to_power_of_two(x):
    """Zero-pad the last axis to the next power of two."""
    n = x.shape[-1]
    pad = (1 << (n - 1).bit_length()) - n
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x


def window_mask(q_pos, k_pos, window: int, q_seg=None, k_seg=None):
    """(batch, 1, queries, keys): keys at or before the query and fewer than `window`
    positions back, in the same segment if segments are given."""
    back = q_pos[:, :, None] - k_pos[:, None, :]
    mask = (back >= 0) & (back < window)
    if q_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    return mask[:, None]


def sliding_window_attention(q, k, v, segment_ids, window: int):
    """Causal softmax attention over the last `window` tokens, by blocks of `window`
    queries, each over its own and the previous block's keys (2 window keys a query)."""
    b, t = q.shape[:2]
    pad = -t % window
    n = (t + pad) // window

    def padded(a, value=0):
        return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=value)

    def blocks(a):  # (b, n window, ...) -> (b n, window, ...)
        return a.reshape(b * n, window, *a.shape[2:])

    def with_previous(a, value):  # (b, n window, ...) -> (b n, 2 window, ...)
        a = jnp.pad(a, [(0, 0), (window, 0)] + [(0, 0)] * (a.ndim - 2), constant_values=value)
        a = a.reshape(b, n + 1, window, *a.shape[2:])
        both = jnp.concatenate([a[:, :-1], a[:, 1:]], axis=2)
        return both.reshape(b * n, 2 * window, *a.shape[3:])

    pos = jnp.broadcast_to(jnp.arange(t + pad), (b, t + pad))
    seg = padded(jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids, -1)
    # Before the first block: a position `window` back and a segment no query has.
    mask = window_mask(blocks(pos), with_previous(pos, -window), window,
                       blocks(seg), with_previous(seg, -2))
    out = dot_product_attention(blocks(padded(q)), with_previous(padded(k), 0),
                                with_previous(padded(v), 0), mask)
    return out.reshape(b, t + pad, *out.shape[2:])[:, :t]


def cached_window_attention(module: nn.Module, q, k, v, positions, window: int):
    """Attend from `q` to the ring buffer of the last `window` keys and values plus this
    call's own, then keep this call's last `window` tokens in the buffer."""
    b, t, h, d = k.shape
    ring_k = module.variable("cache", "window_key", jnp.zeros, (b, window, h, d), k.dtype)
    ring_v = module.variable("cache", "window_value", jnp.zeros, (b, window, h, d), v.dtype)
    ring_pos = module.variable("cache", "window_position", jnp.zeros, (b, window), jnp.int32)
    valid = module.variable("cache", "window_valid", jnp.zeros, (b, window), jnp.bool_)
    keys = jnp.concatenate([ring_k.value, k], axis=1)
    values = jnp.concatenate([ring_v.value, v], axis=1)
    k_pos = jnp.concatenate([ring_pos.value, positions], axis=1)
    k_valid = jnp.concatenate([valid.value, jnp.ones_like(positions, bool)], axis=1)
    mask = window_mask(positions, k_pos, window) & k_valid[:, None, None, :]
    out = dot_product_attention(q, keys, values, mask)
    keep = min(t, window)  # later tokens overwrite earlier ones in the same slot
    slots = positions[:, -keep:] % window
    rows = jnp.arange(b)[:, None]
    ring_k.value = ring_k.value.at[rows, slots].set(k[:, -keep:])
    ring_v.value = ring_v.value.at[rows, slots].set(v[:, -keep:])
    ring_pos.value = ring_pos.value.at[rows, slots].set(positions[:, -keep:])
    valid.value = valid.value.at[rows, slots].set(True)
    return out


@dataclass
class BasedSettings:
    # Projected feature dim d of the Taylor map (1 + d + d^2 features) and the width of
    # the sliding-window softmax branch, in tokens.
    feature_dim: int = 16
    window: int = 64


class BasedAttention(Mixer):
    """Taylor-feature linear attention plus sliding-window softmax attention in one
    layer (see the module docstring)."""

    # The token scan and a full masked softmax instead of the chunked and blocked forms.
    reference: bool = False
    decodes = True
    settings = BasedSettings
    # Under mesh.sequence: the linear branch by all-scan, the window through its halo.
    context_parallel = ALLSCAN

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        b = cfg.attention.based
        validate_chunk(cfg)
        check_positive("model.attention.based.feature_dim", b.feature_dim)
        check_positive("model.attention.based.window", b.window)
        if b.window > cfg.max_seq_len:
            raise ConfigError(f"model.attention.based.window={b.window} is larger than "
                              f"model.max_seq_len={cfg.max_seq_len}; lower it")

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
        """The XLA forms': 1 + d + d^2 features in the chunked mix (the Pallas path pads
        them to a power of two), 2 window keys a query in the window branch."""
        a = cfg.attention
        h, d, f = a.num_heads, head_dim(cfg), a.based.feature_dim
        projections = 2 * cfg.d_model * h * (2 * f + 4 * d)  # q, k features; q, k, v, out
        features = num_features(f)
        linear = chunked_mix_flops(cfg, seq_len, h, features, d) + 2 * h * features
        window = a.based.window
        padded = -(-seq_len // window) * window
        softmax = 2 * 2 * (2 * window) * h * d * padded / seq_len
        return projections + linear + softmax

    @nn.compact
    def __call__(self, x, positions, segment_ids, mask):
        cfg = self.cfg
        a = cfg.attention
        h, d, f = a.num_heads, head_dim(cfg), a.based.feature_dim
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=cfg.init_std)
        axes = ("embed", "heads", "head_dim")
        qf = Dense((h, f), ("embed", "heads", None), name="feature_query", **kw)(x)
        kf = Dense((h, f), ("embed", "heads", None), name="feature_key", **kw)(x)
        q = Dense((h, d), axes, name="query", **kw)(x)
        k = Dense((h, d), axes, name="key", **kw)(x)
        v = Dense((h, d), axes, name="value", **kw)(x)
        qf = taylor_features(qf * f ** -0.5).astype(cfg.dtype)
        kf = taylor_features(kf).astype(cfg.dtype)
        training = not decoding(self) and not self.reference
        if training and mix_impl(cfg, "based attention") == "pallas":
            qf, kf = pad_to_power_of_two(qf), pad_to_power_of_two(kf)
        linear = linear_mix(self, cfg, qf, kf, v, segment_ids, normalize=True,
                            what="based attention", reference=self.reference)
        q, k = apply_rotary(q, positions, a.rope_theta), apply_rotary(k, positions, a.rope_theta)
        if decoding(self):
            local = cached_window_attention(self, q, k, v, positions, a.based.window)
        elif self.reference:
            t = x.shape[1]
            idx = jnp.broadcast_to(jnp.arange(t), x.shape[:2])
            mask = window_mask(idx, idx, a.based.window, segment_ids, segment_ids)
            local = dot_product_attention(q, k, v, mask)
        elif strategy(cfg, self.context_parallel, x.shape[1]):
            window = functools.partial(sliding_window_attention, window=a.based.window)
            local = context_parallel_attention(q, k, v, segment_ids, "halo", attend=window,
                                               halo=a.based.window - 1)
        else:
            local = sliding_window_attention(q, k, v, segment_ids, a.based.window)
        out = nn.with_logical_constraint(linear + local, ("batch", "length", "heads",
                                                          "head_dim"))
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        return Dense((cfg.d_model,), ("heads", "head_dim", "embed"), in_dims=2,
                     dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=out_std,
                     name="out")(out)
