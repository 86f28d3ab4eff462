"""The quantised-matmul hook: every projection covered by `model.quant.targets` (the
attention and MLP Dense layers, the output head) computes `x @ w` here, through the
N:M mask (`nm.py`) and the number format of `model.quant.kind` (a format with its own
matmul, fp8, computes it: `NumberFormat.custom_matmul`). The routed experts (target
`experts`) are masked by `sparsify` in the MoE layer and multiplied by
`expert_matmul` (or, in the grouped matmul, `fake_quantize_rows` and
`fake_quantize_experts`) inside the dispatch."""

import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflm.layers.common import flat_matmul, sow_stat
from efflm.layers.contract import straight_through
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


def quantize_experts(fmt, w):
    """w (experts, in, out) quantised as `fmt`'s weights once per expert: (wq, scale),
    each with a leading expert axis, outside the gradient."""
    return jax.vmap(fmt.quantize_weight)(jax.lax.stop_gradient(w))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def prequantized_matmul(fmt, x, w, wq, w_scale):
    """`quantized_matmul(fmt, x, w)` given w's quantisation (`wq`, `w_scale`, computed
    once outside a loop over row blocks); the gradient reaches `w` straight through."""
    xq, sx = fmt.quantize_activation(x)
    return _scaled_dot(fmt, xq, sx, wq, w_scale)


def _pq_fwd(fmt, x, w, wq, w_scale):
    xq, sx = fmt.quantize_activation(x)
    return _scaled_dot(fmt, xq, sx, wq, w_scale), (
        xq, sx, wq, w_scale, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _pq_bwd(fmt, res, g):
    return (*_qm_bwd(fmt, res, g), None, None)


prequantized_matmul.defvjp(_pq_fwd, _pq_bwd)


def fake_quantize(fmt, x, w, quant=None):
    """The dequantised operands with the format's gradients (the plain-JAX reference of
    `quantized_matmul`: `x' @ w'` equals it up to float rounding)."""
    return fmt.fake_quantize(None, quant, x, w)


def reference_matmul(fmt, x, w, quant=None):
    xd, wd = fake_quantize(fmt, x, w, quant)
    return xd.astype(jnp.float32) @ wd.astype(jnp.float32)


def expert_format(cfg):
    """The number format of the routed experts' matmuls (a ModelConfig's): that of
    model.quant.kind when `experts` is a target, else None. A format with its own matmul
    (fp8, mxfp4, qat) does not cover them (validation refuses it)."""
    fmt = QUANT[cfg.quant.kind]
    if fmt is None or fmt.custom_matmul or "experts" not in cfg.quant.targets:
        return None
    return fmt


def expert_matmul(fmt):
    """`mm(a, w, prepared=None)`: a (rows, in) @ w (in, out), or batched over a leading
    expert axis, in `fmt` (`quantized_matmul`; None: plain), in a's dtype; `prepared`:
    w's (wq, scale) from `quantize_experts`, for one expert."""
    def mm(a, w, prepared=None):
        if fmt is None:
            return jnp.matmul(a, w)
        if prepared is not None:
            return prequantized_matmul(fmt, a, w, *prepared).astype(a.dtype)
        one = partial(quantized_matmul, fmt)
        return (one(a, w) if a.ndim == 2 else jax.vmap(one)(a, w)).astype(a.dtype)
    return mm


def fake_quantize_rows(fmt, x):
    """x (rows, in) quantised per row as `fmt`'s activations, dequantised, with a
    straight-through gradient."""
    xq, sx = fmt.quantize_activation(x)
    return straight_through(x, xq.astype(jnp.float32) * sx)


def fake_quantize_experts(fmt, w):
    """w (experts, in, out) quantised per expert as `fmt`'s weights, dequantised, with a
    straight-through gradient."""
    def one(w):
        wq, sw = fmt.quantize_weight(w)
        return wq.astype(jnp.float32) * sw
    return straight_through(w, jax.vmap(one)(w))


def sparsify(module, sparsity, w, in_dims: int, axes, name: str = "nm_mask",
             in_axis: int = 0):
    """`w` under its N:M mask (`model.sparsity`), along the `in_dims` input axes that
    start at `in_axis`, trained with SR-STE. Keeps the mask of the previous step in
    `module`'s `state` collection as `name` (logical `axes` of `w`) and logs
    `nm_flip_rate`, the fraction of mask entries that changed."""
    n, m = parse_nm(sparsity.nm)
    moved = jnp.moveaxis(w, in_axis, 0) if in_axis else w
    w2d = moved.reshape(math.prod(moved.shape[:in_dims]), -1)
    mask = nm_mask(jax.lax.stop_gradient(w2d), n, m)
    full = jnp.moveaxis(mask.reshape(moved.shape), 0, in_axis).astype(jnp.int8)
    init = (nn.with_logical_partitioning(lambda: full, axes) if axes else (lambda: full))
    prev = module.variable("state", name, init)
    if module.is_mutable_collection("state") and not module.is_initializing():
        sow_stat(module, "nm_flip_rate", jnp.mean((prev.value != full).astype(jnp.float32)))
        prev.value = full
    masked = sr_ste(w2d, mask, float(sparsity.decay)).reshape(moved.shape)
    return jnp.moveaxis(masked, 0, in_axis) if in_axis else masked


class QuantMatmul(nn.Module):
    """`x @ w` over the trailing `in_dims` axes of `x`, in the model's number format and
    sparsity when `target` is one of `model.quant.targets`, else plain.

    Keeps the N:M mask of the previous step in the `state` collection (`sparsify`).
    """

    quant: Any  # QuantConfig
    sparsity: Any  # SparsityConfig
    target: str
    axes: tuple[str | None, ...] = ()
    dtype: str = "float32"

    def active(self) -> bool:
        on = QUANT[self.quant.kind] is not None or bool(self.sparsity.nm)
        return on and self.target in self.quant.targets

    def _operands(self, x, w, in_dims):
        """(x as (tokens, in), w as (in, out) after the N:M mask) and the output shape."""
        lead, width = x.shape[:-in_dims], math.prod(x.shape[-in_dims:])
        if self.sparsity.nm:
            w = sparsify(self, self.sparsity, w, in_dims, self.axes)
        return x.reshape(-1, width), w.reshape(width, -1), (*lead, *w.shape[in_dims:])

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
            y = fmt.exported_matmul(self.quant, x2d, wq.reshape(x2d.shape[1], -1),
                                    self.get_variable(QUANTIZED, "scale"))
            return y.astype(self.dtype).reshape(*x.shape[:-in_dims], *wq.shape[in_dims:])
        x2d, w2d, out_shape = self._operands(x, w, in_dims)
        if fmt is None:
            y = x2d.astype(self.dtype) @ w2d.astype(self.dtype)
        else:
            y = (fmt.matmul(self, self.quant, x2d, w2d) if fmt.custom_matmul
                 else quantized_matmul(fmt, x2d, w2d))
            if self.is_mutable_collection(QUANTIZED) and not self.is_initializing():
                wq, sw = fmt.export_weight(self, self.quant, w2d)
                self.put_variable(QUANTIZED, "weight", wq.reshape(w.shape))
                self.put_variable(QUANTIZED, "scale", sw)
        return y.astype(self.dtype).reshape(out_shape)

    def _fake_operands(self, x, w):
        if not self.active():
            return x, w
        x2d, w2d, _ = self._operands(x, w, 1)
        fmt = QUANT[self.quant.kind]
        if fmt is not None:
            x2d, w2d = fmt.fake_quantize(self, self.quant, x2d, w2d)
        return x2d.reshape(x.shape).astype(x.dtype), w2d.astype(w.dtype)
