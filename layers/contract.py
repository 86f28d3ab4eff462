"""The kind contract: one base class per family of kinds, listing every hook that central
code calls, with its default.

A kind is a class registered under its config value (`efflm.layers.attention.ATTENTION`,
`efflm.layers.mlp.MLP`, `efflm.layers.moe.ROUTERS`, `efflm.layers.depth.DEPTH`,
`efflm.layers.quant.QUANT`). It subclasses its family's base and overrides the hooks it
needs; central code (`efflm.layers.plan`, the config checks, FLOPs, generation, export)
calls the hooks and never asks for a kind by name. Hooks are static methods of the class
(`cfg` is the ModelConfig), so they answer without building a module.

Families and how they are called:
- `Mixer` (`model.attention.kind`): `(x, positions, segment_ids, mask) -> y` (one with
  `shares_kv` also takes `kv=` and `emit_kv=`).
- `FeedForward` (`model.mlp.kind`): `(x, segment_ids=...) -> y`.
  A mixer or feed-forward whose `takes_carry(cfg)` is true gets the layer-to-layer carry
  (a dict) after `x` and returns `(y, carry)`.
- `Router` (`model.moe.router`): `(x, carry, segment_ids) -> (Routing, carry)`, `x` of
  shape (batch, length, d_model).
- `Depth` (`model.depth.kind`): a stack built as `(cfg, block, plan)` and called
  `(x, carry, positions, segment_ids, mask) -> x`.
- `NumberFormat` (`model.quant.kind`): quantisers of the matmul operands; not a module.

A kind reads its own settings as `cfg.<family>.<kind name>` (e.g. `cfg.attention.gla`),
and the settings its family shares at the family level (`cfg.attention.num_heads`).

`segment_ids` (batch, length) int32 marks packed documents, 0 for padding (None: every
position is a token of one document).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from efflm.config import ModelConfig


class Kind:
    """Hooks every family shares."""

    # The kind's own settings: a dataclass whose fields appear in the config under the
    # kind's name in its family's section (`model.attention.gla.gate_rank`); None: it
    # has none of its own.
    settings = None
    # Fields of `settings` that a resumed run may change (they change no parameter).
    resumable = ()
    # Fields of `settings` whose default changed after they were added -> the value a
    # run saved before they existed ran with (its saved config is read with it).
    earlier_defaults: dict = {}
    # Whether a kind that is `not_causal` in a full pass decodes causally by a rule of
    # its own (Mixture-of-Depths' predictor), so that `efflm generate` may sample it.
    causal_decoding = False

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        """Raise ConfigError for a bad value of the settings this kind reads."""

    @staticmethod
    def no_decay(cfg: ModelConfig) -> tuple[str, ...]:
        """Names of parameters this kind creates that weight decay leaves alone (beyond
        every norm's `scale` and every `bias`): gains, offsets and rates that set a time
        scale rather than weigh an input."""
        return ()

    @staticmethod
    def check_plan(cfg: ModelConfig, plan: tuple) -> None:
        """Raise ConfigError when the layer plan (`efflm.layers.plan.LayerSpec`s) does not
        suit this kind (e.g. too few layers of it)."""

    @staticmethod
    def check_mesh(cfg: ModelConfig, mesh_shape: dict) -> None:
        """Raise ConfigError when the mesh (axis name -> size) cannot shard this kind."""

    @staticmethod
    def not_causal(cfg: ModelConfig) -> str:
        """Why this kind's outputs depend on later tokens; "" when they do not."""
        return ""


class LayerKind(nn.Module, Kind):
    """Hooks of the kinds a layer of the plan is made of (mixers and feed-forwards)."""

    cfg: Any  # the ModelConfig

    @staticmethod
    def quant_targets(cfg: ModelConfig) -> tuple[str, ...]:
        """The entries of model.quant.targets whose matmuls this kind has (they go
        through the quantised-matmul hook); (): none."""
        return ()

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
        """Forward matmul FLOPs per token over a sequence of seq_len tokens (PaLM's
        convention: 2 per multiply-add, the work really done)."""
        raise NotImplementedError

    @staticmethod
    def inactive_params(cfg: ModelConfig) -> int:
        """Parameters of this layer that a token does not use (unrouted experts)."""
        return 0

    @staticmethod
    def takes_carry(cfg: ModelConfig) -> bool:
        """Whether, under this config, the kind reads and returns the layer carry."""
        return False

    @staticmethod
    def initial_carry(cfg: ModelConfig, x: jax.Array) -> dict:
        """This kind's entries of the carry the stack starts from (x: the stack's input,
        (batch, length, d_model))."""
        return {}


class Mixer(LayerKind):
    """A token mixer (`model.attention.kind`)."""

    # Whether it decodes one token at a time through the `cache` collection (a layer
    # decodes while `cache` is mutable outside init); `efflm generate` refuses others.
    decodes = False
    # Whether, decoding, a token of segment id 0 leaves its cache unchanged (not a key
    # later tokens see): what a routed depth kind's predictor needs to skip a token;
    # `efflm generate` refuses `mod`/`mor` over a mixer whose state takes every token.
    decode_skips_tokens = False
    # Whether its decoding cache keeps a fixed size whatever the position (a ring
    # buffer): a model whose mixers all do may generate past model.max_seq_len.
    bounded_cache = False
    # The strategies of `model.attention.context_parallel` it implements under
    # `mesh.sequence` > 1, its default first (`layers/attention/context_parallel.py`);
    # without one, `auto` leaves the split length to XLA's partitioner.
    context_parallel = ()
    # Whether it can attend to keys and values another call computed (recursive KV
    # sharing, `model.depth.mor.kv=shared`): called with `kv=` a `SharedKV` it attends
    # to instead of projecting keys and values of its own, or with `emit_kv=True` it
    # returns `(y, SharedKV)`, its own keys and values (decoding: its whole cache).
    shares_kv = False

    @staticmethod
    def kv_flops_per_token(cfg: ModelConfig) -> float:
        """Forward FLOPs per token of the key and value projections, which a call with
        `kv=` does not do (only with `shares_kv`)."""
        raise NotImplementedError

    @staticmethod
    def uncredited_pairs_per_token(cfg: ModelConfig, seq_len: int) -> float:
        """Query-key pairs per token that its XLA path scores beyond those
        `flops_per_token` credits (the masked pairs of the tiles a sparse pattern
        computes): work done that is not counted as useful."""
        return 0.0


class SharedKV(NamedTuple):
    """Keys and values one mixer call hands to another (`Mixer.shares_kv`)."""

    k: jax.Array  # (batch, keys, kv_heads, head_dim), rotary applied
    v: jax.Array  # (batch, keys, kv_heads, head_dim)
    positions: jax.Array  # (batch, keys) int32
    # (batch, keys) int32: each key's document, 0 for a slot that holds no key; a query
    # sees the keys of its own document at or before its position.
    segment_ids: jax.Array


class FeedForward(LayerKind):
    """A feed-forward block (`model.mlp.kind`)."""


class Routing(NamedTuple):
    """A router's choice for its tokens (all float arrays float32)."""

    experts: jax.Array  # (tokens, k) int32
    gates: jax.Array  # (tokens, k)
    probs: jax.Array  # (tokens, num_experts)
    logits: jax.Array  # (tokens, num_experts)
    # Per-sequence routers: (batch, rows) int32, the position in its sequence of each
    # row's token; `experts` and `gates` are then (batch, rows), one (token, expert) pair
    # per row, and a row with gate 0 adds nothing (its work is still done: the row count
    # is static). None: the (tokens, k) choices above.
    rows: jax.Array | None = None


class Router(nn.Module, Kind):
    """A Mixture-of-Experts router (`model.moe.router`). It sows its own auxiliary losses;
    the MoE layer sows the load statistics."""

    cfg: Any  # the ModelConfig

    # Whether every expert computes the same number of rows by construction (its load
    # statistics would carry no information, so the MoE layer does not log them).
    balanced = False
    # (column title, logged statistic) pairs that `efflm report` tabulates where a run
    # logged them (means over the last tenth of the steps).
    report_statistics: tuple = ()

    @staticmethod
    def flops_per_token(cfg: ModelConfig) -> float:
        """Forward matmul FLOPs per token of the routing itself."""
        raise NotImplementedError

    @staticmethod
    def rows_per_token(cfg: ModelConfig, seq_len: int = 0) -> float:
        """Expert rows computed per token over a sequence of seq_len tokens (0: the
        long-sequence limit)."""
        return cfg.moe.top_k

    @staticmethod
    def takes_carry(cfg: ModelConfig) -> bool:
        """Whether the router reads and updates the layer carry."""
        return False

    @staticmethod
    def initial_carry(cfg: ModelConfig, x: jax.Array) -> dict:
        """The router's entries of the carry the stack starts from."""
        return {}


class Depth(nn.Module, Kind):
    """How the layer plan is run (`model.depth.kind`)."""

    cfg: Any  # the ModelConfig
    block: Any  # the block class, built as block(cfg, spec, name=...)
    plan: tuple  # one LayerSpec per layer

    @staticmethod
    def routed_layers(cfg: ModelConfig) -> set[int]:
        """Layers that only some tokens go through (their specs are `routed`)."""
        return set()

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int, layer_flops) -> float:
        """Forward FLOPs per token of the stack, given `layer_flops(i, seq_len)` for
        layer i (`shared_kv=True`: attending to another call's keys and values, without
        its key and value projections): by default every token runs every layer."""
        return sum(layer_flops(i, seq_len) for i in range(cfg.num_layers))


# A format's parameters (qat's step sizes) as computed from the current weights: written
# into this collection when it is mutable, so that a resume that adds the format to a
# full-precision run starts them from the restored weights.
CALIBRATION = "calibration"


def straight_through(x: jax.Array, value: jax.Array) -> jax.Array:
    """`value` forward, the identity's gradient backward."""
    return x + jax.lax.stop_gradient(value.astype(x.dtype) - x)


class NumberFormat(Kind):
    """A number format of the hooked matmuls (`model.quant.kind`): quantised operands
    (integer or float8) with float32 scales."""

    # Names of the parameters it keeps in a hooked matmul (no weight decay applies to
    # them), and of those train.trainable=quant_scales trains alone (step sizes).
    own_params: tuple = ()
    scale_params: tuple = ()
    # Whether the format computes the hooked matmul itself (`matmul`); otherwise it runs
    # as `quantize_activation` x `quantize_weight` through `dot`, gradients passing
    # straight through the quantisers (`layers/quant/matmul.py:quantized_matmul`).
    custom_matmul = False

    @staticmethod
    def matmul(module: nn.Module, quant, x: jax.Array, w: jax.Array) -> jax.Array:
        """x (tokens, in) @ w (in, out), float32, inside the hooking `module` (which may
        keep the format's variables); `quant` is model.quant. Only with custom_matmul."""
        raise NotImplementedError

    @staticmethod
    def dot(xq: jax.Array, wq: jax.Array) -> jax.Array:
        """The product of quantised operands in float32, before scaling (default: an
        integer dot with int32 accumulation)."""
        return jax.lax.dot(xq, wq, preferred_element_type=jnp.int32).astype(jnp.float32)

    @staticmethod
    def quantize_weight(w: jax.Array) -> tuple[jax.Array, jax.Array]:
        """w (in, out) -> (integer values, float32 scale broadcasting against them)."""
        raise NotImplementedError

    @staticmethod
    def quantize_activation(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (tokens, in) -> (integer values, float32 scale)."""
        raise NotImplementedError

    @staticmethod
    def input_multiple(cfg: ModelConfig) -> tuple[int, str]:
        """(m, what): the input width of every hooked matmul must be a multiple of m
        (a block or group the format scales), `what` naming the setting in errors."""
        return 1, ""

    @classmethod
    def fake_quantize(cls, module, quant, x: jax.Array, w: jax.Array):
        """(x, w) as the quantised forward multiplies them, dequantised to float32 in x's
        and w's own basis, with this format's gradients (default: straight through);
        `module` the hooking module (None outside one), `quant` model.quant."""
        xq, sx = cls.quantize_activation(x)
        wq, sw = cls.quantize_weight(w)
        return (straight_through(x, xq.astype(jnp.float32) * sx),
                straight_through(w, wq.astype(jnp.float32) * sw))

    @classmethod
    def export_weight(cls, module, quant, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        """w (in, out) as an export stores it (`module` the hooking module, `quant`
        model.quant): (quantised values of w's shape, float32 scale)."""
        return cls.quantize_weight(w)

    @classmethod
    def exported_matmul(cls, quant, x: jax.Array, wq: jax.Array,
                        w_scale: jax.Array) -> jax.Array:
        """x (tokens, in) @ an exported weight (`export_weight`'s pair), float32: the
        quantised forward of a reloaded export."""
        xq, sx = cls.quantize_activation(x)
        return cls.dot(xq, wq) * sx * w_scale

    @staticmethod
    def pack_scale(scale: jax.Array) -> jax.Array:
        """Scales as stored in an export (default: float32 as they are)."""
        return scale

    @staticmethod
    def unpack_scale(stored: jax.Array) -> jax.Array:
        return stored

    @staticmethod
    def pack(q: jax.Array) -> jax.Array:
        """Quantised weights as stored in an export (default: as they are)."""
        return q

    @staticmethod
    def unpack(stored: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Inverse of `pack` for weights of `shape`."""
        return stored
