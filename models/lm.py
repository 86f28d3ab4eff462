"""The decoder-only language model: embed -> blocks -> norm -> head."""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax.numpy as jnp

from efflm.layers.attention.softmax import attention_mask
from efflm.layers.common import param_dtype
from efflm.layers.norms import RMSNorm
from efflm.layers.plan import LayerSpec, depth_kind, initial_carry, layer_plan
from efflm.layers.quant.matmul import QuantMatmul

if TYPE_CHECKING:
    from efflm.config import ModelConfig


def _call_kind(module, carry, x, *args, **kwargs):
    """Run a mixer or feed-forward; a kind whose `takes_carry(cfg)` is true for the
    model's config also gets and returns the layer-to-layer carry."""
    if module.takes_carry(module.cfg):
        return module(x, carry, *args, **kwargs)
    return module(x, *args, **kwargs), carry


class Block(nn.Module):
    """Pre-norm residual block: token mixer then feed-forward, the kinds its `LayerSpec`
    names. Both see which positions are padding (`segment_ids` 0).

    `kv` and `emit_kv` reach a mixer that shares keys and values (`Mixer.shares_kv`):
    with `emit_kv` the block returns `(x, carry, SharedKV)`."""

    cfg: ModelConfig
    spec: LayerSpec

    @nn.compact
    def __call__(self, x, carry, positions, segment_ids, mask, kv=None, emit_kv=False):
        cfg = self.cfg
        norm = dict(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        mixer = self.spec.mixer_kind(cfg, name="attention")
        sharing = {} if kv is None and not emit_kv else {"kv": kv, "emit_kv": emit_kv}
        h, carry = _call_kind(mixer, carry, RMSNorm(name="attention_norm", **norm)(x),
                              positions, segment_ids, mask, **sharing)
        if emit_kv:
            h, shared = h
        x = nn.with_logical_constraint(x + h, ("batch", "length", "embed"))
        mlp = self.spec.mlp_kind(cfg, name="mlp")
        h, carry = _call_kind(mlp, carry, RMSNorm(name="mlp_norm", **norm)(x),
                              segment_ids=segment_ids)
        x = nn.with_logical_constraint(x + h, ("batch", "length", "embed"))
        return (x, carry, shared) if emit_kv else (x, carry)


class LM(nn.Module):
    """Decoder-only LM. Returns logits (batch, length, vocab) in the compute dtype.

    Layers report through collections (`efflm.layers.common`): auxiliary losses sown
    into `losses`, which the train step adds to the objective; statistics into `stats`,
    which it logs; non-trainable variables in `STATE_COLLECTIONS`, which the train state
    carries from step to step.
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
        self.plan = layer_plan(cfg)
        self.blocks = depth_kind(cfg)(cfg, Block, self.plan, name="blocks")
        self.final_norm = RMSNorm(eps=cfg.norm_eps, dtype=cfg.dtype,
                                  param_dtype=cfg.param_dtype)
        # The head's matmul, through the quantised-matmul hook (no parameters of its own).
        self.head_matmul = QuantMatmul(cfg.quant, cfg.sparsity, "head", ("embed", "vocab"),
                                       cfg.dtype)

    def hidden(self, inputs, positions=None, segment_ids=None):
        """Final normalised hidden states (batch, length, d_model)."""
        cfg = self.cfg
        length = inputs.shape[1]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), inputs.shape)
        x = jnp.take(self.embedding, inputs, axis=0).astype(cfg.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        mask = attention_mask(segment_ids, length)
        x = self.blocks(x, initial_carry(cfg, self.plan, x), positions, segment_ids, mask)
        return self.final_norm(x)

    def head_weight(self):
        """The output projection (d_model, vocab) in the compute dtype."""
        cfg = self.cfg
        w = self.embedding.T if cfg.tie_embeddings else self.head
        return w.astype(cfg.dtype)

    def head_operands(self, h):
        """(h, head weight) for the fused cross-entropy, masked and fake-quantised when
        the head is one of model.quant.targets."""
        return self.head_matmul(h, self.head_weight(), operands=True)

    def logits(self, h):
        out = self.head_matmul(h, self.head_weight())
        return nn.with_logical_constraint(out, ("batch", "length", "vocab"))

    def __call__(self, inputs, positions=None, segment_ids=None):
        return self.logits(self.hidden(inputs, positions, segment_ids))
