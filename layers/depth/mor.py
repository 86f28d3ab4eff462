"""Mixture-of-Recursions with expert-choice routing (`model.depth.kind=mor`;
"Mixture-of-Recursions: Learning Dynamic Recursive Depths for Adaptive Token-Level
Computation").

The shared blocks of the `recursive` kind (its sharing schemes and parameter layout:
`shared/layer_j`, and `first`/`last` under middle_cycle) are applied up to
`recursions` times, each token as often as the routers keep it. At step r a router
(column r of `router`, (d_model, recursions)) scores the hidden states of the tokens
still active; the top `capacity[r]` fraction of each sequence's real tokens among them
(expert choice; the schedule does not grow) is gathered in its original order, with
its positions and segment ids, runs the shared blocks as `x + g * (blocks(x) - x)` with
`g = sigmoid(score)`, and is scattered back; the others stop there. Each step has its
own static capacity, so the steps are unrolled (parameters shared) and the traced
FLOPs fall with the schedule.

Top-k over a sequence is not causal. As in `mod`, an auxiliary causal predictor (an
MLP on the detached hidden state, one output per step, trained with a BCE loss to
predict each step's choice among the tokens still active) decides while decoding: the
recursions then run as a scan with one cache per step, and a token the predictor
stops writes its keys and values into the later steps' caches as not valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflm.errors import ConfigError, check_positive
from efflm.layers.attention.softmax import attention_mask
from efflm.layers.common import LOSSES, RNG_STREAMS, STATE_COLLECTIONS, STATS, sow_stat
from efflm.layers.depth.mod import (
    capacity_tokens,
    choose_top,
    gather,
    gather_tokens,
    predictor_terms,
)
from efflm.layers.depth.plain import LayerGroup, PlainStack, make_layer, rematerialised
from efflm.layers.depth.recursive import check_shared_plan, check_sharing, shared_range

if TYPE_CHECKING:
    from efflm.config import ModelConfig


@dataclass
class MorSettings:
    # The shared blocks, as in `recursive` (model.num_layers = their full depth).
    unique_layers: int = 2
    recursions: int = 3
    sharing: str = "cycle"
    # The fraction of each sequence's tokens each step keeps, comma-separated, one per
    # recursion, not growing; "": (recursions - r) / recursions (1, 2/3, 1/3 for 3).
    capacity: str = ""
    predictor_loss: float = 0.01  # weight of the causal predictor's BCE (mean over steps)
    predictor_hidden: int = 64


def capacity_schedule(own) -> tuple[float, ...]:
    if not own.capacity.strip():
        return tuple((own.recursions - r) / own.recursions for r in range(own.recursions))
    try:
        return tuple(float(c) for c in own.capacity.split(","))
    except ValueError:
        raise ConfigError(f"model.depth.mor.capacity={own.capacity!r} must be comma-separated "
                          "fractions, e.g. 1,0.5") from None


def _weights(module: nn.Module, cfg: ModelConfig):
    """The routers (d_model, recursions) and the predictor's two matrices."""
    own, d = cfg.depth.mor, cfg.d_model
    param = lambda name, axes, shape: module.param(  # noqa: E731
        name, nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes),
        shape, jnp.float32)
    return (param("router", ("embed", None), (d, own.recursions)),
            param("predictor_in", ("embed", None), (d, own.predictor_hidden)),
            param("predictor_out", (None, None), (own.predictor_hidden, own.recursions)))


def _scores(weights, x, r):
    """Step r's router logits and the predictor's logits, for every position."""
    router, p_in, p_out = weights
    x = x.astype(jnp.float32)
    hidden = jax.nn.gelu(jax.lax.stop_gradient(x) @ p_in)
    return x @ router[:, r], hidden @ p_out[:, r]


def refuse_carry(cfg: ModelConfig, specs) -> None:
    """The shared blocks, which only some tokens run at later steps, cannot take the
    layer-to-layer carry (its per-token entries would be gathered out of shape)."""
    for spec in specs:
        for key, kind in (("attention.kind", spec.mixer), ("mlp.kind", spec.mlp)):
            owner = spec.mixer_kind if key == "attention.kind" else spec.mlp_kind
            if owner.takes_carry(cfg):
                raise ConfigError(
                    f"model.{key}={kind} passes a carry from layer to layer, which "
                    "model.depth.kind=mor cannot route through its shared blocks")


class DecodeStep(LayerGroup):
    """One recursion while decoding, scanned over the steps (parameters broadcast, so
    laid out as `LayerGroup`'s; one cache per step): the predictor's choice among the
    tokens still active runs the shared blocks."""

    @nn.compact
    def __call__(self, state, r, positions, weights):
        x, carry, active = state
        logits, predicted = _scores(weights, x, r)
        chosen = active & (predicted > 0)
        seg = chosen.astype(jnp.int32)
        y = x
        for j, spec in enumerate(self.specs):
            y, carry = make_layer(self.block, self.cfg, spec, f"layer_{j}")(
                y, carry, positions, seg, None)
        gate = jax.nn.sigmoid(logits)[..., None].astype(x.dtype)
        return (jnp.where(chosen[..., None], x + gate * (y - x), x), carry, chosen), None


class MorStack(PlainStack):
    """`first` (middle_cycle), the shared blocks `shared/layer_j` run by the routers up
    to `recursions` times, `last` (middle_cycle)."""

    settings = MorSettings
    causal_decoding = True  # the predictor routes while decoding

    @nn.compact
    def __call__(self, x, carry, positions, segment_ids, mask):
        cfg, plan, own = self.cfg, self.plan, self.cfg.depth.mor
        first, stop = shared_range(own)
        args = (positions, segment_ids, mask)
        if first:
            x, carry = make_layer(self.block, cfg, plan[0], "first", remat=True)(x, carry,
                                                                                 *args)
        weights = _weights(self, cfg)
        if self.is_mutable_collection("cache") and not self.is_initializing():
            x, carry = self._decode(x, carry, positions, weights, plan[first:stop])
        else:
            x, carry = self._route(x, carry, positions, segment_ids, weights,
                                   plan[first:stop])
        if first:
            x, carry = make_layer(self.block, cfg, plan[-1], "last", remat=True)(x, carry,
                                                                                 *args)
        return x

    def _route(self, x, carry, positions, segment_ids, weights, specs):
        cfg, own = self.cfg, self.cfg.depth.mor
        b, t, _ = x.shape
        group = rematerialised(LayerGroup, cfg)(cfg, self.block, specs, name="shared")
        valid = jnp.ones((b, t), bool) if segment_ids is None else segment_ids > 0
        real = jnp.sum(valid, axis=1, keepdims=True)
        active, depth = valid, jnp.zeros((b, t), jnp.float32)
        rows = jnp.arange(b)[:, None]
        for r, capacity in enumerate(capacity_schedule(own)):
            logits, predicted = _scores(weights, x, r)
            idx, chosen = choose_top(logits, active, capacity, real)
            member = jnp.zeros((b, t), jnp.float32).at[rows, idx].set(
                chosen.astype(jnp.float32))
            predictor_terms(self, "mor", own.predictor_loss / own.recursions, predicted,
                            member, jax.nn.sigmoid(logits), active)
            sow_stat(self, f"mor_capacity_use_{r}",
                     jnp.sum(chosen) / jnp.maximum(jnp.sum(valid), 1))
            xs, pos, seg = gather_tokens(x, positions, segment_ids, idx, chosen)
            (y, carry), _ = group((xs, carry), pos, seg, attention_mask(seg, xs.shape[1]))
            gate = jax.nn.sigmoid(gather(logits, idx))[..., None].astype(x.dtype)
            x = x.at[rows, idx].set(jnp.where(chosen[..., None], xs + gate * (y - xs), xs))
            active = member > 0
            depth = depth + member
        if self.is_initializing() and any(self.variables.get(c, {}).get("shared")
                                          for c in STATE_COLLECTIONS):
            raise ConfigError(
                "model.depth.kind=mor runs its shared blocks once per recursion step, "
                "unrolled, so their model state (an fp8 history, a sigmoid_bias router's "
                "bias, N:M masks) would be updated several times a step; use kinds "
                "without model state in the shared blocks")
        count = jnp.maximum(jnp.sum(valid), 1)
        sow_stat(self, "mor_depth_mean", jnp.sum(depth) / count)
        for r in range(own.recursions + 1):
            sow_stat(self, f"mor_depth_{r}", jnp.sum((depth == r) & valid) / count)
        return x, carry

    def _decode(self, x, carry, positions, weights, specs):
        own = self.cfg.depth.mor
        axes = {c: 0 for c in ("intermediates", "cache", LOSSES, STATS)}
        scanned = nn.scan(
            DecodeStep, variable_axes=axes, variable_broadcast="params",
            split_rngs={"params": False, **{s: True for s in RNG_STREAMS}},
            in_axes=(0, nn.broadcast, nn.broadcast), length=own.recursions)
        active = jnp.ones(x.shape[:2], bool)
        (x, carry, _), _ = scanned(self.cfg, self.block, specs, name="shared")(
            (x, carry, active), jnp.arange(own.recursions), positions, weights)
        return x, carry

    @staticmethod
    def not_causal(cfg: ModelConfig) -> str:
        return ("model.depth.kind=mor is not causal in a full pass: each recursion keeps "
                "the top-capacity tokens of each sequence, so how deep a token goes "
                "depends on later tokens (decoding routes by the causal predictor)")

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int, layer_flops) -> float:
        """The unique layers for every token; the shared blocks at step r for its
        capacity's tokens over a sequence of that many (attention's mix scales as
        c^2); every token's router and predictor at every step."""
        own, d = cfg.depth.mor, cfg.d_model
        first, stop = shared_range(own)
        unique = [i for i in range(cfg.num_layers) if i < first or i >= cfg.num_layers - first]
        total = sum(layer_flops(i, seq_len) for i in unique)
        for capacity in capacity_schedule(own):
            keep = capacity_tokens(capacity, seq_len)
            total += sum(keep / seq_len * layer_flops(i, keep) for i in range(first, stop))
        extra = 2 * d + 2 * d * own.predictor_hidden + 2 * own.predictor_hidden
        return total + own.recursions * extra

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        own = cfg.depth.mor
        check_positive("model.depth.mor.recursions", own.recursions)
        if own.recursions > cfg.num_layers:
            raise ConfigError(f"model.depth.mor.recursions={own.recursions} is more than "
                              f"model.num_layers={cfg.num_layers} (the full depth)")
        schedule = capacity_schedule(own)
        if len(schedule) != own.recursions:
            raise ConfigError(f"model.depth.mor.capacity={own.capacity!r} gives "
                              f"{len(schedule)} steps for model.depth.mor.recursions="
                              f"{own.recursions}")
        if any(not 0 < c <= 1 for c in schedule) or any(
                b > a for a, b in zip(schedule, schedule[1:])):
            raise ConfigError(f"model.depth.mor.capacity={own.capacity!r} must be fractions "
                              "in (0, 1] that do not grow from step to step")
        check_sharing(cfg, "mor", own)
        check_positive("model.depth.mor.predictor_hidden", own.predictor_hidden)
        check_positive("model.depth.mor.predictor_loss", own.predictor_loss, allow_zero=True)

    @staticmethod
    def check_plan(cfg: ModelConfig, plan: tuple) -> None:
        check_shared_plan(cfg, "mor", cfg.depth.mor, plan)
        first, stop = shared_range(cfg.depth.mor)
        refuse_carry(cfg, plan[first:stop])

    @staticmethod
    def check_mesh(cfg: ModelConfig, mesh_shape: dict) -> None:
        if mesh_shape.get("sequence", 1) > 1:
            raise ConfigError("model.depth.kind=mor chooses the top tokens of each whole "
                              "sequence; it cannot run with mesh.sequence > 1")

