"""What layers sow, reduced for the step: auxiliary losses, statistics, model state.

Statistics are sown as `"{reduce}:{name}"` (`efflm.layers.common.sow_stat`). A scanned
stack stacks them along its leading axis, one entry per repeat of the plan's repeating
group; `layer_index` maps that back to the layer number.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_COMBINE = {"mean": jnp.mean, "per_layer": jnp.mean, "max": jnp.max, "min": jnp.min,
            "sum": jnp.sum}


def sum_losses(collection) -> jax.Array:
    """The sum of every sown auxiliary loss (float32 scalar)."""
    leaves = jax.tree.leaves(collection)
    return sum((jnp.sum(x.astype(jnp.float32)) for x in leaves), jnp.zeros((), jnp.float32))


def _key_name(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def _layers_of(path, value, period: int) -> tuple[list[int | None], jax.Array]:
    """Layer numbers of the values in one sown leaf, and the values flattened to match."""
    names = [_key_name(p) for p in path]
    scanned = "layers" in names
    for n in reversed(names):
        if n.startswith("layer_") and n[6:].isdigit():
            j = int(n[6:])
            if scanned:  # leading axis: repeats of the group; layer j within it
                value = value.reshape(value.shape[0], -1)
                return [r * period + j for r in range(value.shape[0])], value
            return [j], value.reshape(1, -1)
    return [None], value.reshape(1, -1)


def reduce_stats(collection, period: int) -> dict[str, jax.Array]:
    """Flat `{"reduce:name" or "per_layer:name/layer_i": scalar}` for one (micro)batch,
    each reduced over the layers (and calls) that sowed it."""
    groups: dict[str, list] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(collection)[0]:
        key = next(_key_name(p) for p in reversed(path) if ":" in _key_name(p))
        reduce = key.split(":", 1)[0]
        layers, values = _layers_of(path, leaf.astype(jnp.float32), period)
        for layer, row in zip(layers, values):
            name = f"{key}/layer_{layer}" if reduce == "per_layer" and layer is not None \
                else key
            groups.setdefault(name, []).append(row)
    return {k: _COMBINE[k.split(":", 1)[0]](jnp.concatenate(v)) for k, v in groups.items()}


def combine_microbatches(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Reduce stats stacked over microbatches (leading axis) by each one's rule, and
    drop the rule from the names."""
    return {k.split(":", 1)[1]: _COMBINE[k.split(":", 1)[0]](v, axis=0)
            for k, v in stats.items()}


def combine_model_state(stacked):
    """Model state after a step of several microbatches, each of which started from the
    step's state: the mean of their float updates, taken as the first plus the mean
    difference from it, so that a leaf every microbatch left equal stays bitwise the
    same (a plain mean of 3 equal floats can move by an ulp); integer leaves (counters)
    from the last microbatch."""

    def combine(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x[-1]
        first = x[0].astype(jnp.float32)
        return (first + jnp.mean(x.astype(jnp.float32) - first, axis=0)).astype(x.dtype)

    return jax.tree.map(combine, stacked)
