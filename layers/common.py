"""Small helpers shared by the layers: dtypes, initialisers, dense projections."""

import math
import warnings
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflm.errors import ConfigError

_warned = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def resolve_impl(impl: str, available: tuple[str, ...], what: str) -> str:
    """Map `auto | xla | pallas` to an implementation this build and device provide."""
    if impl == "auto":
        if "pallas" in available and jax.default_backend() == "gpu":
            return "pallas"
        return "xla"
    if impl not in available:
        raise ConfigError(f"{what} has no {impl!r} implementation yet; available: "
                          f"{', '.join(available)} (or auto)")
    if impl == "pallas" and jax.default_backend() != "gpu":
        warn_once(f"{what}: impl=pallas on {jax.default_backend()} runs in interpret mode")
    return impl


def decoding(module: nn.Module) -> bool:
    return module.is_mutable_collection("cache") and not module.is_initializing()


def param_dtype(name: str):
    return jnp.dtype(name)


def flat_matmul(x, kernel, in_dims: int = 1):
    """Contract the trailing `in_dims` axes of `x` with the leading ones of `kernel`.

    Both sides are flattened to 2-D first: XLA:CPU then picks layouts for the backward
    pass without transposing activations (measured 1.65x faster for a SwiGLU MLP
    than the same contraction on (batch, length, features) arrays).
    """
    lead, inner = x.shape[:-in_dims], x.shape[-in_dims:]
    out = kernel.shape[in_dims:]
    y = x.reshape(-1, math.prod(inner)) @ kernel.reshape(math.prod(inner), math.prod(out))
    return y.reshape(*lead, *out)


# The score of a masked (query, key) pair: finite, so a row with every pair masked stays
# a number, and far below any real score.
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)

# Named random streams a layer may draw from with `self.make_rng(name)` while training.
# The train step derives a fresh key for each from the state's key and the step; eval
# and generation pass none, so a layer checks `self.has_rng(name)` and is deterministic
# without one.
RNG_STREAMS = ("dropout", "router", "quant")

# Collections of non-trainable variables (router biases, fp8 scale histories, counters)
# that the train state carries beside the parameters: updated by the forward pass of
# the train step, checkpointed, never seen by the optimizer. A layer updates them only
# when `self.is_mutable_collection(name)`. OBSERVED is one too (below).
STATE_COLLECTIONS = ("state", "observed")

# What only the backward pass sees (the amax of an output gradient, for fp8's delayed
# scaling): a layer keeps a zero float variable in the OBSERVED collection, named as
# the `state` variable it will update, and returns the statistic as that variable's
# cotangent (a custom_vjp). The train step differentiates the collection with the
# parameters, takes the elementwise max of the cotangents over microbatches, and
# replaces the `state` variable at the same path with
# `OBSERVE_UPDATES[name](cfg, value, observed)` once per step. The variables stay zero.
OBSERVED = "observed"
OBSERVE_UPDATES: dict = {}


def observe_update(name: str):
    """Register `rule(cfg, value, observed) -> value` as the once-per-step update of the
    `state` variables named `name` from their OBSERVED cotangents (see OBSERVED)."""

    def register(rule):
        OBSERVE_UPDATES[name] = rule
        return rule

    return register


def apply_observations(cfg, model_state, observed):
    """`model_state` with each `state` variable named in OBSERVE_UPDATES updated from
    the observed cotangents at its path (every other leaf unchanged)."""

    def walk(tree, seen):
        if not isinstance(tree, Mapping):
            return tree
        return type(tree)({k: OBSERVE_UPDATES[k](cfg, v, seen[k]) if k in OBSERVE_UPDATES
                           else walk(v, seen.get(k, {})) for k, v in tree.items()})

    return {**model_state, "state": walk(model_state["state"], observed)}

# Model state that changes once per step, from what the step's forward passes recorded,
# rather than in each forward pass: a layer keeps it in a STATE_COLLECTIONS variable
# whose name is a key of STEP_UPDATES (its value any pytree of float arrays). Every
# forward pass of the train step starts from the step's state and writes the variable
# (e.g. this microbatch's expert load); the step combines the microbatches' values (their
# mean, `train.sown.combine_model_state`), then replaces each such variable with
# `STEP_UPDATES[name](cfg, value)` (cfg: the ModelConfig) before the next step. Under a
# scanned stack the value carries a leading layer axis, so a rule acts on the last axes.
# Eval and generation never write the state, so they change nothing.
STEP_UPDATES: dict = {}


def step_update(name: str):
    """Register `rule(cfg, value) -> value` as the once-per-step update of the
    model-state variables named `name` (see STEP_UPDATES)."""

    def register(rule):
        STEP_UPDATES[name] = rule
        return rule

    return register


def apply_step_updates(cfg, model_state):
    """`model_state` with each variable named in STEP_UPDATES replaced by its rule's
    update (every other leaf unchanged)."""

    def walk(tree):
        if not isinstance(tree, Mapping):
            return tree
        return type(tree)({k: STEP_UPDATES[k](cfg, v) if k in STEP_UPDATES else walk(v)
                           for k, v in tree.items()})

    return walk(model_state)


# Sown scalars: auxiliary losses (added to the objective, each counted once per step)
# and statistics (logged by name).
LOSSES = "losses"
STATS = "stats"

# How a statistic is combined over the layers that sow it and over microbatches;
# per_layer logs `name/layer_i` for each layer (averaged over microbatches).
STAT_REDUCTIONS = ("mean", "max", "min", "sum", "per_layer")


def sow_stat(module: nn.Module, name: str, value, reduce: str = "mean") -> None:
    """Log the scalar `value` as the statistic `name`, combined by `reduce`."""
    if reduce not in STAT_REDUCTIONS:
        raise ValueError(f"statistic {name!r}: reduce must be one of {STAT_REDUCTIONS}")
    module.sow(STATS, f"{reduce}:{name}", jnp.asarray(value, jnp.float32))


def sow_loss(module: nn.Module, name: str, value) -> None:
    """Add the scalar `value` to the training objective.

    `value` is a mean over the (micro)batch the layer sees; the step weighs it so that it
    counts exactly once per step, whatever `train.grad_accum` and the mesh.
    """
    module.sow(LOSSES, name, jnp.asarray(value, jnp.float32))
