"""Optimizers (`optimizer.name` -> `OPTIMIZERS`), the learning-rate schedule with warmup
then cosine/linear decay, global-norm clipping and weight decay by role.

An optimizer is a class with its own settings (`optimizer.<name>.*`, a dataclass), a
check of them and `transform(cfg, schedule, roles)`, the optax transformation it applies
after clipping; `cfg` is the `optimizer` section, whose shared fields (lr, schedule,
weight_decay, clip_norm, ...) every optimizer reads, and `roles` the parameters' roles
(train/roles.py), which Muon, GaLore and APOLLO route by. `report(opt_state)` gives the
scalars it logs under `optimizer/`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from efflm.errors import ConfigError, check_positive
from efflm.layers.quant import QUANT
from efflm.train.lowrank import oriented, scale_by_lowrank
from efflm.train.roles import ParamRoles, path_keys

if TYPE_CHECKING:
    from efflm.config import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Warmup then decay over `cfg.decay_steps` steps (0: `total_steps`); past them the
    rate holds its final value."""
    length = cfg.decay_steps or total_steps
    warmup = min(cfg.warmup_steps, length)
    decay_steps = max(length - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


# Parameters by role, named as the layers name them: gains and offsets are not decayed
# (by name, not by rank: a scanned stack gives a norm scale a leading `layers` axis),
# nor the parameters a number format declares its own (qat's step sizes, zero points).
NO_DECAY = ("scale", "bias", *sorted({name for fmt in QUANT.values() if fmt is not None
                                      for name in fmt.own_params}))


def decay_mask(params, exempt=()):
    """True for the parameters that weight decay applies to: the weights (matrices, the
    embedding, convolution taps), not norm scales, biases, nor the names in `exempt`
    (those the model's kinds declare, `Kind.no_decay`)."""
    skip = {*NO_DECAY, *exempt}
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in skip, params,
        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _decay_mask(roles: ParamRoles | None):
    """`decay_mask` with the exemptions the parameters' roles carry."""
    return functools.partial(decay_mask, exempt=roles.no_decay if roles else ())


class Optimizer:
    """An optimizer's declaration: its settings and its optax transformation."""

    settings = None  # a dataclass of its own settings (`optimizer.<name>.*`), or None
    resumable = ()  # fields of `settings` that a resumed run may change
    earlier_defaults: dict = {}  # setting -> its value before its default changed

    @staticmethod
    def validate_config(cfg: OptimizerConfig) -> None:
        """Raise ConfigError for a bad value of its own settings."""

    @staticmethod
    def transform(cfg: OptimizerConfig, schedule: optax.Schedule,
                  roles: ParamRoles) -> optax.GradientTransformation:
        """Raises ConfigError for a setting the parameters cannot take."""
        raise NotImplementedError

    @staticmethod
    def needs_roles(roles) -> None:
        if roles is None:
            raise ValueError("this optimizer routes parameters by role: pass make_optimizer "
                             "the ParamRoles of the parameters")

    @staticmethod
    def report(opt_state) -> dict:
        """Scalars to log (`optimizer/<name>`), read from the state after a step."""
        return {}


@dataclass
class AdamWSettings:
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8


class AdamW(Optimizer):
    """AdamW ("Decoupled Weight Decay Regularization"), decay on weights by role."""

    settings = AdamWSettings
    resumable = ("b1", "b2", "eps")

    @staticmethod
    def validate_config(cfg: OptimizerConfig) -> None:
        _check_betas("adamw", cfg.adamw)
        check_positive("optimizer.adamw.eps", cfg.adamw.eps, allow_zero=True)

    @staticmethod
    def transform(cfg: OptimizerConfig, schedule: optax.Schedule, roles=None):
        own = cfg.adamw
        return optax.adamw(schedule, b1=own.b1, b2=own.b2, eps=own.eps,
                           weight_decay=cfg.weight_decay, mask=_decay_mask(roles))


def _check_betas(name: str, own, keys=("b1", "b2")) -> None:
    for key in keys:
        value = getattr(own, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"optimizer.{name}.{key} must be in [0, 1), got {value}")


@dataclass
class LionSettings:
    b1: float = 0.9  # interpolation of momentum and gradient for the update's sign
    b2: float = 0.99  # momentum decay


class Lion(Optimizer):
    """Lion ("Symbolic Discovery of Optimization Algorithms"): the sign of an
    interpolation of momentum and gradient, one state per parameter, decoupled weight
    decay by role. Its paper uses a 3-10x smaller learning rate and a larger weight
    decay than AdamW's."""

    settings = LionSettings
    resumable = ("b1", "b2")

    @staticmethod
    def validate_config(cfg: OptimizerConfig) -> None:
        _check_betas("lion", cfg.lion)

    @staticmethod
    def transform(cfg: OptimizerConfig, schedule: optax.Schedule, roles=None):
        return optax.lion(schedule, b1=cfg.lion.b1, b2=cfg.lion.b2,
                          weight_decay=cfg.weight_decay, mask=_decay_mask(roles))


@dataclass
class AdafactorSettings:
    factored: bool = True  # row and column second moments for matrices
    min_dim_size_to_factor: int = 128  # smaller matrices keep a full second moment
    decay_rate: float = 0.8  # of the second moment's decay schedule
    clipping_threshold: float = 1.0  # of the update's RMS
    momentum: float = 0.0  # 0: none (the memory-saving default)
    multiply_by_parameter_scale: bool = True  # the learning rate is relative to |w|


class Adafactor(Optimizer):
    """Adafactor ("Adafactor: Adaptive Learning Rates with Sublinear Memory Cost"):
    factored second moments (a row and a column vector per matrix), weight decay by
    role."""

    settings = AdafactorSettings
    resumable = ("decay_rate", "clipping_threshold", "multiply_by_parameter_scale")

    @staticmethod
    def validate_config(cfg: OptimizerConfig) -> None:
        own = cfg.adafactor
        check_positive("optimizer.adafactor.min_dim_size_to_factor",
                       own.min_dim_size_to_factor)
        check_positive("optimizer.adafactor.clipping_threshold", own.clipping_threshold)
        for key in ("decay_rate", "momentum"):
            if not 0.0 <= getattr(own, key) < 1.0:
                raise ConfigError(f"optimizer.adafactor.{key} must be in [0, 1), got "
                                  f"{getattr(own, key)}")

    @staticmethod
    def transform(cfg: OptimizerConfig, schedule: optax.Schedule, roles=None):
        own = cfg.adafactor
        return optax.adafactor(
            schedule, min_dim_size_to_factor=own.min_dim_size_to_factor,
            decay_rate=own.decay_rate, clipping_threshold=own.clipping_threshold,
            momentum=own.momentum or None, factored=own.factored,
            multiply_by_parameter_scale=own.multiply_by_parameter_scale,
            weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=_decay_mask(roles))


def _adamw_for_the_rest(cfg: OptimizerConfig, schedule, b1: float, b2: float, eps: float,
                        roles: ParamRoles):
    """The AdamW group of Muon, GaLore and APOLLO: every parameter that is not a weight
    matrix, at `optimizer.lr`, decayed by role as AdamW decays it."""
    return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=cfg.weight_decay,
                       mask=_decay_mask(roles))


def _by_role(roles: ParamRoles, matrices: optax.GradientTransformation,
             rest: optax.GradientTransformation) -> optax.GradientTransformation:
    return optax.partition(
        {"matrix": matrices, "rest": rest},
        lambda params: roles.map(lambda p: "matrix" if p in roles.matrices else "rest",
                                 params))


class OrthogonalityState(NamedTuple):
    orthogonality_error: jax.Array


def scale_orthogonalized(roles: ParamRoles, consistent_rms: float):
    """Muon's per-matrix update scale, and the orthogonalisation error it logs.

    The scale: `consistent_rms * sqrt(max(fan_in, fan_out))` (the update RMS of AdamW, so
    the same learning rate and decay apply; "Muon is Scalable for LLM Training"), or with
    0 `sqrt(max(1, fan_out / fan_in))` (modded-nanogpt's). The error: the mean over
    matrix slices of |X X^T - I|_F / sqrt(s) for the Newton-Schulz output X (s x l, its
    smaller side first), 0 for an exact orthogonalisation."""

    def init_fn(params):
        del params
        return OrthogonalityState(jnp.zeros((), jnp.float32))

    def update_fn(updates, state, params=None):
        del params
        errors = []

        def one(path, u):
            matrix = roles.matrices[path]
            x = oriented(matrix, u).astype(jnp.float32)
            s = x.shape[1]
            gram = jnp.einsum("bsl,btl->bst", x, x) - jnp.eye(s)
            errors.append(jnp.sqrt(jnp.sum(gram * gram, axis=(1, 2)) / s))
            _, fan_in, fan_out = matrix.stacked
            factor = (consistent_rms * math.sqrt(max(fan_in, fan_out)) if consistent_rms
                      else math.sqrt(max(1.0, fan_out / fan_in)))
            return u * factor

        updates = jax.tree_util.tree_map_with_path(
            lambda p, u: one(path_keys(p), u), updates)
        return updates, OrthogonalityState(jnp.mean(jnp.concatenate(errors)))

    return optax.GradientTransformation(init_fn, update_fn)


@dataclass
class MuonSettings:
    beta: float = 0.95  # momentum
    nesterov: bool = True
    ns_steps: int = 5  # Newton-Schulz iterations
    # The update scale: 0.2 matches AdamW's update RMS so optimizer.lr and weight_decay
    # carry over; 0: modded-nanogpt's sqrt(max(1, fan_out / fan_in)), with a larger rate.
    consistent_rms: float = 0.2
    lr_ratio: float = 1.0  # the weight matrices' learning rate over optimizer.lr
    adam_b1: float = 0.9  # the AdamW group (embedding, head, routers, norms, biases)
    adam_b2: float = 0.95
    eps: float = 1e-8


class Muon(Optimizer):
    """Muon (Keller Jordan's modded-nanogpt): momentum orthogonalised by Newton-Schulz for
    the weight matrices (train/roles.py; scanned layers and experts are stacks of
    matrices, each orthogonalised on its own), AdamW for the embedding, the head, the
    routers and the vectors. Both groups follow the schedule, the matrices at
    `lr_ratio` times it; weight decay is decoupled, on every matrix and on the rest by
    role."""

    settings = MuonSettings
    resumable = ("beta", "nesterov", "ns_steps", "consistent_rms", "lr_ratio", "adam_b1",
                 "adam_b2", "eps")

    @staticmethod
    def validate_config(cfg: OptimizerConfig) -> None:
        own = cfg.muon
        if not 0.0 <= own.beta < 1.0:
            raise ConfigError(f"optimizer.muon.beta must be in [0, 1), got {own.beta}")
        _check_betas("muon", own, ("adam_b1", "adam_b2"))
        check_positive("optimizer.muon.ns_steps", own.ns_steps)
        check_positive("optimizer.muon.consistent_rms", own.consistent_rms, allow_zero=True)
        check_positive("optimizer.muon.lr_ratio", own.lr_ratio)
        check_positive("optimizer.muon.eps", own.eps, allow_zero=True)

    @staticmethod
    def transform(cfg: OptimizerConfig, schedule: optax.Schedule, roles=None):
        own = cfg.muon
        Muon.needs_roles(roles)
        dims = lambda tree: roles.map(
            lambda p: MuonDimensionNumbers(roles.matrices[p].reduction,
                                           roles.matrices[p].output), tree)
        matrices = optax.chain(
            scale_by_muon(ns_steps=own.ns_steps, beta=own.beta, eps=own.eps,
                          nesterov=own.nesterov, weight_dimension_numbers=dims),
            scale_orthogonalized(roles, own.consistent_rms),
            optax.add_decayed_weights(cfg.weight_decay),
            optax.scale_by_learning_rate(lambda step: own.lr_ratio * schedule(step)))
        return _by_role(roles, matrices, _adamw_for_the_rest(cfg, schedule, own.adam_b1,
                                                              own.adam_b2, own.eps, roles))

    @staticmethod
    def report(opt_state) -> dict:
        return {"optimizer/orthogonality_error":
                optax.tree.get(opt_state, "orthogonality_error")}


@dataclass
class GaLoreSettings:
    rank: int = 128  # of the projection (at most each matrix's smaller side)
    refresh: int = 200  # steps between SVDs of the gradient
    scale: float = 0.25  # alpha, the projected-back update's scale
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


@dataclass
class ApolloSettings:
    rank: int = 256  # of the random projection (at most each matrix's smaller side)
    refresh: int = 200  # steps between redraws of the projection
    scale: float = 1.0  # alpha, the scaled gradient's factor
    growth_limit: float = 1.01  # the update norm's largest growth per step (0: none)
    seed: int = 0  # of the random projections
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6


@dataclass
class ApolloMiniSettings(ApolloSettings):
    rank: int = 1
    scale: float = math.sqrt(128)


class LowRank(Optimizer):
    """Adam on a low-rank projection of each weight matrix's gradient (train/lowrank.py),
    AdamW on the rest (same betas); weight decay decoupled, in the full space, by role.
    A matrix whose smaller side is under `rank` uses that side."""

    method = "galore"
    channelwise = True

    @classmethod
    def validate_config(cls, cfg: OptimizerConfig) -> None:
        name = cfg.name
        own = getattr(cfg, name)
        _check_betas(name, own)
        for key in ("rank", "refresh"):
            check_positive(f"optimizer.{name}.{key}", getattr(own, key))
        check_positive(f"optimizer.{name}.scale", own.scale)
        check_positive(f"optimizer.{name}.eps", own.eps, allow_zero=True)
        limit = getattr(own, "growth_limit", 0.0)
        if limit and not 1.0 <= limit < float("inf"):
            raise ConfigError(f"optimizer.{name}.growth_limit must be 0 (none) or >= 1 and "
                              f"finite, got {limit}")

    @classmethod
    def transform(cls, cfg: OptimizerConfig, schedule: optax.Schedule, roles=None):
        name = cfg.name
        own = getattr(cfg, name)
        cls.needs_roles(roles)
        sides = [min(m.stacked[1:]) for m in roles.matrices.values()]
        if own.rank > max(sides, default=0):
            raise ConfigError(f"optimizer.{name}.rank={own.rank} is larger than every "
                              f"weight matrix's smaller side (the largest is "
                              f"{max(sides, default=0)})")
        matrices = optax.chain(
            scale_by_lowrank(roles, cls.method, own.rank, own.refresh, own.scale, own.b1,
                             own.b2, own.eps, channelwise=cls.channelwise,
                             growth_limit=getattr(own, "growth_limit", 0.0),
                             seed=getattr(own, "seed", 0)),
            optax.add_decayed_weights(cfg.weight_decay),
            optax.scale_by_learning_rate(schedule))
        return _by_role(roles, matrices,
                        _adamw_for_the_rest(cfg, schedule, own.b1, own.b2, own.eps, roles))

    @staticmethod
    def report(opt_state) -> dict:
        return {"optimizer/projection_age": optax.tree.get(opt_state, "projection_age")}


class GaLore(LowRank):
    """GaLore ("GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"):
    the projection is the gradient's top singular vectors, recomputed every `refresh`
    steps; Adam's moments live in it. Its paper's defaults."""

    settings = GaLoreSettings
    resumable = ("refresh", "scale", "b1", "b2", "eps")


class Apollo(LowRank):
    """APOLLO ("APOLLO: SGD-like Memory, AdamW-level Performance"): Adam on a random
    projection sets a per-channel scale of the raw gradient; a norm-growth limiter.
    Defaults: its paper's runs (rank 256, alpha 1)."""

    method = "apollo"
    settings = ApolloSettings
    resumable = ("scale", "growth_limit", "b1", "b2", "eps")

    @staticmethod
    def report(opt_state) -> dict:
        return {"optimizer/projection_age": optax.tree.get(opt_state, "projection_age"),
                "optimizer/limited": optax.tree.get(opt_state, "limited")}


class ApolloMini(Apollo):
    """APOLLO-Mini: rank 1 and one scale per matrix (tensor-wise); alpha sqrt(128), as in
    its paper's runs. Its state is two vectors of a matrix's larger side."""

    channelwise = False
    settings = ApolloMiniSettings


OPTIMIZERS = {"adamw": AdamW, "lion": Lion, "adafactor": Adafactor, "muon": Muon,
              "galore": GaLore, "apollo": Apollo, "apollo_mini": ApolloMini}
SCHEDULES = ("cosine", "linear", "constant")


def make_optimizer(cfg: OptimizerConfig, total_steps: int,
                   roles: ParamRoles | None = None) -> optax.GradientTransformation:
    """Clipping, then the optimizer; `roles` (the parameters' roles) for those that
    route by them (ConfigError for a setting the parameters cannot take)."""
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(OPTIMIZERS[cfg.name].transform(cfg, schedule, roles))
    return optax.chain(*parts)
