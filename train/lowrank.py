"""Adam on a low-rank projection of each weight matrix's gradient, as optax
transformations: GaLore ("GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection") and APOLLO ("APOLLO: SGD-like Memory, AdamW-level Performance").

Each matrix (train/roles.py: a stack of (rows, cols) slices) is seen with its smaller
side s first, G: (s, l). A projector P (s, r) gives R = P^T G (r, l), on which Adam keeps
its two moments (2 r l floats instead of 2 s l) and normalises N = m / (sqrt(v) + eps).

- GaLore: P is the top-r left singular vectors of G, recomputed every `refresh` steps
  (and stored); the update is `scale * P N`.
- APOLLO: P is Gaussian with variance 1/r, redrawn every `refresh` steps from a seed
  (never stored); N only sets a scaling of the raw gradient, per channel (column l:
  |N_l| / |R_l|) or, for APOLLO-Mini, per tensor (|N| / |R|); the update is
  `scale * G * s`, its norm kept from growing more than `growth_limit` times the last
  step's.

Parameters of other roles are masked out here (optax.partition routes them to AdamW).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from efflm.train.roles import Matrix, ParamRoles


class LowRankState(NamedTuple):
    count: jax.Array
    mu: Any  # per matrix: (batch, r, l)
    nu: Any
    projector: Any  # GaLore: (batch, s, r) per matrix; APOLLO: () (redrawn from the seed)
    last_norm: Any  # APOLLO: (batch,) per matrix, the last update's norm; GaLore: ()
    projection_age: jax.Array  # steps since the projectors were made (0: this step)
    limited: jax.Array  # APOLLO: the fraction of matrix slices the growth limit scaled


def oriented(matrix: Matrix, x):
    """`x` as (batch, s, l), its smaller side first."""
    stack = matrix.to_stack(x)
    return stack if matrix.wide else stack.swapaxes(1, 2)


def restored(matrix: Matrix, y):
    """The inverse of `oriented`: (batch, s, l) back to the parameter's shape."""
    return matrix.from_stack(y if matrix.wide else y.swapaxes(1, 2))


def projected_shape(matrix: Matrix, rank: int) -> tuple[int, int, int]:
    batch, rows, cols = matrix.stacked
    return batch, min(rank, rows, cols), max(rows, cols)


def top_singular_vectors(g, rank: int):
    u, _, _ = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
    return u[..., :rank]


def scale_by_lowrank(roles: ParamRoles, method: str, rank: int, refresh: int, scale: float,
                     b1: float, b2: float, eps: float, *, channelwise: bool = True,
                     growth_limit: float = 0.0, seed: int = 0) -> optax.GradientTransformation:
    """GaLore (`method="galore"`) or APOLLO (`"apollo"`) on the `matrix` leaves of the
    (masked) tree it is given."""
    index = {p: i for i, p in enumerate(roles.matrices)}

    def matrices(tree):
        return roles.map(lambda p: roles.matrices[p], tree)

    def init_fn(params):
        def moments(p):
            return jnp.zeros(projected_shape(roles.matrices[p], rank), jnp.float32)

        def projector(p):
            batch, rows, cols = roles.matrices[p].stacked
            return jnp.zeros((batch, min(rows, cols), min(rank, rows, cols)), jnp.float32)

        def norms(p):
            return jnp.zeros((roles.matrices[p].stacked[0],), jnp.float32)

        zero = jnp.zeros((), jnp.float32)
        return LowRankState(
            count=jnp.zeros((), jnp.int32), mu=roles.map(moments, params),
            nu=roles.map(moments, params),
            projector=roles.map(projector, params) if method == "galore" else (),
            last_norm=roles.map(norms, params) if method == "apollo" else (),
            projection_age=zero, limited=zero)

    def random_projector(p, period):
        batch, rows, cols = roles.matrices[p].stacked
        return apollo_projector(seed, period, index[p], (batch, min(rows, cols),
                                                         min(rank, rows, cols)))

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        refresh_now = (state.count % refresh) == 0
        views = matrices(updates)
        is_view = lambda x: isinstance(x, Matrix)
        grads = jax.tree.map(oriented, views, updates, is_leaf=is_view)
        if method == "galore":
            projectors = jax.lax.cond(
                refresh_now,
                lambda: jax.tree.map(lambda g: top_singular_vectors(g, rank), grads),
                lambda: state.projector)
        else:
            period = state.count // refresh
            projectors = roles.map(lambda p: random_projector(p, period), updates)
        low = jax.tree.map(lambda p, g: jnp.einsum("bsr,bsl->brl", p, g.astype(jnp.float32)),
                           projectors, grads)
        mu = jax.tree.map(lambda m, x: b1 * m + (1 - b1) * x, state.mu, low)
        nu = jax.tree.map(lambda v, x: b2 * v + (1 - b2) * x * x, state.nu, low)
        c1, c2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
        normed = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)

        if method == "galore":
            full = jax.tree.map(lambda p, n: scale * jnp.einsum("bsr,brl->bsl", p, n),
                                projectors, normed)
            last_norm, limited = (), jnp.zeros((), jnp.float32)
        else:
            axis = (1,) if channelwise else (1, 2)

            def scaled(g, x, n):
                ratio = (jnp.linalg.norm(n, axis=axis, keepdims=True)
                         / (jnp.linalg.norm(x, axis=axis, keepdims=True) + 1e-8))
                return g.astype(jnp.float32) * ratio

            full = jax.tree.map(scaled, grads, low, normed)
            if growth_limit:
                full, last_norm, hits = limit_growth(full, state.last_norm, growth_limit)
                limited = jnp.mean(jnp.concatenate([jnp.ravel(h) for h in jax.tree.leaves(hits)]))
            else:
                last_norm, limited = state.last_norm, jnp.zeros((), jnp.float32)
            full = jax.tree.map(lambda u: scale * u, full)
        out = jax.tree.map(lambda m, u, g: restored(m, u).astype(g.dtype), views, full,
                           updates, is_leaf=is_view)
        age = (state.count % refresh).astype(jnp.float32)
        return out, LowRankState(count, mu, nu, projectors if method == "galore" else (),
                                 last_norm, age, limited)

    return optax.GradientTransformation(init_fn, update_fn)


def apollo_projector(seed: int, period, index: int, shape: tuple[int, int, int]):
    """APOLLO's projector (batch, s, r) of the matrix numbered `index` (in parameter
    order) for the `period`-th refresh: N(0, 1/r), a function of the three alone."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), period), index)
    return jax.random.normal(key, shape, jnp.float32) / jnp.sqrt(shape[-1])


def limit_growth(updates, last_norm, limit: float):
    """Scale each slice whose norm exceeds `limit` times its last norm down to that bound
    (APOLLO's norm-growth limiter; a first step, last norm 0, is not limited)."""
    def one(u, last):
        norm = jnp.sqrt(jnp.sum(u * u, axis=(1, 2)))
        hit = (last > 0) & (norm > limit * last)
        factor = jnp.where(hit, limit * last / jnp.maximum(norm, 1e-30), 1.0)
        return u * factor[:, None, None], norm * factor, hit.astype(jnp.float32)

    triples = jax.tree.map(one, updates, last_norm)
    return jax.tree.transpose(jax.tree.structure(updates), jax.tree.structure((0, 0, 0)),
                              triples)
