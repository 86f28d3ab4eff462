"""Optimizers (`optimizer.name` -> `OPTIMIZERS`), the learning-rate schedule with warmup
then cosine/linear decay, global-norm clipping and weight decay by role.

An optimizer is a class with its own settings (`optimizer.<name>.*`, a dataclass), a
check of them and `transform(cfg, schedule)`, the optax transformation it applies after
clipping; `cfg` is the `optimizer` section, whose shared fields (lr, schedule,
weight_decay, clip_norm, ...) every optimizer reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import optax

from efflm.errors import ConfigError, check_positive

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
# (by name, not by rank: a scanned stack gives a norm scale a leading `layers` axis).
NO_DECAY = ("scale", "bias")


def decay_mask(params):
    """True for the parameters that weight decay applies to: every weight matrix and
    the embedding, not norm scales or biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in NO_DECAY, params,
        is_leaf=lambda x: isinstance(x, nn.Partitioned))


class Optimizer:
    """An optimizer's declaration: its settings and its optax transformation."""

    settings = None  # a dataclass of its own settings (`optimizer.<name>.*`), or None
    resumable = ()  # fields of `settings` that a resumed run may change

    @staticmethod
    def validate_config(cfg: OptimizerConfig) -> None:
        """Raise ConfigError for a bad value of its own settings."""

    @staticmethod
    def transform(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
        raise NotImplementedError


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
    def transform(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
        own = cfg.adamw
        return optax.adamw(schedule, b1=own.b1, b2=own.b2, eps=own.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask)


def _check_betas(name: str, own) -> None:
    for key in ("b1", "b2"):
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
    def transform(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
        return optax.lion(schedule, b1=cfg.lion.b1, b2=cfg.lion.b2,
                          weight_decay=cfg.weight_decay, mask=decay_mask)


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
    def transform(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
        own = cfg.adafactor
        return optax.adafactor(
            schedule, min_dim_size_to_factor=own.min_dim_size_to_factor,
            decay_rate=own.decay_rate, clipping_threshold=own.clipping_threshold,
            momentum=own.momentum or None, factored=own.factored,
            multiply_by_parameter_scale=own.multiply_by_parameter_scale,
            weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=decay_mask)


OPTIMIZERS = {"adamw": AdamW, "lion": Lion, "adafactor": Adafactor}
SCHEDULES = ("cosine", "linear", "constant")


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(OPTIMIZERS[cfg.name].transform(cfg, schedule))
    return optax.chain(*parts)
