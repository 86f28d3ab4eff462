"""The quantised-matmul hook: every projection covered by `model.quant.targets` (the
attention and MLP Dense layers, the output head) computes `x @ w` here, through the
N:M mask (`nm.py`) and the number format of `model.quant.kind` (a format with its own
matmul, fp8, computes it: `NumberFormat.custom_matmul`)."""

import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflm.layers.common import flat_matmul, sow_stat
from efflm.layers.quant import QUANT
from efflm.layers.quant.nm import nm_mask, parse_nm, sr_ste

# Collection holding the exported (integer weights, scale) of each hooked matmul: filled
# by a forward pass with it mutable (`efflm export`), used instead of the latent weights
# when given (a reloaded export).
QUANTIZED = "quantized"


def _scaled_dot(fmt, xq, x_scale, wq, w_scale):
    return fmt.dot(xq, wq) * x_scale * w_scale


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def quantized_matmul(fmt, x, w):
    """x (tokens, in) @ w (in, out) in `fmt`: quantised operands (`fmt.dot`), float32
    result. Gradients pass straight through the quantisers: d/dx = g @ w_q^T,
    d/dw = x_q^T @ g with the dequantised operands."""
    xq, sx = fmt.quantize_activation(x)
    wq, sw = fmt.quantize_weight(w)
    return _scaled_dot(fmt, xq, sx, wq, sw)


def _qm_fwd(fmt, x, w):
    xq, sx = fmt.quantize_activation(x)
    wq, sw = fmt.quantize_weight(w)
    # Zero-size arrays carry the operands' dtypes for the gradients.
    return _scaled_dot(fmt, xq, sx, wq, sw), (xq, sx, wq, sw, jnp.zeros((0,), x.dtype),
                                         jnp.zeros((0,), w.dtype))


def _qm_bwd(fmt, res, g):
    xq, sx, wq, sw, x_dtype, w_dtype = res
    g = g.astype(jnp.float32)
    dx = g @ (wq.astype(jnp.float32) * sw).T
    dw = (xq.astype(jnp.float32) * sx).T @ g
    return dx.astype(x_dtype.dtype), dw.astype(w_dtype.dtype)


quantized_matmul.defvjp(_qm_fwd, _qm_bwd)


def _ste(x, value):
    """`value` forward, the identity's gradient backward."""
    return x + jax.lax.stop_gradient(value.astype(x.dtype) - x)


def fake_quantize(fmt, x, w):
    """The dequantised operands with straight-through gradients (the plain-JAX reference
    of `quantized_matmul`: `x' @ w'` equals it up to float rounding)."""
    xq, sx = fmt.quantize_activation(x)
    wq, sw = fmt.quantize_weight(w)
    return (_ste(x, xq.astype(jnp.float32) * sx), _ste(w, wq.astype(jnp.float32) * sw))


def reference_matmul(fmt, x, w):
    xd, wd = fake_quantize(fmt, x, w)
    return xd.astype(jnp.float32) @ wd.astype(jnp.float32)


class QuantMatmul(nn.Module):
    """`x @ w` over the trailing `in_dims` axes of `x`, in the model's number format and
    sparsity when `target` is one of `model.quant.targets`, else plain.

    Keeps the N:M mask of the previous step in the `state` collection (logical `axes`
    of `w`) and logs `nm_flip_rate`, the fraction of mask entries that changed.
    """

    quant: Any  # QuantConfig
    sparsity: Any  # SparsityConfig
    target: str
    axes: tuple[str | None, ...] = ()
    dtype: str = "float32"

    def active(self) -> bool:
        on = QUANT[self.quant.kind] is not None or bool(self.sparsity.nm)
        return on and self.target in self.quant.targets

    def _sparsify(self, w2d, shape):
        n, m = parse_nm(self.sparsity.nm)
        mask = nm_mask(jax.lax.stop_gradient(w2d), n, m)
        init = nn.with_logical_partitioning(
            lambda: mask.reshape(shape).astype(jnp.int8), self.axes) if self.axes else (
            lambda: mask.reshape(shape).astype(jnp.int8))
        prev = self.variable("state", "nm_mask", init)
        if self.is_mutable_collection("state") and not self.is_initializing():
            changed = prev.value.reshape(mask.shape) != mask.astype(jnp.int8)
            sow_stat(self, "nm_flip_rate", jnp.mean(changed.astype(jnp.float32)))
            prev.value = mask.reshape(shape).astype(jnp.int8)
        return sr_ste(w2d, mask, float(self.sparsity.decay))

    def _operands(self, x, w, in_dims):
        """(x as (tokens, in), w as (in, out) after the N:M mask) and the output shape."""
        lead, width = x.shape[:-in_dims], math.prod(x.shape[-in_dims:])
        w2d = w.reshape(width, -1)
        if self.sparsity.nm:
            w2d = self._sparsify(w2d, w.shape)
        return x.reshape(-1, width), w2d, (*lead, *w.shape[in_dims:])

    @nn.compact
    def __call__(self, x, w, in_dims: int = 1, operands: bool = False):
        """`x @ w`; with `operands`, the pair (x, w) the fused cross-entropy multiplies
        itself: masked and fake-quantised (dequantised, straight-through)."""
        if operands:
            return self._fake_operands(x, w)
        if not self.active():
            return flat_matmul(x.astype(self.dtype), w.astype(self.dtype), in_dims)
        fmt = QUANT[self.quant.kind]
        if fmt is not None and self.has_variable(QUANTIZED, "weight"):  # a reloaded export
            x2d = x.reshape(-1, math.prod(x.shape[-in_dims:]))
            wq = self.get_variable(QUANTIZED, "weight")
            xq, sx = fmt.quantize_activation(x2d)
            y = _scaled_dot(fmt, xq, sx, wq.reshape(x2d.shape[1], -1),
                            self.get_variable(QUANTIZED, "scale"))
            return y.astype(self.dtype).reshape(*x.shape[:-in_dims], *wq.shape[in_dims:])
        x2d, w2d, out_shape = self._operands(x, w, in_dims)
        if fmt is None:
            y = x2d.astype(self.dtype) @ w2d.astype(self.dtype)
        else:
            if self.is_mutable_collection(QUANTIZED):
                wq, sw = fmt.quantize_weight(w2d)
                self.put_variable(QUANTIZED, "weight", wq.reshape(w.shape))
                self.put_variable(QUANTIZED, "scale", sw)
            y = (fmt.matmul(self, self.quant, x2d, w2d) if fmt.custom_matmul
                 else quantized_matmul(fmt, x2d, w2d))
        return y.astype(self.dtype).reshape(out_shape)

    def _fake_operands(self, x, w):
        if not self.active():
            return x, w
        x2d, w2d, _ = self._operands(x, w, 1)
        fmt = QUANT[self.quant.kind]
        if fmt is not None:
            x2d, w2d = fake_quantize(fmt, x2d, w2d)
        return x2d.reshape(x.shape).astype(x.dtype), w2d.astype(w.dtype)
