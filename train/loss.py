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
