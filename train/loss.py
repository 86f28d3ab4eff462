"""The loss: cross-entropy in float32 with a padding mask and optional z-loss.

`cross_entropy`, the plain-JAX reference, lives beside the fused kernels it checks
(efflm.pallas_kernels.fused_cross_entropy) and is re-exported here.
"""

import jax

from efflm.pallas_kernels.fused_cross_entropy import (
    cross_entropy,
    linear_cross_entropy,
    partitioned_linear_cross_entropy,
)

__all__ = ["cross_entropy", "linear_cross_entropy_terms", "resolve_loss_impl"]


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
    if impl == "pallas":
        return partitioned_linear_cross_entropy(h, w, targets, mask, impl=impl,
                                                z_loss=z_loss)
    return linear_cross_entropy(h, w, targets, mask, impl=impl, z_loss=z_loss)
