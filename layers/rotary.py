"""Rotary position embedding ("RoFormer: Enhanced Transformer with Rotary Position Embedding")."""

import jax.numpy as jnp


def apply_rotary(x, positions, theta: float = 10000.0):
    """Rotate pairs (first half, second half) of the last axis of `x` (..., length, heads, dim).

    `positions` has shape (batch, length); the angles are computed in float32.
    """
    dim = x.shape[-1]
    half = dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (batch, length, half)
    sin = jnp.sin(angles)[..., None, :]
    cos = jnp.cos(angles)[..., None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
