"""The linear attention kinds (linear, gla with data gates or RetNet's fixed decay, based):
each against its token-scan reference, the Pallas path, decoding, FLOPs, presets and
bad settings."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    cached_and_full_logits,
    fast_jit,
    packed_batch_losses,
    traced_and_analytic_flops,
)

from efflm.cli import main
from efflm.errors import ConfigError
from efflm.layers import ATTENTION
from efflm.models import LM
from efflm.train.generate import greedy_reference, sample

KINDS = {
    "linear": ["model.attention.kind=linear"],
    "linear_identity": ["model.attention.kind=linear",
                        "model.attention.linear.feature_map=identity",
                        "model.attention.linear.normalize=false"],
    "linear_relu": ["model.attention.kind=linear", "model.attention.linear.feature_map=relu"],
    "gla": ["model.attention.kind=gla"],
    "retnet": ["model.attention.kind=gla", "model.attention.gla.decay=fixed"],
    "based": ["model.attention.kind=based", "model.attention.based.feature_dim=4",
              "model.attention.based.window=6"],
}
# A layer: 2 heads of 16, chunks of 8 over 21 tokens (two whole chunks and a partial one).
LAYER = ("model.d_model=32", "model.attention.num_heads=2", "model.attention.chunk_size=8")
LENGTH = 21
SEGMENTS = jnp.array([[1] * 6 + [2] * 9 + [3] * 4 + [0] * 2, [1] * LENGTH])


def _close(actual, expected, tol):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert actual.shape == expected.shape and np.isfinite(actual).all()
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, atol=tol * scale, rtol=tol)


def _layer_run(cfg, segment_ids, reference):
    """Output and gradients (params, x) of <layer(x), d_out> for one layer."""
    cls = ATTENTION[cfg.attention.kind]
    layer = cls(cfg, reference=reference)
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, LENGTH, cfg.d_model)).astype(cfg.dtype)
    d_out = jax.random.normal(keys[1], (2, LENGTH, cfg.d_model))
    positions = jnp.broadcast_to(jnp.arange(LENGTH), (2, LENGTH))
    # Larger weights than training's init, so every branch moves the output.
    params = nn.unbox(fast_jit(cls(cfg).init)(keys[2], x, positions, segment_ids, None))["params"]
    params = jax.tree.map(lambda p: p * 5.0, params)

    def objective(params, x):
        out = layer.apply({"params": params}, x, positions, segment_ids, None)
        return jnp.sum(out.astype(jnp.float32) * d_out), out

    (_, out), grads = fast_jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(
        params, x)
    return out, grads, (layer, params, x, positions)


@pytest.mark.parametrize("kind, dtype, tol", [
    *((kind, "float32", 2e-5) for kind in ("linear", "linear_identity", "gla", "retnet",
                                            "based")),
    *((kind, "bfloat16", 3e-2) for kind in ("linear", "gla", "based")),
])
def test_kind_matches_its_token_scan_reference(small_config, kind, dtype, tol):
    """Chunked (and, for based, window-blocked) forms equal the token scan (and the full
    masked softmax) over packed segments, values and gradients; in float32 a segment's
    outputs also equal the layer run on that segment alone."""
    cfg = small_config(*LAYER, *KINDS[kind], f"model.dtype={dtype}").model
    out, grads, (layer, params, x, positions) = _layer_run(cfg, SEGMENTS, reference=False)
    ref_out, ref_grads, _ = _layer_run(cfg, SEGMENTS, reference=True)
    _close(out, ref_out, tol)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        _close(a, b, tol)
    if dtype == "float32":
        alone = fast_jit(layer.apply)({"params": params}, x[:1, 6:15], positions[:1, :9], None,
                                      None)
        _close(out[:1, 6:15], alone, tol)


@pytest.mark.parametrize("kind", ["linear", "gla", "based"])
def test_pallas_path_in_interpret_mode(small_config, kind):
    """impl=pallas (interpreted on CPU; based's 21 features padded to 32) equals the
    reference over packed segments, values and gradients, over a chunk of 16 and a
    partial one."""
    cfg = small_config(*LAYER, *KINDS[kind], "model.attention.impl=pallas",
                       "model.attention.chunk_size=16").model
    out, grads, _ = _layer_run(cfg, SEGMENTS, reference=False)
    ref_out, ref_grads, _ = _layer_run(cfg, SEGMENTS, reference=True)
    _close(out, ref_out, 2e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        _close(a, b, 2e-5)


DECODE = ("model.init_std=0.1", "model.attention.chunk_size=8",
          "model.attention.based.feature_dim=4", "model.attention.based.window=4")


def _model(small_config, *overrides):
    cfg = small_config(*DECODE, *overrides)
    model = LM(cfg.model)
    params = nn.unbox(fast_jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    params = params["params"]
    return model, {"params": params}


# Each kind alone is in tests/test_kinds.py; here RetNet's fixed decay and a scanned hybrid.
@pytest.mark.parametrize("overrides", [
    KINDS["retnet"],
    ["model.attention.pattern=based,softmax", "model.num_layers=4", "model.scan_layers=true"],
])
def test_prefill_and_steps_give_the_full_forward_logits(small_config, overrides):
    """Logits through the recurrent state (and based's ring buffer of 4, which wraps)
    from a prefill of 11 tokens, then one token at a time, equal one forward pass."""
    model, variables = _model(small_config, *overrides)
    cached, full = cached_and_full_logits(model, variables)
    np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)


def test_hybrid_generation_equals_uncached(small_config):
    """`efflm generate`'s sampler on a pattern of every kind: greedy tokens through the
    cache equal full forward passes, to the end of the context."""
    model, variables = _model(small_config, "model.attention.pattern=gla,based,linear,softmax",
                              "model.num_layers=4")
    prompt = [ord(c) for c in "def main():"]
    cached = sample(model, variables, np.array(prompt), max_new_tokens=100, temperature=0,
                    top_k=0, seed=0, bos_id=257)
    assert cached == greedy_reference(model, variables, prompt, 100, bos_id=257,
                                      forward=fast_jit(model.apply))
    assert len(cached) == 64 - 1 - len(prompt)


# Each kind at its defaults is in tests/test_kinds.py; here its variants and a hybrid.
@pytest.mark.parametrize("overrides", [
    KINDS["linear_identity"], KINDS["linear_relu"], KINDS["retnet"],
    ["model.attention.pattern=gla,based,softmax,linear", "model.num_layers=4"],
])
def test_flops_equal_the_traced_matmuls(small_config, overrides):
    """Exact, at a length (40) that is no multiple of the chunk (16) or the window (16):
    the analytic count is the padded chunked form's, which is what runs. A softmax layer
    runs one full masked softmax here: twice the causal half it is credited with."""
    cfg = small_config(*overrides, "data.seq_len=40", "model.attention.chunk_size=16",
                       "model.attention.based.window=16").model
    traced, expected = traced_and_analytic_flops(cfg)
    assert traced == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("preset", ["tiny_linear", "tiny_gla", "tiny_based", "tiny_hybrid"])
def test_preset_trains(small_config, preset):
    """A few steps of each preset (at test shapes; the hybrid at its 4 layers, one of them
    softmax) on one packed batch lower the loss."""
    layers = 4 if preset == "tiny_hybrid" else 2
    cfg = small_config("optimizer.warmup_steps=0", f"model.num_layers={layers}", preset=preset)
    assert cfg.train.workdir == f"runs/{preset}"
    losses = packed_batch_losses(cfg)
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("overrides, key", [
    (["model.attention.kind=based", "model.attention.based.window=-1"], "based.window"),
    (["model.attention.kind=based", "model.attention.based.window=2048"], "based.window"),
    (["model.attention.kind=gla", "model.attention.chunk_size=0"], "chunk_size"),
    (["model.attention.kind=gla", "model.attention.impl=pallas",
      "model.attention.chunk_size=12"], "chunk_size"),
    (["model.attention.kind=linear", "model.attention.impl=pallas",
      "model.attention.chunk_size=48"], "chunk_size=48: .*power of two"),
    (["model.attention.kind=based", "model.attention.impl=pallas",
      "model.attention.chunk_size=24"], "chunk_size=24: .*power of two"),
    (["model.attention.kind=linear", "model.attention.linear.feature_map=identity"],
     "linear.normalize"),
    (["model.attention.kind=gla", "model.attention.gla.decay=learned"], "gla.decay"),
    (["model.attention.pattern=gla,mamba"], "pattern"),
])
def test_bad_settings_exit_2_with_one_line(capsys, overrides, key):
    assert main(["config", "show", "--config", "tiny", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(f"model.attention.{key}", err[0]), err


@pytest.mark.parametrize("kind", ["gla", "linear"])
def test_chunk_the_gpu_kernel_cannot_take(small_config, monkeypatch, kind):
    """Under `auto` on a GPU (Pallas), a chunk that is no power of two is refused with the
    key named; on CPU (XLA) it runs."""
    cfg = small_config(*LAYER, *KINDS[kind], "model.attention.chunk_size=12").model
    x = jnp.zeros((1, 8, cfg.d_model))
    positions = jnp.zeros((1, 8), jnp.int32)
    layer = ATTENTION[kind](cfg)
    fast_jit(layer.init)(jax.random.key(0), x, positions, None, None)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ConfigError, match="model.attention.chunk_size=12"):
        fast_jit(layer.init)(jax.random.key(0), x, positions, None, None)
