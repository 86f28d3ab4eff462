"""The plain stack (`model.depth.kind=none`): every layer of the plan, in order.

A depth module receives the block class and the layer plan (one spec per layer,
`efflm.models.plan`) and runs the plan; adaptive depth (mixture-of-depths,
mixture-of-recursions) replaces this with routed stacks.

Blocks map `(x, carry, positions, segment_ids, mask) -> (x, carry)`: `carry` is a
dict passed from layer to layer (empty unless a kind in the plan starts one). A mixer
or MLP class takes part through `initial_carry(cfg, x) -> dict` (its entries of the
starting carry) and `takes_carry(cfg) -> bool` (whether, under this config, it is called
as `kind(x, carry, ...) -> (y, carry)`); the other layers pass the carry on unchanged.
"""

import flax.linen as nn
import jax

from efflm.config import ModelConfig
from efflm.layers.common import LOSSES, RNG_STREAMS, STATE_COLLECTIONS, STATS

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

# Every collection a block may write is stacked along the scanned axis; every random
# stream is split, so that each layer draws its own key.
SCAN_VARIABLE_AXES = {c: 0 for c in ("params", "intermediates", "cache", LOSSES, STATS,
                                     *STATE_COLLECTIONS)}
SCAN_SPLIT_RNGS = {s: True for s in ("params", *RNG_STREAMS)}


def _remat(module, cfg: ModelConfig, **kw):
    if cfg.remat == "none":
        return module
    return nn.remat(module, policy=REMAT_POLICIES[cfg.remat], **kw)


def make_layer(block: type, cfg: ModelConfig, spec, name: str, remat: bool = False):
    """The module for one layer of the plan: the block, inside the token router of
    `efflm.layers.depth.mod` when the spec is routed."""
    if spec.routed:
        from efflm.layers.depth.mod import RoutedBlock

        return (_remat(RoutedBlock, cfg) if remat else RoutedBlock)(cfg, spec, block,
                                                                    name=name)
    return (_remat(block, cfg) if remat else block)(cfg, spec, name=name)


class _Group(nn.Module):
    """Layers applied in order, in `nn.scan`'s (carry, x) -> (carry, y) form: layer j
    is `layer_j`."""

    cfg: ModelConfig
    block: type
    specs: tuple

    @nn.compact
    def __call__(self, state, positions, segment_ids, mask):
        x, carry = state
        for j, spec in enumerate(self.specs):
            x, carry = make_layer(self.block, self.cfg, spec, f"layer_{j}")(
                x, carry, positions, segment_ids, mask)
        return (x, carry), None


def initial_carry(cfg: ModelConfig, plan, x) -> dict:
    """The carry the plan's kinds start from: the union of `initial_carry(cfg, x)` of
    each kind class that has one (x: the stack's input, (batch, length, d_model))."""
    from efflm.layers import ATTENTION, MLP

    carry = {}
    for cls in {ATTENTION[s.mixer] for s in plan} | {MLP[s.mlp] for s in plan}:
        start = getattr(cls, "initial_carry", None)
        if start is not None:
            carry.update(start(cfg, x))
    return carry


class PlainStack(nn.Module):
    """Every token goes through every block: the dense baseline (`depth.kind=none`).

    With `model.scan_layers`, the plan's repeating group (`repeating_group`) is scanned
    over its repeats as `layers` (parameters stacked on a leading `layers` axis) and the
    leftover layers run unrolled after it as `layer_{i}`; without, every layer is
    `layer_{i}`.
    """

    cfg: ModelConfig
    block: type
    plan: tuple

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int, layer_flops) -> float:
        """Forward FLOPs per token, given `layer_flops(i, seq_len)` for layer i over a
        sequence of seq_len tokens: every token runs every layer."""
        return sum(layer_flops(i, seq_len) for i in range(cfg.num_layers))

    @nn.compact
    def __call__(self, x, positions, segment_ids, mask):
        from efflm.models.plan import repeating_group

        cfg, plan = self.cfg, self.plan
        carry = initial_carry(cfg, plan, x)
        first = 0
        if cfg.scan_layers:
            period, repeats = repeating_group(plan)
            if repeats > 1:
                scanned = nn.scan(
                    _remat(_Group, cfg, prevent_cse=False),
                    variable_axes=SCAN_VARIABLE_AXES, split_rngs=SCAN_SPLIT_RNGS,
                    in_axes=(nn.broadcast,) * 3, length=repeats,
                    metadata_params={nn.PARTITION_NAME: "layers"})
                (x, carry), _ = scanned(cfg, self.block, plan[:period], name="layers")(
                    (x, carry), positions, segment_ids, mask)
                first = period * repeats
        for i in range(first, len(plan)):
            x, carry = make_layer(self.block, cfg, plan[i], f"layer_{i}", remat=True)(
                x, carry, positions, segment_ids, mask)
        return x
