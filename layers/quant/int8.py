"""Dynamic symmetric int8 (`model.quant.kind=int8`): weights with one scale per output
channel, activations with one per token, int32 accumulation (the AQT recipe)."""

import jax.numpy as jnp

from efflm.layers.contract import NumberFormat

QMAX = 127  # symmetric: -128 is never used


def scale_of(amax, limit: float = QMAX):
    """Scale mapping `amax` to `limit` (the format's largest value); 1 for an all-zero
    slice, NaN when the slice has one."""
    return jnp.where(amax == 0, 1.0, amax / limit)


def quantize_with_scale(x, scale, qmax: int = QMAX):
    """round(x / scale) clipped to [-qmax, qmax] as int8.

    Clipping comes before the cast: XLA's float->int8 cast saturates to -128..127 and
    turns NaN into 0. A NaN here has already made its slice's scale NaN (`scale_of`), so
    the dequantised value is NaN rather than a silent zero.
    """
    q = jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -qmax, qmax)
    return q.astype(jnp.int8)


def quantize(x, axis):
    """(int8 values, float32 scale) with one scale per slice reduced over `axis`."""
    x = x.astype(jnp.float32)
    scale = scale_of(jnp.max(jnp.abs(x), axis=axis, keepdims=True))
    return quantize_with_scale(x, scale), scale


def dequantize(q, scale):
    return q.astype(jnp.float32) * scale


class Int8(NumberFormat):
    """int8 weights (per output channel) and activations (per token)."""

    weight_bits = 8

    @staticmethod
    def quantize_weight(w):
        """w: (in, out) -> (int8 (in, out), scale (1, out))."""
        return quantize(w, axis=0)

    @staticmethod
    def quantize_activation(x):
        """x: (tokens, in) -> (int8 (tokens, in), scale (tokens, 1))."""
        return quantize(x, axis=-1)
