"""Layer plans: which mixer and which feed-forward each layer of the stack runs, and the
whole-model questions answered by asking the kinds in it (`efflm.layers.contract`).

`layer_plan` turns the config into one `LayerSpec` per layer, its kinds resolved from the
registries once; everything else here reads the plan. The kinds themselves never import
this module: a depth stack is given its plan, and `check_plan` hooks receive it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from efflm.errors import ConfigError, check_choice
from efflm.layers.attention import ATTENTION
from efflm.layers.depth import DEPTH
from efflm.layers.mlp import MLP

if TYPE_CHECKING:
    from efflm.config import ModelConfig


@dataclass(frozen=True)
class LayerSpec:
    """What one layer is made of: its mixer and feed-forward kinds (the config values,
    and the registered classes), and whether only some tokens go through it."""

    mixer: str
    mlp: str
    routed: bool = False  # only some tokens go through it (mixture-of-depths)
    mixer_kind: type = field(default=None, compare=False, repr=False)
    mlp_kind: type = field(default=None, compare=False, repr=False)


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


def check_kind_names(cfg: ModelConfig) -> None:
    """Raise ConfigError for a kind, or a pattern entry, that no registry holds."""
    a, m = cfg.attention, cfg.mlp
    check_choice("model.attention.kind", a.kind, ATTENTION)
    check_choice("model.mlp.kind", m.kind, MLP)
    check_choice("model.depth.kind", cfg.depth.kind, DEPTH)
    for key, pattern, registry in (("model.attention.pattern", a.pattern, ATTENTION),
                                   ("model.mlp.pattern", m.pattern, MLP)):
        if pattern.strip() and len(pattern_kinds(pattern)) != len(pattern.split(",")):
            raise ConfigError(f"{key}={pattern!r} has an empty entry; list kinds separated "
                              "by commas, e.g. gla,gla,softmax")
        for kind in pattern_kinds(pattern):
            check_choice(f"{key} entry", kind, registry)


def layer_plan(cfg: ModelConfig) -> tuple[LayerSpec, ...]:
    """One spec per layer: `model.attention.pattern` and `model.mlp.pattern` repeat over
    the depth; an empty pattern means `kind` in every layer (for the MLP, in the layers
    that `model.mlp.every` and `first_dense` place it). The depth kind's
    `routed_layers` are routed."""
    mixers = _per_layer(cfg.attention.pattern, cfg.attention.kind, cfg.num_layers)
    if pattern_kinds(cfg.mlp.pattern):
        mlps = _per_layer(cfg.mlp.pattern, cfg.mlp.kind, cfg.num_layers)
    else:
        mlps = _mlp_placement(cfg)
    routed = depth_kind(cfg).routed_layers(cfg)
    return tuple(LayerSpec(a, m, i in routed, ATTENTION[a], MLP[m])
                 for i, (a, m) in enumerate(zip(mixers, mlps)))


def depth_kind(cfg: ModelConfig) -> type:
    return DEPTH[cfg.depth.kind]


def layer_kinds(plan: tuple[LayerSpec, ...]) -> list[type]:
    """The mixer and feed-forward classes the plan uses, each once, in a fixed order."""
    kinds = {s.mixer_kind for s in plan} | {s.mlp_kind for s in plan}
    return sorted(kinds, key=lambda c: c.__name__)


def validate_kinds(cfg: ModelConfig) -> tuple[LayerSpec, ...]:
    """Each kind of the model (its layers' and its depth's) checks its settings, then the
    plan; returns the plan."""
    check_kind_names(cfg)
    plan = layer_plan(cfg)
    if not pattern_kinds(cfg.mlp.pattern) and cfg.mlp.kind not in {s.mlp for s in plan}:
        raise ConfigError(f"model.mlp.first_dense={cfg.mlp.first_dense} and model.mlp.every="
                          f"{cfg.mlp.every} leave no layer of the {cfg.num_layers} with "
                          f"model.mlp.kind={cfg.mlp.kind!r}; lower them")
    kinds = [*layer_kinds(plan), depth_kind(cfg)]
    for kind in kinds:
        kind.validate_config(cfg)
    for kind in kinds:
        kind.check_plan(cfg, plan)
    return plan


def check_mesh(cfg: ModelConfig, mesh_shape: dict) -> None:
    """Each kind of the model checks that the mesh (axis -> size) can shard it; under
    `mesh.sequence` > 1 each mixer implements the chosen context-parallel strategy."""
    chosen = cfg.attention.context_parallel
    if mesh_shape.get("sequence", 1) > 1 and chosen != "auto":
        for mixer in sorted({s.mixer for s in layer_plan(cfg)
                             if chosen not in s.mixer_kind.context_parallel}):
            has = ", ".join(ATTENTION[mixer].context_parallel) or "none"
            raise ConfigError(
                f"model.attention.kind={mixer} has no context_parallel={chosen} form "
                f"(mesh.sequence={mesh_shape['sequence']}); it implements: {has}. Set "
                "model.attention.context_parallel=auto to leave its split length to XLA")
    for kind in [*layer_kinds(layer_plan(cfg)), depth_kind(cfg)]:
        kind.check_mesh(cfg, mesh_shape)


def not_causal(cfg: ModelConfig, decoding: bool = False) -> list[str]:
    """Why the model's outputs depend on later tokens, one reason per kind that says so;
    [] for a causal model. `decoding`: leave out the kinds that decode causally
    (`causal_decoding`)."""
    plan = layer_plan(cfg)
    kinds = [*layer_kinds(plan), depth_kind(cfg)]
    reasons = {k.not_causal(cfg) for k in kinds if not (decoding and k.causal_decoding)}
    keeping = sorted({s.mixer for s in plan if not s.mixer_kind.decode_skips_tokens})
    if decoding and keeping:  # a causal decoding rule that skips tokens cannot skip them
        reasons |= {f"{k.not_causal(cfg) or f'model.depth.kind={cfg.depth.kind} routes tokens'}"
                    "; while decoding it skips tokens, which the decoding state of "
                    f"model.attention.kind={', '.join(keeping)} takes all the same"
                    for k in kinds if k.causal_decoding}
    return sorted(r for r in reasons if r)


def quant_targets(cfg: ModelConfig) -> set[str]:
    """The entries of model.quant.targets that some matmul of this model goes through:
    the head, and each layer kind's `quant_targets`."""
    kinds = layer_kinds(layer_plan(cfg))
    return {"head"} | {t for k in kinds for t in k.quant_targets(cfg)}


def no_decay(cfg: ModelConfig) -> frozenset[str]:
    """Names of the parameters the model's kinds exempt from weight decay (`no_decay`)."""
    kinds = [*layer_kinds(layer_plan(cfg)), depth_kind(cfg)]
    return frozenset(name for kind in kinds for name in kind.no_decay(cfg))


def not_decoding(cfg: ModelConfig) -> list[str]:
    """The mixer kinds of the plan that have no decoding cache."""
    return sorted({s.mixer for s in layer_plan(cfg) if not s.mixer_kind.decodes})


def unbounded_decoding(cfg: ModelConfig) -> list[str]:
    """The mixer kinds of the plan whose decoding cache grows with the position."""
    return sorted({s.mixer for s in layer_plan(cfg) if not s.mixer_kind.bounded_cache})


def initial_carry(cfg: ModelConfig, plan: tuple[LayerSpec, ...], x) -> dict:
    """The carry the stack starts from: the union of the plan's kinds' entries."""
    carry = {}
    for kind in layer_kinds(plan):
        carry.update(kind.initial_carry(cfg, x))
    return carry
