"""Normalisation layers."""

import flax.linen as nn
import jax.numpy as jnp

from efflm.layers.common import param_dtype


class RMSNorm(nn.Module):
    """Root-mean-square layer norm ("Root Mean Square Layer Normalization"), stats in float32."""

    eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],), param_dtype(self.param_dtype))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
        return (x32 * scale.astype(jnp.float32)).astype(self.dtype)
