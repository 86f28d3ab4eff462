import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from efflm.flops import forward_flops_per_token, peak_flops, train_flops_per_step
from efflm.models import LM


def _xla_flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"]


@pytest.mark.parametrize("overrides", [
    [],
    ["model.tie_embeddings=false", "model.attention.num_kv_heads=1", "model.mlp.d_ff=96"],
    ["model.attention.head_dim=32", "data.seq_len=64", "train.batch_size=2"],
    ["data.seq_len=64", "model.attention.block_size=16"],
])
def test_analytic_flops_match_xla_cost_analysis(small_config, overrides):
    cfg = small_config(*overrides)
    model = LM(cfg.model)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    tokens = jnp.zeros((b, t), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))["params"]

    def loss(p, x):
        return jnp.mean(model.apply({"params": p}, x).astype(jnp.float32))

    analytic = train_flops_per_step(cfg.model, t, b)
    assert _xla_flops(jax.grad(loss), params, tokens) == pytest.approx(analytic, rel=0.15)
    forward = forward_flops_per_token(cfg.model, t) * b * t
    fwd = _xla_flops(lambda p, x: model.apply({"params": p}, x), params, tokens)
    assert fwd == pytest.approx(forward, rel=0.15)


def test_cpu_peak_is_measured():
    peak, source = peak_flops("float32")
    assert "measured" in source and 1e8 < peak < 1e14
