"""The plain stack (`model.depth.kind=none`): every layer of the plan, in order.

A depth kind (`efflm.layers.contract.Depth`) receives the block class and the layer plan
(one spec per layer, `efflm.layers.plan`) and runs the plan; adaptive depth
(mixture-of-depths, mixture-of-recursions) replaces this with routed stacks.

Blocks map `(x, carry, positions, segment_ids, mask) -> (x, carry)`: `carry` is a
dict passed from layer to layer (empty unless a kind in the plan starts one, through
its `initial_carry` hook); the layers whose kinds do not take it pass it on unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax

from efflm.layers.common import LOSSES, RNG_STREAMS, STATE_COLLECTIONS, STATS
from efflm.layers.contract import CALIBRATION, Depth

if TYPE_CHECKING:
    from efflm.config import ModelConfig

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

# Every collection a block may write is stacked along the scanned axis; every random
# stream is split, so that each layer draws its own key.
SCAN_VARIABLE_AXES = {c: 0 for c in ("params", "intermediates", "cache", LOSSES, STATS,
                                     CALIBRATION, *STATE_COLLECTIONS)}
SCAN_SPLIT_RNGS = {s: True for s in ("params", *RNG_STREAMS)}


def repeating_group(plan: tuple) -> tuple[int, int]:
    """(period, repeats): the shortest prefix of the plan that, repeated `repeats`
    times, gives its first `period * repeats` layers; the rest is a partial group.

    `period` is the smallest length for which every layer equals the layer `period`
    places before it.
    """
    n = len(plan)
    for period in range(1, n + 1):
        if all(plan[i] == plan[i - period] for i in range(period, n)):
            return period, n // period
    return n, 1


def rematerialised(module, cfg: ModelConfig, **kw):
    """`module` under `model.remat`'s policy (itself with remat=none)."""
    if cfg.remat == "none":
        return module
    return nn.remat(module, policy=REMAT_POLICIES[cfg.remat], **kw)


def make_layer(block: type, cfg: ModelConfig, spec, name: str, remat: bool = False,
               routed_block: type | None = None):
    """The module for one layer of the plan: the block, inside `routed_block` (the depth
    kind's token router, built as routed_block(cfg, spec, block)) when the spec is
    routed."""
    if spec.routed:
        return (rematerialised(routed_block, cfg) if remat else routed_block)(
            cfg, spec, block, name=name)
    return (rematerialised(block, cfg) if remat else block)(cfg, spec, name=name)


class LayerGroup(nn.Module):
    """Layers applied in order, in `nn.scan`'s (carry, x) -> (carry, y) form: layer j
    is `layer_j`.

    With `share_kv` (recursive KV sharing) the layers' mixers share keys and values: a
    call without `kv` returns each layer's (`Mixer.shares_kv`) as its y, a call with
    `kv` (that tuple) attends to them instead of projecting its own."""

    cfg: ModelConfig
    block: type
    specs: tuple
    routed_block: type | None = None
    share_kv: bool = False

    @nn.compact
    def __call__(self, state, positions, segment_ids, mask, kv=None):
        x, carry = state
        emitted = []
        for j, spec in enumerate(self.specs):
            layer = make_layer(self.block, self.cfg, spec, f"layer_{j}",
                               routed_block=self.routed_block)
            args = (x, carry, positions, segment_ids, mask)
            if not self.share_kv:
                x, carry = layer(*args)
            elif kv is None:
                x, carry, shared = layer(*args, emit_kv=True)
                emitted.append(shared)
            else:
                x, carry = layer(*args, kv=kv[j])
        return (x, carry), (tuple(emitted) if self.share_kv and kv is None else None)


class PlainStack(Depth):
    """Every token goes through every block: the dense baseline (`depth.kind=none`).

    With `model.scan_layers`, the plan's repeating group (`repeating_group`) is scanned
    over its repeats as `layers` (parameters stacked on a leading `layers` axis) and the
    leftover layers run unrolled after it as `layer_{i}`; without, every layer is
    `layer_{i}`.
    """

    routed_block = None  # the module that routes tokens through a routed layer's block

    @nn.compact
    def __call__(self, x, carry, positions, segment_ids, mask):
        cfg, plan = self.cfg, self.plan
        first = 0
        if cfg.scan_layers:
            period, repeats = repeating_group(plan)
            if repeats > 1:
                scanned = nn.scan(
                    rematerialised(LayerGroup, cfg, prevent_cse=False),
                    variable_axes=SCAN_VARIABLE_AXES, split_rngs=SCAN_SPLIT_RNGS,
                    in_axes=(nn.broadcast,) * 3, length=repeats,
                    metadata_params={nn.PARTITION_NAME: "layers"})
                (x, carry), _ = scanned(cfg, self.block, plan[:period], self.routed_block,
                                        name="layers")((x, carry), positions, segment_ids, mask)
                first = period * repeats
        for i in range(first, len(plan)):
            x, carry = make_layer(self.block, cfg, plan[i], f"layer_{i}", remat=True,
                                  routed_block=self.routed_block)(
                x, carry, positions, segment_ids, mask)
        return x
