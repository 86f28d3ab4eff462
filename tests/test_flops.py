import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from efflm import flops
from efflm.flops import (
    forward_flops_per_token,
    peak_flops,
    traced_matmul_flops,
    train_flops_per_step,
)
from efflm.layers.attention.softmax import causal_mix_flops
from efflm.models import LM


def _xla_flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"]


def _model(cfg):
    model = LM(cfg.model)
    tokens = jnp.zeros((cfg.train.batch_size, cfg.data.seq_len), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))["params"]
    return model, params, tokens


def _blocked_factor(t, block):
    """Work of the query-blocked path over the causal half: block i of n attends to
    i + 1 key blocks, (n + 1) / 2 of n on average, against n / 2."""
    if not block or t <= block:
        return 2.0  # one full masked softmax
    n = -(-t // block)
    return (n + 1) / n


@pytest.mark.parametrize("overrides", [
    [],
    ["model.tie_embeddings=false", "model.attention.num_kv_heads=1", "model.mlp.d_ff=96"],
    ["model.attention.head_dim=32", "data.seq_len=64", "train.batch_size=2",
     "model.attention.softmax.block_size=0"],
    ["data.seq_len=64", "model.attention.softmax.block_size=16", "model.scan_layers=true",
     "model.num_layers=3"],
])
def test_analytic_flops_equal_the_traced_matmuls(small_config, overrides):
    """Every matmul term is exact; attention's scores and values do the stated factor of
    the causal half that the analytic count credits (2x for the full masked softmax,
    (n + 1) / n for n query blocks); the backward pass does exactly twice the forward."""
    cfg = small_config(*overrides)
    model, params, tokens = _model(cfg)
    b, t = tokens.shape
    factor = _blocked_factor(t, cfg.model.attention.softmax.block_size)
    mix = cfg.model.num_layers * causal_mix_flops(cfg.model, t)
    expected = (forward_flops_per_token(cfg.model, t) + (factor - 1) * mix) * b * t
    forward = traced_matmul_flops(lambda p, x: model.apply({"params": p}, x), params, tokens)
    assert forward == pytest.approx(expected, rel=1e-12)

    def loss(p, x):
        return jnp.mean(model.apply({"params": p}, x).astype(jnp.float32))

    assert traced_matmul_flops(jax.grad(loss), params, tokens) == pytest.approx(3 * forward)
    assert train_flops_per_step(cfg.model, t, b) == pytest.approx(
        3 * forward_flops_per_token(cfg.model, t) * b * t)


def test_xla_cost_analysis_agrees_on_an_unrolled_model(small_config):
    """XLA's own count of the unscanned forward pass is the traced matmuls plus a little
    elementwise work (norms, softmax, rotary), never less."""
    cfg = small_config("model.attention.softmax.block_size=0")
    model, params, tokens = _model(cfg)
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    traced = traced_matmul_flops(fn, params, tokens)
    assert traced <= _xla_flops(fn, params, tokens) <= 1.15 * traced


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
