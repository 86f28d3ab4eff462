"""Layer plans: which mixer and which MLP each layer of the stack runs.

`layer_plan` turns the config into one `LayerSpec` per layer; `repeating_group`
finds the shortest group of layers that the plan repeats, so that a scanned stack
compiles that group once and runs it `repeats` times (the leftover layers unrolled).
"""

from __future__ import annotations

from dataclasses import dataclass

from efflm.config import ModelConfig


@dataclass(frozen=True)
class LayerSpec:
    """What one layer is made of: keys into `efflm.layers.ATTENTION` and `MLP`."""

    mixer: str
    mlp: str
    routed: bool = False  # only some tokens go through it (mixture-of-depths)


def pattern_kinds(pattern: str) -> list[str]:
    """`"gla, gla,softmax"` -> `["gla", "gla", "softmax"]` (empty string: [])."""
    return [p.strip() for p in pattern.split(",") if p.strip()]


def _per_layer(pattern: str, default: str, num_layers: int) -> list[str]:
    kinds = pattern_kinds(pattern) or [default]
    return [kinds[i % len(kinds)] for i in range(num_layers)]


DENSE_MLP = "swiglu"


def _mlp_placement(cfg: ModelConfig) -> list[str]:
    """`model.mlp.kind` after the first `first_dense` layers, every `every`-th layer;
    the dense MLP elsewhere."""
    m = cfg.mlp
    return [m.kind if i >= m.first_dense and (i - m.first_dense + 1) % m.every == 0
            else DENSE_MLP for i in range(cfg.num_layers)]


def layer_plan(cfg: ModelConfig) -> tuple[LayerSpec, ...]:
    """One spec per layer: `model.attention.pattern` and `model.mlp.pattern` repeat over
    the depth; an empty pattern means `kind` in every layer (for the MLP, in the layers
    that `model.mlp.every` and `first_dense` place it)."""
    mixers = _per_layer(cfg.attention.pattern, cfg.attention.kind, cfg.num_layers)
    if pattern_kinds(cfg.mlp.pattern):
        mlps = _per_layer(cfg.mlp.pattern, cfg.mlp.kind, cfg.num_layers)
    else:
        mlps = _mlp_placement(cfg)
    from efflm.layers import DEPTH

    routed = getattr(DEPTH[cfg.depth.kind], "routed_layers", lambda c: set())(cfg)
    return tuple(LayerSpec(a, m, i in routed) for i, (a, m) in enumerate(zip(mixers, mlps)))


def not_causal(cfg: ModelConfig) -> list[str]:
    """Why the model's outputs depend on later tokens, one reason per kind that says so
    (`not_causal(cfg)` on its class returns a non-empty reason); [] for a causal model."""
    from efflm.layers import ATTENTION, MLP

    plan = layer_plan(cfg)
    kinds = {ATTENTION[s.mixer] for s in plan} | {MLP[s.mlp] for s in plan}
    reasons = {getattr(k, "not_causal", lambda c: "")(cfg) for k in kinds}
    return sorted(r for r in reasons if r)


def repeating_group(plan: tuple[LayerSpec, ...]) -> tuple[int, int]:
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
