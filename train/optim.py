"""AdamW with warmup then cosine/linear decay, global-norm clipping."""

import flax.linen as nn
import jax
import optax

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


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
