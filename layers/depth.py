"""How blocks are stacked. Registered in `efflm.layers.DEPTH` by `model.depth.kind`.

A depth module receives the block class and applies it `num_layers` times; adaptive
depth (mixture-of-depths, mixture-of-recursions) replaces this with routed stacks.
"""

import flax.linen as nn
import jax

from efflm.config import ModelConfig

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class _ScanStep(nn.Module):
    """Adapts a block to `nn.scan`'s (carry, x) -> (carry, y) signature."""

    block: type
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, mask):
        return self.block(self.cfg, name="block")(x, positions, segment_ids, mask), None


class PlainStack(nn.Module):
    """Every token goes through every block: the dense baseline (`depth.kind=none`)."""

    cfg: ModelConfig
    block: type

    @nn.compact
    def __call__(self, x, positions, segment_ids, mask):
        cfg = self.cfg
        if cfg.scan_layers:
            step = _ScanStep
            if cfg.remat != "none":
                step = nn.remat(step, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
            scanned = nn.scan(
                step, variable_axes={"params": 0, "intermediates": 0, "losses": 0},
                split_rngs={"params": True}, in_axes=(nn.broadcast,) * 3,
                length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(self.block, cfg, name="layers")(x, positions, segment_ids, mask)
            return x
        block = self.block
        if cfg.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat])
        for i in range(cfg.num_layers):
            x = block(cfg, name=f"layer_{i}")(x, positions, segment_ids, mask)
        return x
