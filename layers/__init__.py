"""Flax linen building blocks. The registries that map config values to kinds live in
the subpackages (`attention`, `mlp`, `depth`); they are gathered here for lookup."""

from efflm.layers.attention import ATTENTION
from efflm.layers.depth import DEPTH
from efflm.layers.mlp import MLP

__all__ = ["ATTENTION", "DEPTH", "MLP"]
