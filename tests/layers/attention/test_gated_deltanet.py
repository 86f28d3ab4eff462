"""Gated DeltaNet (`model.attention.kind=gated_deltanet`): the chunked form against the
token scan, the layer against its reference, decoding, FLOPs, presets and bad settings."""

import functools

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
from test_linear import LAYER, SEGMENTS, _close, _layer_run

from efflm.cli import main
from efflm.flops import traced_matmul_flops
from efflm.layers import ATTENTION
from efflm.layers.attention.gated_deltanet import delta_rule_flops, delta_rule_impl
from efflm.layers.attention.parts import l2_normalize
from efflm.layers.plan import layer_plan
from efflm.models import LM
from efflm.pallas_kernels.gated_delta_rule import (
    delta_value_block,
    gated_delta_rule_chunked,
    gated_delta_rule_pallas,
    gated_delta_rule_recurrent,
    tril_block,
)
from efflm.train.roles import path_keys
from efflm.train.step import build_program

GDN = "model.attention.kind=gated_deltanet"
# Two whole chunks of 16 and a partial one; segment boundaries at 5, 20 and 33 fall
# inside chunks, the last segment (0) is a padding run.
LENGTH, CHUNK = 37, 16
SEGMENT_IDS = jnp.array([[1] * 5 + [2] * 15 + [3] * 13 + [0] * 4, [1] * LENGTH])


def _inputs(dtype):
    """q, k (L2-normalised), v, log decays in [-5, 0] (head 0 at exactly -5 every step),
    beta in (0, 1), an initial state and cotangents for the output and final state."""
    b, h, dk, dv = 2, 3, 8, 6
    keys = jax.random.split(jax.random.key(0), 8)
    q = jax.random.normal(keys[0], (b, LENGTH, h, dk))
    k = l2_normalize(jax.random.normal(keys[1], (b, LENGTH, h, dk)))
    v = jax.random.normal(keys[2], (b, LENGTH, h, dv))
    log_alpha = -5.0 * jax.random.uniform(keys[3], (b, LENGTH, h)).at[:, :, 0].set(1.0)
    beta = jax.nn.sigmoid(2 * jax.random.normal(keys[4], (b, LENGTH, h)))
    state = jax.random.normal(keys[5], (b, h, dk, dv))
    d_out = jax.random.normal(keys[6], (b, LENGTH, h, dv))
    d_state = jax.random.normal(keys[7], (b, h, dk, dv))
    return [a.astype(dtype) for a in (q, k, v)] + [log_alpha, beta, state, d_out, d_state]


def _value_and_grads(fn, q, k, v, log_alpha, beta, state, d_out, d_state):
    def objective(q, k, v, log_alpha, beta, state):
        out, final = fn(q, k, v, log_alpha, beta, initial_state=state,
                        segment_ids=SEGMENT_IDS)
        return (jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(final * d_state),
                (out, final))

    grad = fast_jit(jax.value_and_grad(objective, argnums=tuple(range(6)), has_aux=True))
    (_, (out, final)), grads = grad(q, k, v, log_alpha, beta, state)
    return out, final, *grads


FORMS = {
    "scan": gated_delta_rule_recurrent,
    "chunked": functools.partial(gated_delta_rule_chunked, chunk=CHUNK),
    # Chunks of 32 (two, the second partial); the head dims (8, 6) are padded to 16
    # and the value columns split over two programs, whose shares the wrapper sums.
    "pallas": functools.partial(gated_delta_rule_pallas, chunk=32, block_dv=8),
    # One chunk of 64: the triangular solve in two blocks of 32 rows (`tril_block`).
    "pallas_blocks": functools.partial(gated_delta_rule_pallas, chunk=64),
}


@functools.cache
def _form_results(form, dtype):
    inputs = fast_jit(_inputs, static_argnums=0)(dtype)  # eager: one compile per op
    return _value_and_grads(FORMS[form], *inputs)


@pytest.mark.parametrize("form, dtype, tol", [
    ("chunked", jnp.float32, 2e-5), ("chunked", jnp.bfloat16, 1e-2),
    ("pallas", jnp.float32, 2e-5), ("pallas_blocks", jnp.float32, 2e-5)])
def test_fast_forms_match_the_token_scan(form, dtype, tol):
    """Values, final state and gradients (q, k, v, log alpha, beta, initial state) over
    packed segments with boundaries inside chunks, a partial last chunk and decays down
    to e^-5 per step: the chunked XLA form and the Pallas kernels (interpreted on CPU),
    which also match each other."""
    got = _form_results(form, dtype)
    want = _form_results("scan", dtype)
    names = ("out", "final_state", "dq", "dk", "dv", "dlog_alpha", "dbeta", "dstate")
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype, name
        _close(a, b, tol)
    assert got[0].dtype == dtype and got[1].dtype == jnp.float32
    if form.startswith("pallas"):
        for a, b in zip(got, _form_results("chunked", dtype)):
            _close(a, b, tol)


def test_pallas_kernels_lower_to_triton_for_a_gpu():
    """No GPU needed: lowering the forward and backward for CUDA at GPU-sized shapes
    checks that the kernels use only what Pallas's Triton backend supports."""
    q = jnp.ones((1, 200, 2, 64), jnp.bfloat16)
    gates = jnp.full((1, 200, 2), -0.1)

    def grads(q, log_alpha, beta):
        def loss(q, log_alpha, beta):
            out = gated_delta_rule_pallas(q, q, q, log_alpha, beta, interpret=False)[0]
            return jnp.sum(out.astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(q, log_alpha, beta)

    lowered = jax.jit(grads).trace(q, gates, gates).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("@__gpu$xla.gpu.triton(") == 7


def test_pallas_flops_equal_the_kernels_matmuls(small_config):
    """Under impl=pallas the analytic count is the kernel's own: the matmuls its forward
    traces over two chunks of 32, with one program per batch row and head (dv 16) or
    two value-column programs per head, each taking q k^T again (dv 64)."""
    cfg = small_config(GDN, "model.attention.impl=pallas",
                       "model.attention.chunk_size=32").model
    q = jnp.ones((1, 64, 1, 16))
    gates = jnp.ones((1, 64, 1))
    for dv in (16, 64):
        traced = traced_matmul_flops(
            lambda q, v, g: gated_delta_rule_pallas(q, q, v, g, g, chunk=32), q,
            jnp.ones((1, 64, 1, dv)), gates)
        assert traced == pytest.approx(delta_rule_flops(cfg, 64, 1, 16, dv) * 64, rel=1e-12)
    xla = small_config(GDN, "model.attention.chunk_size=32").model
    assert delta_rule_flops(cfg, 64, 1, 16, 16) < delta_rule_flops(xla, 64, 1, 16, 16)
    # A program takes 32 value columns, 16 past dk = 64 (README), or all of a narrower
    # head.
    assert [delta_value_block(64, dv) for dv in (16, 32, 64, 128)] == [16, 32, 32, 32]
    assert [delta_value_block(128, dv) for dv in (16, 32, 256)] == [16, 16, 16]
    assert [tril_block(c) for c in (16, 32, 48, 64, 128)] == [16, 32, 48, 32, 32]


def test_auto_stays_on_xla_on_a_gpu(small_config, monkeypatch):
    """The kernels run when asked for; `auto` is XLA even on a GPU until measured there."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert delta_rule_impl(small_config(GDN).model) == "xla"
    assert delta_rule_impl(small_config(GDN, "model.attention.impl=pallas").model) == "pallas"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-2), (jnp.bfloat16, 6e-2)])
def test_compiled_pallas_kernels_on_gpu(dtype, tol):
    """The compiled kernels (chunk 64, head dim 64) against the token scan in float32,
    values and gradients, with packed segments and an initial state (TF32 / bf16 dots)."""
    keys = jax.random.split(jax.random.key(0), 6)
    b, t, h, d = 2, 200, 4, 64
    q, k = (l2_normalize(jax.random.normal(key, (b, t, h, d))) for key in keys[:2])
    v = jax.random.normal(keys[2], (b, t, h, d))
    log_alpha = -jax.random.uniform(keys[3], (b, t, h))
    beta = jax.nn.sigmoid(jax.random.normal(keys[4], (b, t, h)))
    state = jax.random.normal(keys[5], (b, h, d, d))
    segments = jnp.where(jnp.arange(t) < 90, 1, 2)[None].repeat(b, 0)

    def objective(fn, cast):
        def f(q, k, v, log_alpha, beta, state):
            out, final = fn(*(a.astype(cast) for a in (q, k, v)), log_alpha, beta,
                            initial_state=state, segment_ids=segments)
            return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(final ** 2)
        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(6))))

    args = (q, k, v, log_alpha, beta, state)
    fast = functools.partial(gated_delta_rule_pallas, chunk=64, interpret=False)
    got = objective(fast, dtype)(*args)
    want = objective(gated_delta_rule_recurrent, jnp.float32)(*args)
    _close(got[0], want[0], tol)
    for a, b in zip(got[1], want[1]):
        _close(a, b, tol)


@pytest.mark.parametrize("overrides", [
    [],
    ["model.attention.gated_deltanet.short_conv=false",
     "model.attention.gated_deltanet.output_gate=false", "model.attention.impl=pallas",
     "model.attention.gated_deltanet.value_expansion=1"],
])
def test_layer_matches_its_token_scan_reference(small_config, overrides):
    """The layer (chunks of 8 over 21 tokens; XLA, or Pallas interpreted) equals its
    token-scan reference over packed segments, values and gradients of every parameter
    and the input; a segment's outputs equal the layer run on that segment alone (the
    convolutions restart too)."""
    cfg = small_config(*LAYER, GDN, *overrides).model
    out, grads, (layer, params, x, positions) = _layer_run(cfg, SEGMENTS, reference=False)
    ref_out, ref_grads, _ = _layer_run(cfg, SEGMENTS, reference=True)
    assert ("query_conv" in params) == cfg.attention.gated_deltanet.short_conv
    assert ("output_gate" in params) == cfg.attention.gated_deltanet.output_gate
    _close(out, ref_out, 2e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        _close(a, b, 2e-5)
    alone = fast_jit(layer.apply)({"params": params}, x[:1, 6:15], positions[:1, :9], None, None)
    _close(out[:1, 6:15], alone, 2e-5)


def test_layer_computes_the_documented_formula(small_config):
    """The layer's output, written out from its parameters: the convolution taps (tap j
    reads j tokens back), SiLU, L2-normalised q and k with q scaled by dk^-1/2, beta and
    the decay, the gated delta rule, per-head RMSNorm, the output gate and projection;
    and the decay's initial ranges."""
    cfg = small_config(*LAYER, GDN, "model.attention.gated_deltanet.conv_width=3").model
    layer = ATTENTION["gated_deltanet"](cfg, reference=True)
    x = jax.random.normal(jax.random.key(0), (2, 12, cfg.d_model))
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    params = nn.unbox(fast_jit(layer.init)(jax.random.key(1), x, positions, None, None))
    params = params["params"]
    rate = jnp.exp(params["decay_log_scale"])
    time_step = jax.nn.softplus(params["decay_bias"])
    assert (0 < rate).all() and (rate <= 16).all()
    assert (1e-3 <= time_step).all() and (time_step <= 0.1 + 1e-6).all()
    got = fast_jit(layer.apply)({"params": params}, x, positions, None, None)

    def project(name, y=x):
        return jnp.einsum("btm,m...->bt...", y, params[name]["kernel"])

    def conv(name, y):
        kernel = params[f"{name}_conv"]["kernel"]
        padded = jnp.pad(y, [(0, 0), (2, 0), (0, 0), (0, 0)])
        return sum(kernel[j] * padded[:, 2 - j:14 - j] for j in range(3))

    @fast_jit
    def formula(params, x):
        q, k, v = (jax.nn.silu(conv(n, project(n))) for n in ("query", "key", "value"))
        q = q / jnp.linalg.norm(q, axis=-1, keepdims=True) * q.shape[-1] ** -0.5
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
        beta = jax.nn.sigmoid(project("beta"))
        log_alpha = -rate * jax.nn.softplus(project("decay") + params["decay_bias"])
        o = gated_delta_rule_recurrent(q, k, v, log_alpha, beta)[0]
        o = o / jnp.sqrt(jnp.mean(o * o, axis=-1, keepdims=True) + 1e-6)
        o = o * params["norm"]["scale"] * jax.nn.silu(project("output_gate"))
        return jnp.einsum("bthd,hdm->btm", o, params["out"]["kernel"])

    want = formula(params, x)
    _close(got, want, 1e-4)


def _model(small_config, *overrides):
    cfg = small_config("model.init_std=0.1", "model.attention.chunk_size=8", *overrides)
    model = LM(cfg.model)
    params = nn.unbox(fast_jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    params = params["params"]
    return model, {"params": params}


def test_prefill_and_steps_give_the_full_forward_logits(small_config):
    """Logits of a gated DeltaNet layer and a softmax layer through the recurrent state
    and the convolutions' last 3 inputs, from a prefill of 11 tokens (a chunk of 8 and a
    partial one), then one token at a time, equal one forward pass."""
    model, variables = _model(small_config, "model.attention.pattern=gated_deltanet,softmax")
    cached, full = cached_and_full_logits(model, variables)
    np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides", [  # the defaults alone: tests/test_kinds.py
    [GDN, "model.attention.gated_deltanet.output_gate=false"],
    ["model.attention.pattern=gated_deltanet,softmax", "model.num_layers=4",
     "model.attention.num_kv_heads=1"],
])
def test_flops_equal_the_traced_matmuls(small_config, overrides):
    """Exact at a length (40) that is no multiple of the chunk (16): the analytic count
    is the padded chunked form's, forward substitution included. A softmax layer runs one
    full masked softmax here: twice the causal half it is credited with. num_kv_heads
    (1 here) narrows only the softmax layers' keys and values."""
    cfg = small_config(*overrides, "data.seq_len=40", "model.attention.chunk_size=16").model
    traced, expected = traced_and_analytic_flops(cfg)
    assert traced == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("preset", ["tiny_gdn", "tiny_gdn_hybrid"])
def test_preset_trains(small_config, preset):
    """A few steps of each preset (at test shapes; the hybrid at its 4 layers, one of them
    softmax) on one packed batch lower the loss."""
    layers = 4 if preset == "tiny_gdn_hybrid" else 2
    cfg = small_config("optimizer.warmup_steps=0", f"model.num_layers={layers}", preset=preset)
    assert cfg.train.workdir == f"runs/{preset}"
    assert {s.mixer for s in layer_plan(cfg.model)} == (
        {"gated_deltanet", "softmax"} if layers == 4 else {"gated_deltanet"})
    losses = packed_batch_losses(cfg)
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("overrides, key", [
    (["model.attention.pattern=gated_deltanet,softmax",
      "model.attention.gated_deltanet.conv_width=-2"],
     "gated_deltanet.conv_width"),
    ([GDN, "model.attention.chunk_size=2048"], "chunk_size"),
    ([GDN, "model.attention.chunk_size=0"], "chunk_size"),
    ([GDN, "model.attention.impl=pallas", "model.attention.chunk_size=48"], "chunk_size"),
    ([GDN, "model.attention.gated_deltanet.conv_init=gaussian"], "gated_deltanet.conv_init"),
    *(([GDN, f"model.attention.gated_deltanet.value_expansion={value}"],
       "gated_deltanet.value_expansion") for value in ("0", "-2", "1.5", "two")),
])
def test_bad_settings_exit_2_with_one_line(capsys, overrides, key):
    assert main(["config", "show", "--config", "tiny", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"model.attention.{key}" in err[0], err


def test_value_expansion_widens_the_values_not_the_keys(small_config):
    cfg = small_config("model.attention.kind=gated_deltanet",
                       "model.attention.gated_deltanet.value_expansion=3").model
    h, d = cfg.attention.num_heads, cfg.d_model // cfg.attention.num_heads
    layer = ATTENTION["gated_deltanet"](cfg)
    x = jnp.ones((1, 8, cfg.d_model))
    positions, seg = jnp.arange(8)[None], jnp.ones((1, 8), jnp.int32)
    params = nn.unbox(jax.eval_shape(
        lambda: layer.init(jax.random.key(0), x, positions, seg, None))["params"])
    shapes = {k: v["kernel"].shape for k, v in params.items()
              if isinstance(v, dict) and "kernel" in v}
    assert shapes["query"] == shapes["key"] == (cfg.d_model, h, d)
    assert shapes["value"] == shapes["output_gate"] == (cfg.d_model, h, 3 * d)
    assert shapes["out"] == (h, 3 * d, cfg.d_model)


@pytest.mark.parametrize("conv_init", ["normal", "uniform"])
def test_initialisation(small_config, conv_init):
    """Decay rates exp(decay_log_scale) uniform in (0, 16] as the reference implementation
    draws them (64 heads: some below 1, which the range [1, 16] would not give); the
    convolution taps from N(0, init_std^2) (`normal`, the reference's) or uniform in
    +-conv_width^-1/2 (`uniform`)."""
    cfg = small_config(GDN, "model.d_model=256", "model.attention.num_heads=64",
                       f"model.attention.gated_deltanet.conv_init={conv_init}").model
    layer = ATTENTION["gated_deltanet"](cfg)
    x = jnp.ones((1, 8, cfg.d_model))
    params = nn.unbox(fast_jit(layer.init)(jax.random.key(0), x, jnp.arange(8)[None], None,
                                           None))["params"]
    taps = np.concatenate([np.ravel(params[f"{n}_conv"]["kernel"])
                           for n in ("query", "key", "value")])
    bound = cfg.attention.gated_deltanet.conv_width ** -0.5
    std = cfg.init_std if conv_init == "normal" else bound / 3 ** 0.5
    assert abs(taps.mean()) < 0.1 * std and taps.std() == pytest.approx(std, rel=0.05)
    if conv_init == "uniform":
        assert np.abs(taps).max() <= bound
    rate = np.exp(params["decay_log_scale"])
    assert (0 < rate).all() and (rate <= 16).all() and rate.min() < 1 and rate.max() > 12


def test_weight_decay_spares_the_decay_parameters(small_config):
    """On tiny_gdn's parameters, the optimizer's weight decay (zero gradients, so the
    update is the decay alone) moves every weight, convolution taps included, and leaves
    the norm scales and what the kind declares (`no_decay`: decay rate and time step)."""
    cfg = small_config("optimizer.warmup_steps=0", "optimizer.weight_decay=0.5",
                       preset="tiny_gdn")
    program = build_program(cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = nn.unbox(jax.eval_shape(program.model.init, jax.random.key(0), tokens)["params"])
    params = jax.tree.map(lambda p: jnp.ones(p.shape, p.dtype), params)

    @fast_jit
    def decay_alone(params):  # zero gradients: the update is the weight decay alone
        zeros = jax.tree.map(jnp.zeros_like, params)
        return program.tx.update(zeros, program.tx.init(params), params)[0]

    moved = {path_keys(p)[-2:]: bool(np.any(np.asarray(u) != 0))
             for p, u in jax.tree_util.tree_leaves_with_path(decay_alone(params))}
    assert {k for k, m in moved.items() if not m} >= {("attention", "decay_log_scale"),
                                                     ("attention", "decay_bias")}
    assert {k[-1] for k, m in moved.items() if not m} == {"decay_log_scale", "decay_bias",
                                                          "scale"}
    assert moved[("query_conv", "kernel")] and moved[("value", "kernel")]
