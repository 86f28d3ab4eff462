"""MXFP4 matmuls (`model.quant.kind=mxfp4`), trained as in "Quartet: Native FP4 Training
Can Be Optimal for Large Language Models".

The format is OCP microscaling FP4: E2M1 elements (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their
negatives) and one power-of-two scale (E8M0) per block of 32 along the contraction.
A block's scale comes from a threshold `t` by the OCP rule `2^(floor(log2 t) - 2)`
(`jnp.frexp`, exact at powers of two): values up to `t` land below 8 and are clipped
to 6, so a block whose largest value is up to 7.99 * 2^k saturates at 6 * 2^k. A block
of zeros gets the scale 1; a block holding a NaN dequantises to NaN (the check is
explicit: a cast to float4_e2m1fn would turn NaN into -0).

Forward (`model.quant.mxfp4.forward`):
- `quest` (QuEST's, Quartet's forward): both operands go through a Hadamard transform
  of each block of 32 along the contraction (orthogonal and symmetric, so it cancels in
  the product), and `t = clip * RMS` of the block (`clip`, 2.8: the mean-squared-error
  minimiser for Gaussian blocks under this rule; the curve is flat from 2.7 to 3.0),
  then round to nearest.
- `rtn`: no transform, `t` the block's amax, round to nearest.

Backward: `dx = g @ w^T` and `dw = x^T @ g`, each as an MXFP4 product along its own
contraction (the output features, the tokens), with a randomised Hadamard transform
(random signs from the step's `quant` key, the same for both operands of a product;
`backward_hadamard`) and stochastic rounding (`backward_rounding`). Backward scales
are `2^ceil(log2(amax / 6))`, so nothing clips and stochastic rounding is unbiased: the
result is an unbiased estimate of the straight-through gradient, from the full-precision
operands. Quartet's reference differs: it requantises the forward's quantised operands
and multiplies the gradient by QuEST's mask of the values the forward clipped (its
"trust" estimator); neither is done here.

XLA:CPU cannot multiply float4 arrays, and Hopper has no FP4 tensor cores: here every
product multiplies the dequantised float32 operands (the values are exactly MXFP4's).
A Blackwell path would hand the E2M1 codes and E8M0 scales to a block-scaled dot
(cuBLAS's MXFP4 GEMM) instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from efflm.errors import check_choice, check_positive
from efflm.layers.contract import NumberFormat, straight_through

if TYPE_CHECKING:
    from efflm.config import ModelConfig

BLOCK = 32
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)  # magnitudes
E2M1_MAX = 6.0


@dataclass
class Mxfp4Settings:
    forward: str = "quest"  # quest | rtn
    clip: float = 2.8  # quest: the block threshold, in RMS of the transformed block
    backward_rounding: str = "stochastic"  # stochastic | nearest
    backward_hadamard: bool = True  # randomised Hadamard transform in the backward


DEFAULT = Mxfp4Settings()


def hadamard_matrix(n: int = BLOCK):
    """The n x n Hadamard matrix (Sylvester), scaled to be orthogonal."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return jnp.asarray(h / np.sqrt(n))


def _blocks(x, axis: int):
    """x with `axis` moved last and split into blocks of 32: (..., n / 32, 32)."""
    x = jnp.moveaxis(x, axis, -1)
    return x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)


def _unblocks(b, axis: int):
    x = b.reshape(*b.shape[:-2], -1)
    return jnp.moveaxis(x, -1, axis)


def hadamard(x, axis: int, signs=None):
    """Each block of 32 along `axis` times the Hadamard matrix (after multiplying by
    `signs` (length of `axis`) when given: a randomised transform). Its own inverse
    when `signs` is None; with signs, `hadamard(hadamard(x, axis, s), axis) * s`."""
    if signs is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        x = x * signs.reshape(shape)
    return _unblocks(_blocks(x, axis) @ hadamard_matrix(), axis)


def scale_floor(t):
    """The OCP rule's scale 2^(floor(log2 t) - 2), 1 where t is 0, NaN where t is."""
    _, e = jnp.frexp(t)  # t = m * 2^e, m in [0.5, 1): floor(log2 t) = e - 1
    s = jnp.ldexp(jnp.ones_like(t), e - 3)
    return jnp.where(jnp.isnan(t), jnp.nan, jnp.where(t > 0, s, 1.0))


def scale_ceil(amax):
    """The smallest power of two s with amax / s <= 6 (1 for 0, NaN for NaN)."""
    m, e = jnp.frexp(amax / E2M1_MAX)  # exact powers of two keep their exponent
    s = jnp.ldexp(jnp.ones_like(amax), jnp.where(m == 0.5, e - 1, e))
    return jnp.where(jnp.isnan(amax), jnp.nan, jnp.where(amax > 0, s, 1.0))


def round_nearest(v):
    """|v| <= 6 to the nearest E2M1 value (ties to the even code, as a float4 cast)."""
    a = jnp.abs(v)
    step = jnp.where(a < 2, 0.5, jnp.where(a < 4, 1.0, 2.0))
    return jnp.sign(v) * jnp.round(a / step) * step


def round_stochastic(v, key):
    """|v| <= 6 to one of its two neighbouring E2M1 values, the upper with probability
    equal to the distance from the lower over the gap: unbiased."""
    a = jnp.abs(v)
    step = jnp.where(a < 2, 0.5, jnp.where(a < 4, 1.0, 2.0))
    low = jnp.floor(a / step) * step
    up = jax.random.uniform(key, v.shape) < (a - low) / step
    return jnp.sign(v) * jnp.minimum(low + step * up, E2M1_MAX)


def quantize_blocks(x, axis: int, threshold: str, clip: float = 2.8, key=None):
    """x quantised along `axis` in blocks of 32: (E2M1 values as float32, scales of
    shape (..., n / 32) with the blocks last). `threshold`: `amax` (OCP floor rule),
    `rms` (floor rule at clip * RMS) or `ceil` (no clipping); stochastic rounding when
    `key` is given."""
    b = _blocks(x.astype(jnp.float32), axis)
    if threshold == "rms":
        scale = scale_floor(clip * jnp.sqrt(jnp.mean(b * b, axis=-1)))
    elif threshold == "amax":
        scale = scale_floor(jnp.max(jnp.abs(b), axis=-1))
    else:
        scale = scale_ceil(jnp.max(jnp.abs(b), axis=-1))
    v = jnp.clip(b / scale[..., None], -E2M1_MAX, E2M1_MAX)
    q = round_nearest(v) if key is None else round_stochastic(v, key)
    nan = jnp.any(jnp.isnan(b), axis=-1)
    return q, jnp.where(nan, jnp.nan, scale)


def dequantize_blocks(q, scale, axis: int):
    return _unblocks(q * scale[..., None], axis)


def forward_operand(x, axis: int, settings) -> jax.Array:
    """An operand as the forward pass multiplies it, dequantised, in the transformed
    basis under `quest` (the transform cancels in the product)."""
    if settings.forward == "quest":
        q, s = quantize_blocks(hadamard(x, axis), axis, "rms", settings.clip)
    else:
        q, s = quantize_blocks(x, axis, "amax")
    return dequantize_blocks(q, s, axis)


def _backward_product(a, b, key, settings):
    """a (m, k) @ b (k, n) with both operands quantised along k (zero-padded to blocks
    of 32) for the backward pass."""
    k = a.shape[1]
    pad = -k % BLOCK
    a = jnp.pad(a.astype(jnp.float32), ((0, 0), (0, pad)))
    b = jnp.pad(b.astype(jnp.float32), ((0, pad), (0, 0)))
    k_signs, k_a, k_b = jax.random.split(key, 3)
    if settings.backward_hadamard:
        signs = jnp.where(jax.random.bernoulli(k_signs, 0.5, (k + pad,)), 1.0, -1.0)
        a, b = hadamard(a, 1, signs), hadamard(b, 0, signs)
    stochastic = settings.backward_rounding == "stochastic"
    qa, sa = quantize_blocks(a, 1, "ceil", key=k_a if stochastic else None)
    qb, sb = quantize_blocks(b, 0, "ceil", key=k_b if stochastic else None)
    return dequantize_blocks(qa, sa, 1) @ dequantize_blocks(qb, sb, 0)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def mxfp4_matmul(settings, x, w, key):
    """x (tokens, in) @ w (in, out) in MXFP4, float32 result; `key` draws the backward
    pass's signs and rounding."""
    return forward_operand(x, 1, settings) @ forward_operand(w, 0, settings)


def _mx_fwd(settings, x, w, key):
    return mxfp4_matmul(settings, x, w, key), (x, w, key)


def _mx_bwd(settings, res, g):
    x, w, key = res
    k_dx, k_dw = jax.random.split(key)
    g = g.astype(jnp.float32)
    dx = _backward_product(g, w.T, k_dx, settings)
    dw = _backward_product(x.T, g, k_dw, settings)
    return dx.astype(x.dtype), dw.astype(w.dtype), None


mxfp4_matmul.defvjp(_mx_fwd, _mx_bwd)


def pack_codes(q):
    """E2M1 values -> uint8, two 4-bit codes (sign bit, then the magnitude's index) a
    byte, first in the low nibble."""
    index = jnp.argmin(jnp.abs(jnp.abs(q).reshape(-1, 1) - jnp.asarray(E2M1)), axis=1)
    codes = (index + 8 * (jnp.signbit(q.reshape(-1)))).astype(jnp.uint8)
    codes = jnp.pad(codes, (0, codes.size % 2)).reshape(-1, 2)
    return (codes[:, 0] | (codes[:, 1] << 4)).astype(jnp.uint8)


def unpack_codes(packed, shape):
    codes = jnp.stack([packed & 15, packed >> 4], axis=1).reshape(-1)[:int(np.prod(shape))]
    value = jnp.asarray(E2M1)[codes & 7]
    return jnp.where(codes >= 8, -value, value).reshape(shape)


class Mxfp4(NumberFormat):
    """E2M1 elements, a power-of-two scale per block of 32 along the contraction."""

    weight_bits = 4
    custom_matmul = True
    settings = Mxfp4Settings
    resumable = ("forward", "clip", "backward_rounding", "backward_hadamard")

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        s = cfg.quant.mxfp4
        check_choice("model.quant.mxfp4.forward", s.forward, ("quest", "rtn"))
        check_choice("model.quant.mxfp4.backward_rounding", s.backward_rounding,
                     ("stochastic", "nearest"))
        check_positive("model.quant.mxfp4.clip", s.clip)

    @staticmethod
    def input_multiple(cfg: ModelConfig) -> tuple[int, str]:
        return BLOCK, f"model.quant.kind=mxfp4's block of {BLOCK}"

    @staticmethod
    def matmul(module, quant, x, w):
        key = module.make_rng("quant") if module.has_rng("quant") else jax.random.key(0)
        return mxfp4_matmul(quant.mxfp4, x, w, key)

    @staticmethod
    def quantize_weight(w, settings=DEFAULT):
        """w (in, out) -> (E2M1 values (in, out), scales (in / 32, out)) as the forward
        pass quantises it (under `quest`: transformed)."""
        if settings.forward == "quest":
            w = hadamard(w, 0)
        q, s = quantize_blocks(w, 0, "rms" if settings.forward == "quest" else "amax",
                               settings.clip)
        return _unblocks(q, 0), jnp.moveaxis(s, -1, 0)

    @staticmethod
    def quantize_activation(x, settings=DEFAULT):
        """x (tokens, in) -> (E2M1 values, scales (tokens, in / 32)), as the forward."""
        if settings.forward == "quest":
            x = hadamard(x, 1)
        q, s = quantize_blocks(x, 1, "rms" if settings.forward == "quest" else "amax",
                               settings.clip)
        return _unblocks(q, 1), s

    @staticmethod
    def export_weight(module, quant, w):
        return Mxfp4.quantize_weight(w, quant.mxfp4)

    @staticmethod
    def exported_matmul(quant, x, wq, w_scale):
        """x (tokens, in) @ an exported weight, as the forward pass computes it."""
        q, s = Mxfp4.quantize_activation(x, quant.mxfp4)
        xd = dequantize_blocks(_blocks(q, 1), s, 1)
        return xd @ dequantize_blocks(_blocks(wq, 0), jnp.moveaxis(w_scale, 0, -1), 0)

    @staticmethod
    def fake_quantize(module, quant, x, w):
        """The operands as the forward pass multiplies them, turned back into the
        original basis under `quest` (their product is the forward's), with
        straight-through gradients."""
        s = quant.mxfp4
        xd, wd = forward_operand(x, 1, s), forward_operand(w, 0, s)
        if s.forward == "quest":
            xd, wd = hadamard(xd, 1), hadamard(wd, 0)
        return straight_through(x, xd), straight_through(w, wd)

    pack = staticmethod(pack_codes)
    unpack = staticmethod(unpack_codes)

    @staticmethod
    def pack_scale(scale):
        """Power-of-two scales as E8M0 bytes: the exponent + 127, clamped to 0..254;
        NaN as 255."""
        _, e = jnp.frexp(scale)
        code = jnp.clip(e - 1 + 127, 0, 254)
        return jnp.where(jnp.isnan(scale), 255, code).astype(jnp.uint8)

    @staticmethod
    def unpack_scale(stored):
        scale = jnp.ldexp(jnp.ones(stored.shape, jnp.float32), stored.astype(jnp.int32) - 127)
        return jnp.where(stored == 255, jnp.nan, scale)
