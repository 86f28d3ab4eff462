"""Parts the linear mixers share: the per-head RMSNorm of the mixed output, the
output gate that multiplies it, the short causal convolution on q, k and v, and the L2
normalisation of keys and queries."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflm.layers.common import decoding
from efflm.layers.dense import Dense
from efflm.pallas_kernels.linear_attention import segment_index


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last axis (head_dim) of (..., heads, head_dim), float32 stats."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                 ("head_dim",)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return x32 * scale


def output_gate(x, out, heads: int, dim: int, **dense_kw):
    """`swish(W_g x) * out` (float32) for `out` (batch, length, heads, dim): the gate
    projection is the calling module's `output_gate` Dense."""
    gate = Dense((heads, dim), ("embed", "heads", "head_dim"), name="output_gate",
                 **dense_kw)(x)
    return jax.nn.silu(gate.astype(jnp.float32)) * out


class ShortConvolution(nn.Module):
    """Causal depthwise convolution over the length of (batch, length, heads, head_dim),
    `width` taps (tap j reads the input j tokens back), within packed segments, taps
    drawn from N(0, std^2) (std None: uniform in +-width^-1/2, torch.nn.Conv1d's default
    for a depthwise kernel). While decoding, the last width - 1 inputs are kept in the
    cache."""

    width: int
    std: float | None = None

    @nn.compact
    def __call__(self, x, segment_ids):
        b, t, h, d = x.shape
        w = self.width
        if self.std is None:
            bound = w ** -0.5
            init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
        else:
            init = nn.initializers.normal(self.std)
        kernel = self.param("kernel", nn.with_logical_partitioning(
            init, (None, "heads", "head_dim")), (w, h, d), jnp.float32)
        same = None
        if decoding(self):
            if w > 1:
                past = self.variable("cache", "inputs", jnp.zeros, (b, w - 1, h, d), x.dtype)
                padded = jnp.concatenate([past.value, x], axis=1)
                past.value = padded[:, -(w - 1):]
            else:
                padded = x
        else:
            padded = jnp.pad(x, [(0, 0), (w - 1, 0), (0, 0), (0, 0)])
            if segment_ids is not None:
                seg = jnp.pad(segment_index(segment_ids), [(0, 0), (w - 1, 0)],
                              constant_values=-1)
                same = [seg[:, w - 1 - j:w - 1 - j + t] == seg[:, w - 1:] for j in range(w)]
        out = jnp.zeros((b, t, h, d), jnp.float32)
        for j in range(w):
            tap = padded[:, w - 1 - j:w - 1 - j + t].astype(jnp.float32) * kernel[j]
            if same is not None:
                tap = jnp.where(same[j][..., None, None], tap, 0.0)
            out = out + tap
        return out.astype(x.dtype)


def l2_normalize(x, eps: float = 1e-6):
    """x / |x| over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)
