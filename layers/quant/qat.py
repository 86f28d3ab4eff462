"""Quantisation-aware training of the weights (`model.quant.kind=qat`), with learned step
sizes: the end-to-end phase of "EfficientQAT: Efficient Quantization-Aware Training for
Large Language Models" on LSQ's estimator ("Learned Step Size Quantization").

Each hooked weight w (in, out) is fake-quantised to `bits` (2, 3, 4 or 8) per group
of `group_size` inputs and output column, asymmetrically:

    q = clip(round(w / s + z), 0, 2^bits - 1),   w' = (q - z) * s

with a step size `s` and zero point `z` per group, both parameters of the matmul
(`qat_step`, `qat_zero`, not weight-decayed), initialised from the group's range:
s = (max - min) / (2^bits - 1), z = round(-min / s). Activations are not quantised;
the product is taken in float32. Gradients
(LSQ, by rounding with a straight-through estimator): w's passes where the value is
inside the range and is 0 where it clips; s's is round(w/s + z) - (w/s + z) inside the
range and q - z (0 - z or 2^bits - 1 - z) where it clips; z (used rounded) gets
-s where it clips, 0 inside. Both are scaled by LSQ's factor
1 / sqrt(group_size * (2^bits - 1)), the weights sharing a step times the largest
level.

`train.trainable=quant_scales` trains the step sizes alone (EfficientQAT's E2E-QP),
typically resumed from a run trained in full precision; EfficientQAT's block-wise
reconstruction phase (Block-AP) is not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from efflm.errors import ConfigError, check_choice
from efflm.layers.contract import CALIBRATION, NumberFormat

if TYPE_CHECKING:
    from efflm.config import ModelConfig

BITS = (2, 3, 4, 8)
STEP, ZERO = "qat_step", "qat_zero"


@dataclass
class QatSettings:
    bits: int = 4
    group_size: int = 128  # inputs sharing a step size and zero point


def _groups(w, group: int):
    """w (in, out) -> (in / group, group, out)."""
    return w.reshape(w.shape[0] // group, group, w.shape[1])


def initial_step_zero(w, bits: int, group: int):
    """Step sizes and zero points (in / group, out) covering each group's range."""
    g = _groups(w.astype(jnp.float32), group)
    lo, hi = jnp.min(g, axis=1), jnp.max(g, axis=1)
    step = jnp.maximum((hi - lo) / (2 ** bits - 1), 1e-8)
    return step, jnp.round(-lo / step)


def _round_pass(x):
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _grad_scale(x, factor: float):
    """x, with its gradient times `factor`."""
    return x * factor + jax.lax.stop_gradient(x - x * factor)


def codes(w, step, zero, bits: int, group: int):
    """The integer levels q (in, out) of w, as float32."""
    g = _groups(w.astype(jnp.float32), group)
    v = g / step[:, None] + jnp.round(zero)[:, None]
    return jnp.clip(jnp.round(v), 0, 2 ** bits - 1).reshape(w.shape)


def fake_quantize_weight(w, step, zero, bits: int, group: int):
    """w' = (q - z) s with LSQ's gradients for w, s and z (module docstring)."""
    factor = 1.0 / math.sqrt(group * (2 ** bits - 1))
    s = jnp.maximum(_grad_scale(step, factor), 1e-8)[:, None]  # a step pushed below 0
    z = _round_pass(_grad_scale(zero, factor))[:, None]
    v = _groups(w.astype(jnp.float32), group) / s + z
    q = _round_pass(jnp.clip(v, 0, 2 ** bits - 1))
    return ((q - z) * s).reshape(w.shape)


def dequantize(q, step, zero, group: int):
    return ((_groups(q, group) - jnp.round(zero)[:, None]) * step[:, None]).reshape(q.shape)


class Qat(NumberFormat):
    """Fake-quantised weights with learned per-group step sizes and zero points."""

    custom_matmul = True
    settings = QatSettings
    own_params = (STEP, ZERO)
    scale_params = (STEP,)  # what train.trainable=quant_scales trains

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        s = cfg.quant.qat
        check_choice("model.quant.qat.bits", str(s.bits), tuple(str(b) for b in BITS))
        if s.group_size < 1:
            raise ConfigError(f"model.quant.qat.group_size must be > 0, got {s.group_size}")

    @staticmethod
    def input_multiple(cfg: ModelConfig) -> tuple[int, str]:
        return cfg.quant.qat.group_size, f"model.quant.qat.group_size={cfg.quant.qat.group_size}"

    @staticmethod
    def matmul(module, quant, x, w):
        return x.astype(jnp.float32) @ Qat.fake_quantize(module, quant, x, w)[1]

    @staticmethod
    def fake_quantize(module, quant, x, w):
        """(x, w') with w' fake-quantised by the module's step sizes and zero points
        (created from w's range at init; a `CALIBRATION` collection, when mutable,
        receives that initial pair from the current w)."""
        s = quant.qat
        step = module.param(STEP, lambda _: initial_step_zero(w, s.bits, s.group_size)[0])
        zero = module.param(ZERO, lambda _: initial_step_zero(w, s.bits, s.group_size)[1])
        if module.is_mutable_collection(CALIBRATION) and not module.is_initializing():
            init_step, init_zero = initial_step_zero(w, s.bits, s.group_size)
            module.put_variable(CALIBRATION, STEP, init_step)
            module.put_variable(CALIBRATION, ZERO, init_zero)
        return x, fake_quantize_weight(w, step, zero, s.bits, s.group_size)

    @staticmethod
    def export_weight(module, quant, w):
        """(levels (in, out), [step; zero] stacked (2, in / group, out))."""
        s = quant.qat
        step, zero = module.get_variable("params", STEP), module.get_variable("params", ZERO)
        return (codes(w, step, zero, s.bits, s.group_size).astype(jnp.uint8),
                jnp.stack([step, jnp.round(zero)]))

    @staticmethod
    def exported_matmul(quant, x, wq, w_scale):
        w = dequantize(wq.astype(jnp.float32), w_scale[0], w_scale[1], quant.qat.group_size)
        return x.astype(jnp.float32) @ w

    @staticmethod
    def pack(q):
        """Levels as unsigned integers, as many a byte as their range allows: four
        below 4, two below 16, else one (a byte's low bits first)."""
        flat = q.reshape(-1).astype(jnp.uint8)
        top = int(jnp.max(flat, initial=0))
        per = 4 if top < 4 else 2 if top < 16 else 1
        bits = 8 // per
        flat = jnp.pad(flat, (0, -flat.size % per)).reshape(-1, per)
        return sum(flat[:, i] << (bits * i) for i in range(per)).astype(jnp.uint8)

    @staticmethod
    def unpack(stored, shape):
        n = math.prod(shape)
        per = max(1, round(n / stored.size))
        bits = 8 // per
        levels = jnp.stack([(stored >> (bits * i)) & (2 ** bits - 1) for i in range(per)],
                           axis=1)
        return levels.reshape(-1)[:n].reshape(shape)
