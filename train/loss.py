"""Cross-entropy in float32 with a padding mask and optional z-loss."""

import jax
import jax.numpy as jnp


def cross_entropy(logits, targets, mask, z_loss: float = 0.0):
    """Summed token losses and their count.

    Returns `(loss_sum, z_sum, num_tokens)`, each a float32 scalar, so that gradient
    accumulation and data shards can add them before dividing.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    loss_sum = jnp.sum((lse - target_logit) * mask)
    z_sum = jnp.sum(jnp.square(lse) * mask) * z_loss
    return loss_sum, z_sum, jnp.sum(mask)


def resolve_loss_impl(loss_impl: str, mesh_shape: dict | None = None) -> str:
    """`train.loss_impl=auto` -> pallas on GPUs, naive on CPU; xla when `tensor` splits.

    The Pallas kernels run per batch shard (`partitioned_linear_cross_entropy`) with the
    head weight whole on every device, which a tensor-parallel vocabulary would undo, so
    a mesh with `tensor` > 1 takes the blockwise XLA path. On CPU the tiny configs'
    vocabularies are small enough that the full logits cost little (see
    bench/kernels.py for where that changes).
    """
    if loss_impl != "auto":
        return loss_impl
    if jax.default_backend() == "gpu":
        return "pallas" if (mesh_shape or {}).get("tensor", 1) == 1 else "xla"
    return "naive"


def linear_cross_entropy_terms(h, w, targets, mask, z_loss: float, impl: str):
    """`cross_entropy(h @ w, ...)` by the blockwise `impl` ("xla" or "pallas")."""
    from efflm.pallas_kernels.fused_cross_entropy import (
        linear_cross_entropy,
        partitioned_linear_cross_entropy,
    )

    if impl == "pallas":
        return partitioned_linear_cross_entropy(h, w, targets, mask, impl=impl,
                                                z_loss=z_loss)
    return linear_cross_entropy(h, w, targets, mask, impl=impl, z_loss=z_loss)
