"""Mixture-of-Depths (`model.depth.kind=mod`; "Mixture-of-Depths: Dynamically
allocating compute in transformer-based language models").

Every `model.depth.mod.every`-th layer of the plan is routed: a linear router scores the
tokens, the top `capacity` fraction of each sequence's real tokens (padding is never
routed, and is in no loss or statistic) is gathered (in its original
order, with its positions and segment ids, so attention among the chosen tokens stays
causal and inside its documents), goes through the block as `x + r * (Block(x) - x)`
with `r = sigmoid(router score)` (so the router learns), and is scattered back; the
other tokens skip the layer.

Top-k over a sequence is not causal. A small predictor (an MLP on the detached block
input, trained with a BCE loss to predict top-k membership) decides instead while
decoding; tokens it skips are written into the routed layer's cache as not valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflm.errors import ConfigError
from efflm.layers.attention.softmax import attention_mask
from efflm.layers.common import sow_loss, sow_stat
from efflm.layers.dense import Dense
from efflm.layers.depth.plain import PlainStack

if TYPE_CHECKING:
    from efflm.config import ModelConfig


def capacity_tokens(capacity: float, length: int) -> int:
    return max(1, math.ceil(capacity * length))


def gather(a, idx):
    return None if a is None else jnp.take_along_axis(a, idx.reshape(
        idx.shape + (1,) * (a.ndim - 2)), axis=1)


@dataclass
class ModSettings:
    # Every `every`-th layer is routed; the top `capacity` fraction of each sequence's
    # tokens go through it, the rest skip it.
    every: int = 2
    capacity: float = 0.5
    predictor_loss: float = 0.01  # weight of the causal predictor's BCE loss
    predictor_hidden: int = 64


class RoutedBlock(nn.Module):
    """One routed layer: its block (built as block(cfg, spec)) runs on the top `capacity`
    fraction of each sequence's tokens; the others skip it."""

    cfg: ModelConfig
    spec: object
    block: type

    @nn.compact
    def __call__(self, x, carry, positions, segment_ids, mask):
        cfg, depth = self.cfg, self.cfg.depth.mod
        kw = dict(dtype="float32", param_dtype=cfg.param_dtype, std=cfg.init_std)
        logits = Dense((1,), ("embed", None), name="router", **kw)(x)[..., 0]
        weight = jax.nn.sigmoid(logits)
        hidden = jax.nn.gelu(Dense((depth.predictor_hidden,), ("embed", None),
                                   name="predictor_in", **kw)(jax.lax.stop_gradient(x)))
        predicted = Dense((1,), (None, None), name="predictor_out", **kw)(hidden)[..., 0]
        block = self.block(cfg, self.spec, name="block")
        if self.is_mutable_collection("cache") and not self.is_initializing():
            chosen = predicted > 0  # decoding: the causal predictor routes
            y, carry = block(x, carry, positions, chosen.astype(jnp.int32), None)
            mixed = x + weight[..., None].astype(x.dtype) * (y - x)
            return jnp.where(chosen[..., None], mixed, x), carry

        b, t = logits.shape
        keep = capacity_tokens(depth.capacity, t)
        valid = jnp.ones((b, t), bool) if segment_ids is None else segment_ids > 0
        # Padding ranks last, and the routed share counts real tokens only: the top
        # ceil(capacity * real) of each row are members, the rest of the static `keep`
        # slots go through the block as padding and are discarded.
        idx, chosen = choose_top(logits, valid, depth.capacity,
                                 jnp.sum(valid, axis=1, keepdims=True))
        rows = jnp.arange(b)[:, None]
        member = jnp.zeros((b, t), jnp.float32).at[rows, idx].set(chosen.astype(jnp.float32))
        self._predictor_terms(predicted, member, weight, valid)
        xs = gather(x, idx)
        seg = None if segment_ids is None else jnp.where(chosen, gather(segment_ids, idx), 0)
        y, carry = block(xs, carry, gather(positions, idx), seg, attention_mask(seg, keep))
        ws = gather(weight, idx)[..., None].astype(x.dtype)
        sow_stat(self, "mod_capacity_use", jnp.mean(chosen), reduce="per_layer")
        return x.at[rows, idx].set(jnp.where(chosen[..., None], xs + ws * (y - xs), xs)), carry

    def _predictor_terms(self, predicted, member, weight, valid):
        predictor_terms(self, "mod", self.cfg.depth.mod.predictor_loss, predicted, member,
                        weight, valid)


def predictor_terms(module: nn.Module, prefix: str, loss_weight: float, predicted, member,
                    weight, valid) -> None:
    """The causal predictor's BCE loss (logits `predicted` against 0/1 `member`) and
    accuracy and the router's entropy (of its gate `weight`), over the tokens `valid`,
    sown as `<prefix>_predictor` (a loss), `<prefix>_predictor_accuracy` and
    `<prefix>_router_entropy`."""
    mask = valid.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    bce = jnp.sum((jnp.maximum(predicted, 0) - predicted * member
                   + jnp.log1p(jnp.exp(-jnp.abs(predicted)))) * mask) / count
    if loss_weight:
        sow_loss(module, f"{prefix}_predictor", loss_weight * bce)
    sow_stat(module, f"{prefix}_predictor_accuracy",
             jnp.sum(((predicted > 0) == (member > 0)) * mask) / count)
    p = jnp.clip(weight, 1e-6, 1 - 1e-6)
    sow_stat(module, f"{prefix}_router_entropy",
             jnp.sum((-p * jnp.log(p) - (1 - p) * jnp.log(1 - p)) * mask) / count)


def choose_top(logits, eligible, capacity: float, real):
    """Expert-choice selection of a sequence's tokens: the top `ceil(capacity * real)`
    of each row's `eligible` tokens by `logits` (`real`: each row's real-token count,
    (b, 1)), in static `capacity_tokens(capacity, t)` slots.

    Returns (idx, chosen): the slots' positions in their original order, and which
    slots hold a chosen token (the rest go through the block as padding)."""
    keep = capacity_tokens(capacity, logits.shape[1])
    top = jax.lax.top_k(jnp.where(eligible, logits, -jnp.inf), keep)[1]
    share = jnp.maximum(jnp.ceil(capacity * real - 1e-6), 1)  # a row keeps a token
    chosen = (jnp.arange(keep) < share) & jnp.take_along_axis(eligible, top, axis=1)
    order = jnp.argsort(top, axis=-1)
    return tuple(jnp.take_along_axis(a, order, axis=-1) for a in (top, chosen))


def gather_tokens(x, positions, segment_ids, idx, chosen):
    """The slots' hidden states, positions and segment ids (0 for an unchosen slot)."""
    seg = jnp.ones(x.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    return (gather(x, idx), gather(positions, idx),
            jnp.where(chosen, gather(seg, idx), 0))


class ModStack(PlainStack):
    """The plain stack whose every `model.depth.mod.every`-th layer is a `RoutedBlock`."""

    routed_block = RoutedBlock
    settings = ModSettings
    causal_decoding = True  # the predictor routes while decoding

    @staticmethod
    def not_causal(cfg: ModelConfig) -> str:
        return ("model.depth.kind=mod is not causal in a full pass: a routed layer takes "
                "the top-capacity tokens of each sequence, so whether a token runs it "
                "depends on later tokens (decoding routes by the causal predictor)")

    @staticmethod
    def routed_layers(cfg: ModelConfig) -> set[int]:
        every = cfg.depth.mod.every
        return {i for i in range(cfg.num_layers) if (i + 1) % every == 0}

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int, layer_flops) -> float:
        """Routed layers at their capacity: a fraction c of the tokens runs the layer
        over a sequence of c * seq_len (attention's mix scales as c^2); plus every
        token's router and predictor."""
        depth, d = cfg.depth.mod, cfg.d_model
        routed = ModStack.routed_layers(cfg)
        keep = capacity_tokens(depth.capacity, seq_len)
        extra = 2 * d + 2 * d * depth.predictor_hidden + 2 * depth.predictor_hidden
        return sum(keep / seq_len * layer_flops(i, keep) + extra if i in routed
                   else layer_flops(i, seq_len) for i in range(cfg.num_layers))

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        depth = cfg.depth.mod
        if not 0 < depth.capacity <= 1:
            raise ConfigError(f"model.depth.mod.capacity must be in (0, 1], got {depth.capacity}")
        if not 1 <= depth.every <= cfg.num_layers:
            raise ConfigError(f"model.depth.mod.every={depth.every} must be between 1 and "
                              f"model.num_layers={cfg.num_layers}")
        if depth.predictor_hidden < 1 or depth.predictor_loss < 0:
            raise ConfigError("model.depth.mod.predictor_hidden must be > 0 and "
                              "model.depth.mod.predictor_loss >= 0")
