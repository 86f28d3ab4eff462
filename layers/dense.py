"""Dense projections with logically named kernels, through the quantised-matmul hook
when the model's number format or sparsity covers them."""

from typing import Any

import flax.linen as nn

from efflm.layers.common import flat_matmul, param_dtype
from efflm.layers.quant.matmul import QuantMatmul


def dense_init(std: float):
    return nn.initializers.normal(stddev=std)


class Dense(nn.Module):
    """`x @ kernel` over the trailing `in_dims` axes, kernel annotated with logical axis names.

    `features` may be a tuple (e.g. heads, head_dim); `axes` names the kernel's axes
    (input axes first).
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    in_dims: int = 1
    std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    # The quantised-matmul hook (layers/quant/matmul.py): the model's quant and sparsity
    # settings and which of model.quant.targets this projection is ("attention", "mlp").
    quant: Any = None
    sparsity: Any = None
    target: str = ""

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[-self.in_dims:]
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(dense_init(self.std), self.axes),
            (*in_shape, *self.features), param_dtype(self.param_dtype))
        if self.quant is not None:
            return QuantMatmul(self.quant, self.sparsity, self.target, self.axes, self.dtype,
                               name="matmul")(x, kernel, self.in_dims)
        return flat_matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.in_dims)


def quant_kw(cfg, target: str) -> dict:
    """Dense arguments that route a projection of `target` through the quantised-matmul
    hook, with the settings of `cfg` (a ModelConfig)."""
    return dict(quant=cfg.quant, sparsity=cfg.sparsity, target=target)
