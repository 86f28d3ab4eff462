"""Recursive transformers (`model.depth.kind=recursive`): a few unique blocks applied
several times ("Relaxed Recursive Transformers: Effective Parameter Sharing with
Layer-wise LoRA"; the sharing schemes of "Mixture-of-Recursions").

`cycle`: blocks A B C applied as A B C A B C (depth unique * recursions);
`middle_cycle`: the first and last layers unique, the unique - 2 middle blocks cycled
(depth 2 + (unique - 2) * recursions). The shared blocks run as one `nn.scan` over the
recursions with their parameters broadcast, so compile time does not grow with the
number of recursions; each recursion keeps its own decoding cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import flax.linen as nn

from efflm.errors import ConfigError, check_choice, check_positive
from efflm.layers.common import LOSSES, RNG_STREAMS, STATE_COLLECTIONS, STATS
from efflm.layers.contract import CALIBRATION
from efflm.layers.depth.plain import LayerGroup, PlainStack, make_layer, rematerialised

if TYPE_CHECKING:
    from efflm.config import ModelConfig

SHARING = ("cycle", "middle_cycle")


def shared_range(own) -> tuple[int, int]:
    """(first, stop): the plan's layers first .. stop - 1 are the shared blocks, under a
    depth kind's own settings `own` (unique_layers, sharing)."""
    return (0, own.unique_layers) if own.sharing == "cycle" else (1, own.unique_layers - 1)


def recursive_depth(own) -> int:
    first, stop = shared_range(own)
    return own.unique_layers - (stop - first) + (stop - first) * own.recursions


def check_sharing(cfg: ModelConfig, name: str, own) -> None:
    """The sharing scheme of depth kind `name` (settings `own`) against the model."""
    key = f"model.depth.{name}"
    check_choice(f"{key}.sharing", own.sharing, SHARING)
    check_positive(f"{key}.recursions", own.recursions)
    check_positive(f"{key}.unique_layers", own.unique_layers)
    if own.sharing == "middle_cycle" and own.unique_layers < 3:
        raise ConfigError(f"{key}.sharing=middle_cycle needs {key}.unique_layers >= 3 "
                          f"(first, last and at least one shared), got {own.unique_layers}")
    want = recursive_depth(own)
    if cfg.num_layers != want:
        raise ConfigError(
            f"{key}.unique_layers={own.unique_layers} with {key}.recursions="
            f"{own.recursions} ({own.sharing}) makes {want} layers; set "
            f"model.num_layers={want}")


def check_shared_plan(cfg: ModelConfig, name: str, own, plan: tuple) -> None:
    want = recursive_depth(own)
    first, stop = shared_range(own)
    period = stop - first
    if any(plan[i] != plan[first + (i - first) % period] for i in range(first, want - first)):
        raise ConfigError("the attention/MLP pattern must repeat with the shared blocks "
                          f"(every {period} layers) under model.depth.kind={name}")


@dataclass
class RecursiveSettings:
    # `unique_layers` blocks applied `recursions` times; sharing `cycle` (ABCABC: depth
    # unique * recursions) or `middle_cycle` (first and last unique, the middle
    # unique - 2 cycled: depth 2 + (unique - 2) * recursions). model.num_layers must
    # equal that depth.
    unique_layers: int = 2
    recursions: int = 2
    sharing: str = "cycle"


class RecursiveStack(PlainStack):
    """Unique layers `first`/`last` (middle_cycle) around `shared`, the scanned blocks
    named `layer_j` inside it."""

    settings = RecursiveSettings

    @nn.compact
    def __call__(self, x, carry, positions, segment_ids, mask):
        cfg, plan = self.cfg, self.plan
        first, stop = shared_range(cfg.depth.recursive)
        args = (positions, segment_ids, mask)
        if first:
            x, carry = make_layer(self.block, cfg, plan[0], "first", remat=True)(x, carry,
                                                                                 *args)
        axes = {c: 0 for c in ("intermediates", "cache", LOSSES, STATS, CALIBRATION,
                               *STATE_COLLECTIONS)}
        scanned = nn.scan(
            rematerialised(LayerGroup, cfg, prevent_cse=False), variable_axes=axes,
            variable_broadcast="params",
            split_rngs={"params": False, **{s: True for s in RNG_STREAMS}},
            in_axes=(nn.broadcast,) * 3, length=cfg.depth.recursive.recursions)
        (x, carry), _ = scanned(cfg, self.block, plan[first:stop], name="shared")(
            (x, carry), *args)
        if first:
            x, carry = make_layer(self.block, cfg, plan[-1], "last", remat=True)(x, carry,
                                                                                 *args)
        return x

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        check_sharing(cfg, "recursive", cfg.depth.recursive)

    @staticmethod
    def check_plan(cfg: ModelConfig, plan: tuple) -> None:
        check_shared_plan(cfg, "recursive", cfg.depth.recursive, plan)
