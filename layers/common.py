"""Small helpers shared by the layers: dtypes, initialisers, dense projections."""

import flax.linen as nn
import jax.numpy as jnp


def param_dtype(name: str):
    return jnp.dtype(name)


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

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[-self.in_dims:]
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(dense_init(self.std), self.axes),
            (*in_shape, *self.features), param_dtype(self.param_dtype))
        kernel = kernel.astype(self.dtype)
        x = x.astype(self.dtype)
        contract = tuple(range(x.ndim - self.in_dims, x.ndim))
        return jnp.tensordot(x, kernel, axes=(contract, tuple(range(self.in_dims))))
