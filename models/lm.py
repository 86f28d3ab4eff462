"""The decoder-only language model: embed -> blocks -> norm -> head."""

import flax.linen as nn
import jax.numpy as jnp

from efflm.config import ModelConfig
from efflm.layers import ATTENTION, DEPTH, MLP, RMSNorm, attention_mask
from efflm.layers.common import flat_matmul, param_dtype


class Block(nn.Module):
    """Pre-norm residual block: token mixer then MLP, each chosen from its registry."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, mask):
        cfg = self.cfg
        norm = dict(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        mixer = ATTENTION[cfg.attention.kind](cfg, name="attention")
        h = mixer(RMSNorm(name="attention_norm", **norm)(x), positions, segment_ids, mask)
        x = nn.with_logical_constraint(x + h, ("batch", "length", "embed"))
        h = MLP[cfg.mlp.kind](cfg, name="mlp")(RMSNorm(name="mlp_norm", **norm)(x))
        return nn.with_logical_constraint(x + h, ("batch", "length", "embed"))


class LM(nn.Module):
    """Decoder-only LM. Returns logits (batch, length, vocab) in the compute dtype.

    Auxiliary losses that layers `sow` into the `losses` collection are added to the
    training loss by `efflm.train.loss`.
    """

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        pdt = param_dtype(cfg.param_dtype)
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(
                nn.initializers.normal(stddev=cfg.init_std), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model), pdt)
        if not cfg.tie_embeddings:
            self.head = self.param(
                "head", nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=cfg.init_std), ("embed", "vocab")),
                (cfg.d_model, cfg.vocab_size), pdt)
        self.blocks = DEPTH[cfg.depth.kind](cfg, Block, name="blocks")
        self.final_norm = RMSNorm(eps=cfg.norm_eps, dtype=cfg.dtype,
                                  param_dtype=cfg.param_dtype)

    def hidden(self, inputs, positions=None, segment_ids=None):
        """Final normalised hidden states (batch, length, d_model)."""
        cfg = self.cfg
        length = inputs.shape[1]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), inputs.shape)
        x = jnp.take(self.embedding, inputs, axis=0).astype(cfg.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        mask = attention_mask(segment_ids, length)
        x = self.blocks(x, positions, segment_ids, mask)
        return self.final_norm(x)

    def head_weight(self):
        """The output projection (d_model, vocab) in the compute dtype."""
        cfg = self.cfg
        w = self.embedding.T if cfg.tie_embeddings else self.head
        return w.astype(cfg.dtype)

    def logits(self, h):
        out = flat_matmul(h, self.head_weight())
        return nn.with_logical_constraint(out, ("batch", "length", "vocab"))

    def __call__(self, inputs, positions=None, segment_ids=None):
        return self.logits(self.hidden(inputs, positions, segment_ids))
