"""Small helpers shared by the layers: dtypes, initialisers, dense projections."""

import math

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
        return flat_matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.in_dims)


def flat_matmul(x, kernel, in_dims: int = 1):
    """Contract the trailing `in_dims` axes of `x` with the leading ones of `kernel`.

    Both sides are flattened to 2-D first: XLA:CPU then picks layouts for the backward
    pass without transposing activations (measured 1.65x faster for a SwiGLU MLP
    than the same contraction on (batch, length, features) arrays).
    """
    lead, inner = x.shape[:-in_dims], x.shape[-in_dims:]
    out = kernel.shape[in_dims:]
    y = x.reshape(-1, math.prod(inner)) @ kernel.reshape(math.prod(inner), math.prod(out))
    return y.reshape(*lead, *out)
