import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from efflm import flops
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


@pytest.mark.parametrize("kind, name", [
    ("TPU v5 lite", "TPU v5 lite"),  # v5e
    ("TPU v5", "TPU v5"),  # v5p
    ("TPU v4", "TPU v4"),
    ("TPU v6 lite", "TPU v6 lite"),
    ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA L4", "L4"),
    ("cpu", None),
])
def test_device_kinds_find_their_datasheet(monkeypatch, kind, name):
    assert flops.datasheet_name(kind) == name
    if name is not None:
        monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(device_kind=kind)])
        peak, source = flops.peak_flops_per_device("bfloat16")
        assert source == f"datasheet {name}" and peak == flops.PEAK_FLOPS[name]["bfloat16"]


def test_measured_peak_keeps_the_best_reading(monkeypatch):
    monkeypatch.setattr(flops, "peak_flops", lambda dtype: (1e9, "measured float32 matmul"))
    readings = iter([3e9, 2e9])
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda *a, **k: next(readings))
    meter = flops.PeakMeter("float32", interval_s=0.0)
    assert meter.peak == 1e9  # a busy start-up reading ...
    assert meter.update() == 3e9  # ... is replaced by a better one,
    assert meter.update() == 3e9  # which a worse one does not lower
    slow = flops.PeakMeter("float32", interval_s=3600.0)
    assert slow.update() == 1e9  # no new reading before interval_s
