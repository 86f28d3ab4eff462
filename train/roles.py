"""Parameter roles, for the optimizers that treat weight matrices apart from the rest
(Muon, GaLore, APOLLO).

A role comes from the parameter's logical axis names (the partitioning the layers
declare), so it holds for every kind, scanned or not:

- `vocab`: carries the `vocab` axis (the embedding; an untied head);
- `router`: under a module named `router` (MoE and MoD token routers);
- `matrix`: maps the residual stream (`embed`) to or from at least one other axis
  (attention and MLP projections, expert weights, linear-attention gate projections);
- `vector`: the rest (norm scales, biases, decay and gate parameters, convolution
  filters).

A matrix is viewed as (reduction, output): when `embed` is its first axis, `embed` is
the reduction side and the rest the output side (`(embed, heads, head_dim)` is
d x heads*head_dim); otherwise the axes before `embed` reduce into it (`(heads,
head_dim, embed)`). `STACK_AXES` (the scanned `layers` axis, `expert`) are batch axes:
each slice is a matrix of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import flax.linen as nn
import jax
import optax

STACK_AXES = ("layers", "expert")


def path_keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def role_of(keys: tuple[str, ...], names: tuple) -> str:
    if "vocab" in names:
        return "vocab"
    if "router" in keys:
        return "router"
    inner = [n for n in names if n not in STACK_AXES]
    if "embed" in inner and len(inner) >= 2:
        return "matrix"
    return "vector"


def matrix_view(names: tuple) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(reduction axes, output axes) of a `matrix` parameter with these axis names."""
    inner = [i for i, n in enumerate(names) if n not in STACK_AXES]
    at = names.index("embed")
    if inner[0] == at:
        return (at,), tuple(inner[1:])
    return tuple(i for i in inner if i < at), tuple(i for i in inner if i >= at)


@dataclass(frozen=True)
class Matrix:
    """A matrix parameter's shape seen as a stack of (rows, cols) matrices: `order`
    moves its axes to (batch..., reduction..., output...)."""

    shape: tuple[int, ...]
    reduction: tuple[int, ...]
    output: tuple[int, ...]

    @property
    def batch_axes(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.shape))
                     if i not in self.reduction and i not in self.output)

    @property
    def order(self) -> tuple[int, ...]:
        return (*self.batch_axes, *self.reduction, *self.output)

    @property
    def stacked(self) -> tuple[int, int, int]:
        """(batch, rows, cols)."""
        size = lambda axes: math.prod(self.shape[i] for i in axes)
        return size(self.batch_axes), size(self.reduction), size(self.output)

    def to_stack(self, x):
        return x.transpose(self.order).reshape(self.stacked)

    @property
    def wide(self) -> bool:
        """Whether its smaller side is the rows (the low-rank optimizers' orientation)."""
        _, rows, cols = self.stacked
        return rows <= cols

    def from_stack(self, x):
        moved = tuple(self.shape[i] for i in self.order)
        inverse = tuple(self.order.index(i) for i in range(len(self.shape)))
        return x.reshape(moved).transpose(inverse)


def _is_leaf(x) -> bool:
    return isinstance(x, (nn.Partitioned, optax.MaskedNode))


@dataclass(frozen=True)
class ParamRoles:
    """Each parameter's role and, for a matrix, its view; keyed by the parameter's path
    (its module names), so it applies to boxed, unboxed and masked trees alike."""

    roles: dict
    matrices: dict  # path -> Matrix
    # Parameter names the model's kinds exempt from weight decay (`Kind.no_decay`).
    no_decay: frozenset = frozenset()

    @classmethod
    def from_names(cls, names: dict, shapes: dict, no_decay=frozenset()) -> ParamRoles:
        """From {path: logical axis names} and {path: shape}."""
        roles = {p: role_of(p, n) for p, n in names.items()}
        matrices = {p: Matrix(tuple(shapes[p]), *matrix_view(names[p]))
                    for p, r in roles.items() if r == "matrix"}
        return cls(roles, matrices, frozenset(no_decay))

    @classmethod
    def of(cls, boxed_params, no_decay=frozenset()) -> ParamRoles:
        """From (abstract) parameters that carry flax's partitioning metadata, and the
        names the model's kinds exempt from weight decay (`efflm.layers.plan.no_decay`)."""
        leaves = jax.tree_util.tree_flatten_with_path(
            boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
        boxed = lambda x: isinstance(x, nn.Partitioned)
        shapes = {path_keys(p): (x.value if boxed(x) else x).shape for p, x in leaves}
        names = {path_keys(p): tuple(x.names) if boxed(x) else (None,) * len(shapes[path_keys(p)])
                 for p, x in leaves}
        return cls.from_names(names, shapes, no_decay)

    def map(self, fn, tree):
        """`fn(path)` at each parameter of `tree`; a masked-out parameter stays masked."""
        return jax.tree_util.tree_map_with_path(
            lambda p, x: x if isinstance(x, optax.MaskedNode) else fn(path_keys(p)),
            tree, is_leaf=_is_leaf)
