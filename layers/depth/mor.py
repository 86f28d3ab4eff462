"""Mixture-of-Recursions (`model.depth.kind=mor`; "Mixture-of-Recursions: Learning
Dynamic Recursive Depths for Adaptive Token-Level Computation").

The shared blocks of the `recursive` kind (its sharing schemes and parameter layout:
`shared/layer_j`, and `first`/`last` under middle_cycle) are applied up to
`recursions` times, each token as often as the router lets it. Each step r has a static
number of slots, `capacity[r]` of the sequence: its tokens are gathered in their
original order, with their positions and segment ids, run the shared blocks and are
scattered back. The steps are unrolled (parameters shared), so the traced FLOPs fall
with the schedule.

Routers (`router`):
- `expert_choice`: at step r a router column scores the tokens still active and keeps
  the top `capacity[r]` fraction of each sequence's real tokens, which run the blocks
  as `x + g * (blocks(x) - x)`, `g = sigmoid(score)`. Top-k over a sequence is not
  causal: as in `mod`, an auxiliary causal predictor (an MLP on the detached hidden
  state, one output per step, trained with BCE on each step's choice) routes while
  decoding.
- `token_choice`: each token picks its depth once, top-1 of a softmax over the
  `recursions` depths of a linear router on the shared blocks' input `x0`, trained with
  the balancing loss `R * sum_d f_d * P_d` (f_d: share of real tokens choosing depth d,
  P_d: mean probability of depth d). The steps run the blocks ungated; the output is
  `x0 + g * (h - x0)`, `h` the state after the token's last step and `g` the
  probability of its depth. Overflow: step r's slots go to the tokens asking for it
  (chose a depth > r and ran step r - 1) in position order; the later ones of the row
  stop before it, so a token's depth depends only on earlier tokens (causal). Decoding
  has no capacity: it equals the full pass when nothing overflowed.

Keys and values (`kv`):
- `recursion`: each step attends among its own tokens and, decoding, keeps a cache of
  its own (one per step, every slot allocated; a token a step skips is written there as
  not valid).
- `shared` (recursive KV sharing): the first step attends among its tokens as above;
  every later step's queries attend to the first step's keys and values (of their
  document, at or before their position) and project none of their own; one cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflm.errors import ConfigError, check_choice, check_positive
from efflm.layers.attention.softmax import attention_mask
from efflm.layers.common import (
    LOSSES,
    RNG_STREAMS,
    STATE_COLLECTIONS,
    STATS,
    sow_loss,
    sow_stat,
)
from efflm.layers.depth.mod import (
    capacity_tokens,
    choose_top,
    gather,
    gather_tokens,
    predictor_terms,
)
from efflm.layers.depth.plain import LayerGroup, PlainStack, make_layer, rematerialised
from efflm.layers.depth.recursive import check_shared_plan, check_sharing, shared_range
from efflm.layers.moe.topk import balance_loss

if TYPE_CHECKING:
    from efflm.config import ModelConfig

ROUTERS = ("expert_choice", "token_choice")
KV = ("recursion", "shared")


@dataclass
class MorSettings:
    # The shared blocks, as in `recursive` (model.num_layers = their full depth).
    unique_layers: int = 2
    recursions: int = 3
    sharing: str = "cycle"
    # expert_choice: each step keeps the top tokens still active (not causal; a
    # predictor routes while decoding); token_choice: each token picks its depth once.
    router: str = "expert_choice"
    # The fraction of each sequence's tokens each step has slots for, comma-separated,
    # one per recursion, not growing; "": (recursions - r) / recursions (1, 2/3, 1/3).
    capacity: str = ""
    # recursion: each step its own keys, values and cache; shared: later steps attend
    # to the first step's (recursive KV sharing).
    kv: str = "recursion"
    predictor_loss: float = 0.01  # expert_choice: the predictor's BCE (mean over steps)
    predictor_hidden: int = 64
    balance_loss: float = 0.01  # token_choice: weight of R * sum_d f_d * P_d


def capacity_schedule(own) -> tuple[float, ...]:
    if not own.capacity.strip():
        return tuple((own.recursions - r) / own.recursions for r in range(own.recursions))
    try:
        return tuple(float(c) for c in own.capacity.split(","))
    except ValueError:
        raise ConfigError(f"model.depth.mor.capacity={own.capacity!r} must be comma-separated "
                          "fractions, e.g. 1,0.5") from None


def _weights(module: nn.Module, cfg: ModelConfig):
    """The router (d_model, recursions): a column per step (expert_choice) or the logits
    of the depths (token_choice); expert_choice's predictor's two matrices."""
    own, d = cfg.depth.mor, cfg.d_model
    param = lambda name, axes, shape: module.param(  # noqa: E731
        name, nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes),
        shape, jnp.float32)
    router = param("router", ("embed", None), (d, own.recursions))
    if own.router == "token_choice":
        return (router,)
    return (router, param("predictor_in", ("embed", None), (d, own.predictor_hidden)),
            param("predictor_out", (None, None), (own.predictor_hidden, own.recursions)))


def _scores(weights, x, r):
    """Step r's router logits and the predictor's logits, for every position."""
    router, p_in, p_out = weights
    x = x.astype(jnp.float32)
    hidden = jax.nn.gelu(jax.lax.stop_gradient(x) @ p_in)
    return x @ router[:, r], hidden @ p_out[:, r]


def choose_depths(module: nn.Module, router, x, valid):
    """Token choice: each token's step count less one (top-1 depth, (batch, length)
    int32) and the probability of its depth; sows the balancing loss `mor_balance`, the
    share of real tokens choosing each depth (`mor_choice_d`) and the router's entropy."""
    own = module.cfg.depth.mor
    logits = x.astype(jnp.float32) @ router
    probs = jax.nn.softmax(logits, axis=-1)
    choice = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    gate = jnp.take_along_axis(probs, choice[..., None], axis=-1)[..., 0]
    flat = valid.reshape(-1).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(flat), 1.0)
    if own.balance_loss:
        sow_loss(module, "mor_balance", own.balance_loss * balance_loss(
            choice.reshape(-1, 1), probs.reshape(-1, own.recursions), own.recursions, flat))
    for d in range(own.recursions):
        sow_stat(module, f"mor_choice_{d + 1}", jnp.sum((choice == d) & valid) / count)
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-9)), axis=-1)
    sow_stat(module, "mor_router_entropy", jnp.sum(entropy * valid) / count)
    return choice, gate


def overflow_slots(asking, capacity: float):
    """Token choice at one step: its `capacity_tokens(capacity, length)` slots go to the
    `asking` tokens (batch, length) in position order, the later ones overflow.

    Returns (idx, chosen, kept): the slots' positions (the kept tokens in order, then
    distinct unkept positions), which slots hold a kept token, and the kept tokens."""
    t = asking.shape[1]
    keep = capacity_tokens(capacity, t)
    kept = asking & (jnp.cumsum(asking, axis=1) <= keep)
    pos = jnp.arange(t)
    idx = jnp.argsort(jnp.where(kept, pos, t + pos), axis=1)[:, :keep]
    return idx, jnp.take_along_axis(kept, idx, axis=1), kept


def _decode_choice(weights, x, r, active, choice):
    """While decoding, which tokens run step r (the predictor's choice, or the depth each
    token chose) and expert choice's gate (None: token choice, ungated steps)."""
    if choice is None:
        logits, predicted = _scores(weights, x, r)
        return active & (predicted > 0), jax.nn.sigmoid(logits)
    return active & (choice >= r), None


def _step_output(x, y, chosen, gate):
    """A step's new state: `x + g * (y - x)` (expert choice) or `y` (token choice) for
    the tokens that ran it; the others keep `x`."""
    new = y if gate is None else x + gate[..., None].astype(x.dtype) * (y - x)
    return jnp.where(chosen[..., None], new, x)


def _token_output(x0, h, gate):
    """Token choice's output: `x0 + g * (h - x0)`."""
    return x0 + gate[..., None].astype(h.dtype) * (h - x0)


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
    """One recursion while decoding with a cache per step, scanned over the steps
    (parameters broadcast, so laid out as `LayerGroup`'s): the tokens `_decode_choice`
    picks among those still active run the shared blocks."""

    @nn.compact
    def __call__(self, state, r, positions, weights, choice):
        x, carry, active = state
        chosen, gate = _decode_choice(weights, x, r, active, choice)
        seg = chosen.astype(jnp.int32)
        y = x
        for j, spec in enumerate(self.specs):
            y, carry = make_layer(self.block, self.cfg, spec, f"layer_{j}")(
                y, carry, positions, seg, None)
        return (_step_output(x, y, chosen, gate), carry, chosen), None


class MorStack(PlainStack):
    """`first` (middle_cycle), the shared blocks `shared/layer_j` run by the router up
    to `recursions` times, `last` (middle_cycle)."""

    settings = MorSettings
    causal_decoding = True  # expert_choice: the predictor routes while decoding

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
        group = rematerialised(LayerGroup, cfg)(cfg, self.block, specs,
                                                share_kv=own.kv == "shared", name="shared")
        valid = jnp.ones((b, t), bool) if segment_ids is None else segment_ids > 0
        real = jnp.sum(valid, axis=1, keepdims=True)
        token = own.router == "token_choice"
        if token:
            choice, gate = choose_depths(self, weights[0], x, valid)
        x0, active, depth, kv = x, valid, jnp.zeros((b, t), jnp.float32), None
        rows = jnp.arange(b)[:, None]
        for r, capacity in enumerate(capacity_schedule(own)):
            if token:
                idx, chosen, kept = overflow_slots(active & (choice >= r), capacity)
                member, step_gate = kept.astype(jnp.float32), None
            else:
                logits, predicted = _scores(weights, x, r)
                idx, chosen = choose_top(logits, active, capacity, real)
                member = jnp.zeros((b, t), jnp.float32).at[rows, idx].set(
                    chosen.astype(jnp.float32))
                predictor_terms(self, "mor", own.predictor_loss / own.recursions, predicted,
                                member, jax.nn.sigmoid(logits), active)
                step_gate = gather(jax.nn.sigmoid(logits), idx)
            sow_stat(self, f"mor_capacity_use_{r}",
                     jnp.sum(chosen) / jnp.maximum(jnp.sum(valid), 1))
            xs, pos, seg = gather_tokens(x, positions, segment_ids, idx, chosen)
            (y, carry), emitted = group((xs, carry), pos, seg,
                                        attention_mask(seg, xs.shape[1]), kv)
            kv = emitted if kv is None else kv
            x = x.at[rows, idx].set(_step_output(xs, y, chosen, step_gate))
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
        if token:
            x = _token_output(x0, x, gate)
            sow_stat(self, "mor_dropped", jnp.sum((depth < choice + 1) & valid) / count)
        sow_stat(self, "mor_depth_mean", jnp.sum(depth) / count)
        for r in range(own.recursions + 1):
            sow_stat(self, f"mor_depth_{r}", jnp.sum((depth == r) & valid) / count)
        return x, carry

    def _decode(self, x, carry, positions, weights, specs):
        cfg, own = self.cfg, self.cfg.depth.mor
        x0, active = x, jnp.ones(x.shape[:2], bool)
        choice = gate = None
        if own.router == "token_choice":
            choice, gate = choose_depths(self, weights[0], x, active)
        if own.kv == "shared":  # one cache: the first step's, which later steps read
            group, kv = LayerGroup(cfg, self.block, specs, share_kv=True, name="shared"), None
            for r in range(own.recursions):
                chosen, step_gate = _decode_choice(weights, x, r, active, choice)
                (y, carry), emitted = group((x, carry), positions, chosen.astype(jnp.int32),
                                            None, kv)
                kv = emitted if kv is None else kv
                x, active = _step_output(x, y, chosen, step_gate), chosen
        else:
            axes = {c: 0 for c in ("intermediates", "cache", LOSSES, STATS)}
            scanned = nn.scan(
                DecodeStep, variable_axes=axes, variable_broadcast="params",
                split_rngs={"params": False, **{s: True for s in RNG_STREAMS}},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=own.recursions)
            (x, carry, _), _ = scanned(cfg, self.block, specs, name="shared")(
                (x, carry, active), jnp.arange(own.recursions), positions, weights, choice)
        return (x if gate is None else _token_output(x0, x, gate)), carry

    @staticmethod
    def not_causal(cfg: ModelConfig) -> str:
        if cfg.depth.mor.router == "token_choice":
            return ""
        return ("model.depth.kind=mor is not causal in a full pass: each recursion keeps "
                "the top-capacity tokens of each sequence, so how deep a token goes "
                "depends on later tokens (decoding routes by the causal predictor)")

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int, layer_flops) -> float:
        """The unique layers for every token; the shared blocks at step r for its
        capacity's tokens over a sequence of that many (attention's mix scales as c^2),
        or, at the later steps of kv=shared, over the first step's keys (no key or value
        projections); the router (and expert choice's predictor) for every token."""
        own, d = cfg.depth.mor, cfg.d_model
        first, stop = shared_range(own)
        unique = [i for i in range(cfg.num_layers) if i < first or i >= cfg.num_layers - first]
        total = sum(layer_flops(i, seq_len) for i in unique)
        keeps = [capacity_tokens(c, seq_len) for c in capacity_schedule(own)]
        for r, keep in enumerate(keeps):
            for i in range(first, stop):
                if own.kv == "shared" and r:
                    step = layer_flops(i, keeps[0], shared_kv=True)
                else:
                    step = layer_flops(i, keep)
                total += keep / seq_len * step
        if own.router == "token_choice":
            return total + 2 * d * own.recursions
        extra = 2 * d + 2 * d * own.predictor_hidden + 2 * own.predictor_hidden
        return total + own.recursions * extra

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        own = cfg.depth.mor
        check_positive("model.depth.mor.recursions", own.recursions)
        check_choice("model.depth.mor.router", own.router, ROUTERS)
        check_choice("model.depth.mor.kv", own.kv, KV)
        if own.recursions > cfg.num_layers:
            raise ConfigError(f"model.depth.mor.recursions={own.recursions} is more than "
                              f"model.num_layers={cfg.num_layers} (the full depth)")
        schedule = capacity_schedule(own)
        if len(schedule) != own.recursions:
            raise ConfigError(f"model.depth.mor.capacity={own.capacity!r} gives "
                              f"{len(schedule)} steps for model.depth.mor.recursions="
                              f"{own.recursions}")
        if any(not 0 < c <= 1 for c in schedule):
            raise ConfigError(f"model.depth.mor.capacity={own.capacity!r}: each step's "
                              "fraction must be in (0, 1] (a step of capacity 0 can hold "
                              "no token)")
        if any(b > a for a, b in zip(schedule, schedule[1:])):
            raise ConfigError(f"model.depth.mor.capacity={own.capacity!r} must be fractions "
                              "that do not grow from step to step")
        if own.kv == "shared" and own.recursions < 2:
            raise ConfigError("model.depth.mor.kv=shared hands the first recursion's keys "
                              "and values to the later ones, and model.depth.mor."
                              "recursions=1 has none; set kv=recursion or recursions >= 2")
        check_sharing(cfg, "mor", own)
        check_positive("model.depth.mor.predictor_hidden", own.predictor_hidden)
        check_positive("model.depth.mor.predictor_loss", own.predictor_loss, allow_zero=True)
        check_positive("model.depth.mor.balance_loss", own.balance_loss, allow_zero=True)

    @staticmethod
    def check_plan(cfg: ModelConfig, plan: tuple) -> None:
        check_shared_plan(cfg, "mor", cfg.depth.mor, plan)
        first, stop = shared_range(cfg.depth.mor)
        refuse_carry(cfg, plan[first:stop])
        if cfg.depth.mor.kv == "shared":
            from efflm.layers.attention import ATTENTION

            sharing = ", ".join(k for k, c in ATTENTION.items() if c.shares_kv)
            for spec in plan[first:stop]:
                if not spec.mixer_kind.shares_kv:
                    raise ConfigError(
                        f"model.depth.mor.kv=shared: model.attention.kind={spec.mixer} in "
                        "the shared blocks has no keys and values a later recursion can "
                        f"attend to (kinds that have: {sharing})")

    @staticmethod
    def check_mesh(cfg: ModelConfig, mesh_shape: dict) -> None:
        if mesh_shape.get("sequence", 1) > 1:
            raise ConfigError("model.depth.kind=mor chooses the tokens of each step over the "
                              "whole sequence; it cannot run with mesh.sequence > 1")
