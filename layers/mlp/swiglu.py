"""The SwiGLU feed-forward block (`model.mlp.kind=swiglu`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax

from efflm.layers.contract import FeedForward
from efflm.layers.dense import Dense, quant_kw

if TYPE_CHECKING:
    from efflm.config import ModelConfig


class SwiGLU(FeedForward):
    """Gated MLP `W_out(silu(x W_gate) * x W_up)` ("GLU Variants Improve Transformer")."""

    @staticmethod

    def quant_targets(cfg: ModelConfig) -> tuple[str, ...]:

        return ("mlp",)  # its projections go through the quantised-matmul hook

    d_ff: int = 0  # hidden width; 0: model.mlp.d_ff

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
        return 2 * 3 * cfg.d_model * cfg.mlp.d_ff

    @nn.compact
    def __call__(self, x, *, segment_ids=None):
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, **quant_kw(cfg, "mlp"))
        d_ff = self.d_ff or cfg.mlp.d_ff
        gate = Dense((d_ff,), ("embed", "mlp"), std=cfg.init_std, name="gate", **kw)(x)
        up = Dense((d_ff,), ("embed", "mlp"), std=cfg.init_std, name="up", **kw)(x)
        h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        return Dense((cfg.d_model,), ("mlp", "embed"), std=out_std, name="out", **kw)(h)
