"""N:M weight sparsity (`model.sparsity.nm=N:M`) trained with SR-STE, from "Learning N:M
Fine-grained Structured Sparse Neural Networks From Scratch": the N largest magnitudes of
every M consecutive weights along the input dimension are kept, the mask is recomputed
from the latent weights every step, gradients pass straight through the mask, and pruned
weights get the extra gradient `decay * w` that pulls them towards zero."""

from functools import partial

import jax
import jax.numpy as jnp

from efflm.errors import ConfigError


def parse_nm(nm: str) -> tuple[int, int]:
    """`"N:M"` -> (N, M); raises ConfigError unless 0 < N < M."""
    parts = nm.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"model.sparsity.nm={nm!r} must look like N:M, e.g. 2:4")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ConfigError(f"model.sparsity.nm={nm!r}: need 0 < N < M (keep N of every M)")
    return n, m


def nm_mask(w, n: int, m: int):
    """Boolean mask of `w` (in, out): exactly `n` kept in each group of `m` inputs."""
    rows, cols = w.shape
    mag = jnp.abs(w).reshape(rows // m, m, cols)
    rank = jnp.argsort(jnp.argsort(-mag, axis=1, stable=True), axis=1)
    return (rank < n).reshape(rows, cols)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def sr_ste(w, mask, decay: float):
    """`w * mask` whose gradient is the incoming one, unmasked, plus decay * (~mask * w)."""
    return jnp.where(mask, w, 0)


def _fwd(w, mask, decay):
    return jnp.where(mask, w, 0), (w, mask)


def _bwd(decay, res, g):
    w, mask = res
    return g + decay * jnp.where(mask, 0, w).astype(g.dtype), None


sr_ste.defvjp(_fwd, _bwd)


def sr_ste_reference(w, mask, decay: float):
    """Plain-JAX SR-STE: returns (masked weights with a straight-through gradient, the
    penalty whose gradient is the decay term) — add the penalty to the loss."""
    masked = w + jax.lax.stop_gradient(jnp.where(mask, w, 0) - w)
    penalty = 0.5 * decay * jnp.sum(jnp.where(jax.lax.stop_gradient(mask), 0, w) ** 2)
    return masked, penalty
