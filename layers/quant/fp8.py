"""FP8 matmuls (`model.quant.kind=fp8`): activations and weights in float8 e4m3, output
gradients in e5m2, float32 accumulation, one scale per tensor.

Scaling (`model.quant.fp8.scaling`):
- `current`: each tensor's scale from its own amax, computed just in time (the
  gradient's in the backward pass).
- `delayed` (the Transformer Engine recipe): each hooked matmul keeps the amaxes of its
  activation, weight and output gradient over the last `model.quant.fp8.history`
  steps in the `state` collection; a scale is the largest amax of its history over the
  format's largest value (1 on the first step, with no history yet).
  The step's amaxes come back as the cotangent of a zero variable in the `observed`
  collection (`efflm.layers.common.OBSERVED`): the train step takes their max over
  microbatches and rolls each history once per step.

Values are clipped to the format's finite range before every cast (a cast of 1000 to
e4m3 gives NaN, of 1e6 to e5m2 inf); a NaN stays NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from efflm.errors import check_choice, check_positive
from efflm.layers.common import OBSERVED, observe_update
from efflm.layers.contract import NumberFormat
from efflm.layers.quant.int8 import scale_of

if TYPE_CHECKING:
    from efflm.config import ModelConfig

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
E4M3_MAX = float(jnp.finfo(E4M3).max)  # 448
E5M2_MAX = float(jnp.finfo(E5M2).max)  # 57344
HISTORY = "fp8_amax_history"  # (history, 3): rows of (activation, weight, gradient) amax


@dataclass
class Fp8Settings:
    scaling: str = "delayed"  # delayed | current
    history: int = 16  # delayed: steps of amax history per tensor


def cast(x, dtype, scale):
    """`x / scale` clipped to `dtype`'s finite range, in `dtype`."""
    limit = float(jnp.finfo(dtype).max)
    return jnp.clip(x.astype(jnp.float32) / scale, -limit, limit).astype(dtype)


def amax(x):
    return jnp.max(jnp.abs(x.astype(jnp.float32)))


def _dot(a, b):
    return jax.lax.dot(a, b, preferred_element_type=jnp.float32)


CURRENT = -1.0  # a `recorded` amax meaning: scale by the tensor's own amax now


def _scale(recorded, now, limit):
    """The scale of a tensor: from its recorded amax (delayed scaling: the history's
    largest, 0 before any step, which gives the scale 1), or from its amax `now` where
    `recorded` is CURRENT."""
    return scale_of(jnp.where(recorded == CURRENT, now, recorded), limit)


@jax.custom_vjp
def fp8_matmul(x, w, recorded, observed):
    """x (tokens, in) @ w (in, out) as an fp8 dot, float32 result.

    `recorded` (3,): the amaxes that set the scales of x, w and the output gradient
    (delayed scaling: the history's largest); a CURRENT entry scales that tensor by its
    own amax. The backward pass quantises the output gradient to e5m2 and multiplies it
    with the saved e4m3 operands. The cotangent of `observed` (3,) is this call's amax
    of x, w and the output gradient.
    """
    return _fp8_fwd(x, w, recorded, observed)[0]


def _fp8_fwd(x, w, recorded, observed):
    ax, aw = amax(x), amax(w)
    sx, sw = _scale(recorded[0], ax, E4M3_MAX), _scale(recorded[1], aw, E4M3_MAX)
    xq, wq = cast(x, E4M3, sx), cast(w, E4M3, sw)
    # Zero-size arrays carry the operands' dtypes for the gradients.
    # Scaled as the exported form is (layers/quant/matmul.py), so its reload is exact.
    return _dot(xq, wq) * sx * sw, (xq, wq, sx, sw, recorded, ax, aw,
                                      jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _fp8_bwd(res, g):
    xq, wq, sx, sw, recorded, ax, aw, x_dtype, w_dtype = res
    ag = amax(g)
    sg = _scale(recorded[2], ag, E5M2_MAX)
    gq = cast(g, E5M2, sg)
    dx = _dot(gq, wq.T) * (sg * sw)
    dw = _dot(xq.T, gq) * (sx * sg)
    return (dx.astype(x_dtype.dtype), dw.astype(w_dtype.dtype), jnp.zeros_like(recorded),
            jnp.stack([ax, aw, ag]))


fp8_matmul.defvjp(_fp8_fwd, _fp8_bwd)


def reference_matmul(x, w, recorded):
    """The forward of `fp8_matmul` with its quantised operands dequantised: equal to it
    up to float32 rounding."""
    sx, sw = _scale(recorded[0], amax(x), E4M3_MAX), _scale(recorded[1], amax(w), E4M3_MAX)
    xd = cast(x, E4M3, sx).astype(jnp.float32) * sx
    wd = cast(w, E4M3, sw).astype(jnp.float32) * sw
    return xd @ wd


@observe_update(HISTORY)
def roll_history(cfg, history, observed):
    """The history one step on: its rows shifted down, the step's amaxes (the max over
    its microbatches) first. Acts on the last two axes (a scanned stack adds one)."""
    return jnp.concatenate([observed[..., None, :], history[..., :-1, :]], axis=-2)


class Fp8(NumberFormat):
    """float8 e4m3 operands, e5m2 output gradients, per-tensor scales."""

    weight_bits = 8
    custom_matmul = True
    settings = Fp8Settings  # both settings shape the state: a resume keeps them

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        s = cfg.quant.fp8
        check_choice("model.quant.fp8.scaling", s.scaling, ("delayed", "current"))
        check_positive("model.quant.fp8.history", s.history)

    @staticmethod
    def quantize_weight(w):
        """w (in, out) -> (e4m3 (in, out), its per-tensor scale): the export's form."""
        scale = scale_of(amax(w), E4M3_MAX)
        return cast(w, E4M3, scale), scale

    @staticmethod
    def quantize_activation(x):
        """x (tokens, in) -> (e4m3, its current per-tensor scale)."""
        scale = scale_of(amax(x), E4M3_MAX)
        return cast(x, E4M3, scale), scale

    @staticmethod
    def dot(xq, wq):
        return _dot(xq, wq)

    @staticmethod
    def pack(q):
        """float8 weights stored as their bytes (numpy's .npz has no float8 type)."""
        return jax.lax.bitcast_convert_type(q, jnp.uint8)

    @staticmethod
    def unpack(stored, shape):
        return jax.lax.bitcast_convert_type(stored, E4M3).reshape(shape)

    @staticmethod
    def matmul(module, quant, x, w):
        """`fp8_matmul` with the module's delayed scaling state (its amax history in
        `state`, its observed amaxes in OBSERVED), or current scaling."""
        s = quant.fp8
        if s.scaling == "current":
            return fp8_matmul(x, w, jnp.full((3,), CURRENT), jnp.zeros((3,)))
        history = module.variable("state", HISTORY, jnp.zeros, (s.history, 3), jnp.float32)
        if module.is_initializing() or module.has_variable(OBSERVED, HISTORY):
            observed = module.variable(OBSERVED, HISTORY, jnp.zeros, (3,), jnp.float32).value
        else:  # outside training (eval, generation): nothing to observe
            observed = jnp.zeros((3,))
        return fp8_matmul(x, w, jnp.max(history.value, axis=0), observed)
