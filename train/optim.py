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

    @staticmethod
    def validate_config(cfg: OptimizerConfig) -> None:
        own = cfg.adamw
        for key, value in (("b1", own.b1), ("b2", own.b2)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"optimizer.adamw.{key} must be in [0, 1), got {value}")
        check_positive("optimizer.adamw.eps", own.eps, allow_zero=True)

    @staticmethod
    def transform(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
        own = cfg.adamw
        return optax.adamw(schedule, b1=own.b1, b2=own.b2, eps=own.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask)


OPTIMIZERS = {"adamw": AdamW}
SCHEDULES = ("cosine", "linear", "constant")


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(OPTIMIZERS[cfg.name].transform(cfg, schedule))
    return optax.chain(*parts)
