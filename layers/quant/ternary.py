"""Ternary weights (`model.quant.kind=ternary`): 1.58-bit weights in {-1, 0, +1} with an
absmean scale and 8-bit absmax activations, as in "The Era of 1-bit LLMs: All Large
Language Models are in 1.58 Bits" (BitNet b1.58) and "Scalable MatMul-free Language
Modeling". The float32 latent weights are what the optimiser updates."""

import jax.numpy as jnp

from efflm.layers.contract import NumberFormat
from efflm.layers.quant import int8

EPS = 1e-8


class Ternary(NumberFormat):
    weight_bits = 2  # packed four to a byte on export

    @staticmethod
    def pack(q):
        return pack(q)

    @staticmethod
    def unpack(stored, shape):
        return unpack(stored, shape)

    @staticmethod
    def quantize_weight(w):
        """w: (in, out) -> (int8 in {-1, 0, 1}, scale (1, 1)): RoundClip(w / mean|w|, -1, 1)."""
        w = w.astype(jnp.float32)
        scale = jnp.mean(jnp.abs(w), keepdims=True) + EPS  # NaN stays NaN
        return int8.quantize_with_scale(w, scale, qmax=1), scale

    @staticmethod
    def quantize_activation(x):
        """8-bit absmax per token, as int8."""
        return int8.quantize(x, axis=-1)


def pack(q):
    """int8 values in {-1, 0, 1} -> uint8, four 2-bit codes (value + 1) per byte."""
    codes = (q.reshape(-1).astype(jnp.int32) + 1).astype(jnp.uint8)
    codes = jnp.pad(codes, (0, -codes.size % 4)).reshape(-1, 4)
    return (codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4)
            | (codes[:, 3] << 6)).astype(jnp.uint8)


def unpack(packed, shape):
    """Inverse of `pack` for an array of `shape`."""
    size = 1
    for d in shape:
        size *= d
    codes = jnp.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], axis=1).reshape(-1)
    return (codes[:size].astype(jnp.int8) - 1).reshape(shape)
