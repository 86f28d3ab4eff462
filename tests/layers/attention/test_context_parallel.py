"""Context parallelism (`layers/attention/context_parallel.py`): ring and all-gather
attention under `mesh.sequence` against the unsharded computation, what their lowered
programs exchange. (Training under `mesh.sequence`: tests/test_mesh.py; eval and
sampling under it: tests/train/test_trainer.py.)"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMALL, fast_jit

from efflm import mesh as mesh_lib
from efflm.config import load_config
from efflm.layers.attention.context_parallel import context_parallel_attention
from efflm.layers.attention.softmax import attention_mask, dot_product_attention
from efflm.train.step import build_program

B, T, HEADS, KV_HEADS, DIM = 2, 64, 4, 2, 8


def _inputs():
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.standard_normal((B, T, n, DIM)), jnp.float32)
                  for n in (HEADS, KV_HEADS, KV_HEADS, HEADS))
    # Documents of 10, 30 and 20 tokens and padding cross the chunk borders (16 or 8).
    seg = jnp.asarray([[1] * 10 + [2] * 30 + [3] * 20 + [0] * 4, [1] * T], jnp.int32)
    return q, k, v, w, seg


def _mesh_context(*mesh):
    cfg = load_config("tiny", [*mesh, f"model.attention.num_heads={HEADS}",
                               f"model.attention.num_kv_heads={KV_HEADS}"])
    mesh = mesh_lib.make_mesh(cfg.mesh)
    return mesh, mesh_lib.logical_rules(cfg, mesh)


def _sharded_equals_unsharded(unsharded, sharded, *mesh):
    """Values and gradients (q, k, v) of <attention(q, k, v, segments), w> under the mesh
    equal the unsharded computation's; returns the lowered program's text."""
    q, k, v, w, seg = _inputs()

    def loss(attend):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v, seg) * w),
                                  argnums=(0, 1, 2))

    want, want_grads = fast_jit(loss(unsharded))(q, k, v)
    mesh, rules = _mesh_context(*mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = fast_jit(loss(sharded))
        text = step.lower(q, k, v).as_text()
        got, grads = step(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, r in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=2e-6)
    return text


@pytest.mark.parametrize("strategy, mesh, block, impl", [
    ("ring", ("mesh.sequence=4", "mesh.data=2"), 4, "xla"),  # 4 query blocks a ring step
    ("ring", ("mesh.sequence=4", "mesh.data=2"), 0, "pallas"),  # flash kernels, interpreted
    ("zigzag", ("mesh.sequence=4", "mesh.data=2"), 4, "xla"),
    ("zigzag", ("mesh.sequence=4", "mesh.data=2"), 0, "pallas"),
    ("allgather", ("mesh.sequence=4", "mesh.data=2"), 0, "xla"),
    ("ulysses", ("mesh.sequence=4", "mesh.data=2"), 0, "xla"),  # 2 K/V heads repeated
    ("ring", ("mesh.sequence=8", "mesh.data=1"), 0, "xla"),
])
def test_strategies_equal_the_unsharded_attention(strategy, mesh, block, impl):
    """Values and gradients of q, k, v, with documents crossing shard borders; the ring
    exchanges chunks point to point and gathers nothing, all-gather the reverse."""
    def attend(q, k, v, seg):
        return dot_product_attention(q, k, v, attention_mask(seg, seg.shape[1]))

    text = _sharded_equals_unsharded(attend, lambda q, k, v, seg: context_parallel_attention(
        q, k, v, seg, strategy, block, impl, attend=attend), *mesh)
    permutes, gathers = text.count("collective_permute"), text.count("all_gather")
    exchanges = text.count("all_to_all")
    if strategy == "ulysses":  # the segment ids (batch, length) are gathered, nothing else
        assert exchanges == 8 and permutes == 0 and _all_gather_shapes(text) == {(B // 2, T)}
    else:
        assert exchanges == 0
        assert (permutes > 0, gathers > 0) == (strategy != "allgather",
                                               strategy == "allgather")


def _all_gather_shapes(text):
    """The result shapes of the all-gathers in lowered StableHLO text."""
    shapes = re.findall(r'"stablehlo\.all_gather"\(.*?->\s*tensor<([0-9x]+)x[a-z]', text)
    shapes += re.findall(r"stablehlo\.all_gather.*?->\s*tensor<([0-9x]+)x[a-z]", text)
    return {tuple(int(n) for n in s.split("x")) for s in shapes}


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_a_train_step_under_fsdp_gathers_no_keys_with_the_ring(strategy):
    """The lowered train step (FSDP, scanned and rematerialised layers): ring attention
    sends chunks with collective-permutes and no all-gather yields a key/value-shaped
    array (full length, head_dim last); all-gather attention does gather them. Nothing
    is stacked over the 3 ring steps (as when a scan over layers hoists the masks)."""
    cfg = load_config("tiny", [*SMALL, "mesh.fsdp=2", "mesh.sequence=4", "mesh.data=1",
                               "model.scan_layers=true", "model.remat=full",
                               f"model.attention.context_parallel={strategy}"])
    program = build_program(cfg)
    with program.context():
        state = jax.eval_shape(program.init, jax.random.key(0))
        b, t = cfg.train.batch_size, cfg.data.seq_len
        ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
        batch = {"inputs": ids, "targets": ids, "segment_ids": ids, "positions": ids}
        text = program.train_step.lower(state, batch).as_text()
    head_dim = cfg.model.d_model // cfg.model.attention.num_heads
    key_shaped = {s for s in _all_gather_shapes(text)
                  if len(s) == 4 and s[1] == t and s[3] == head_dim}
    assert bool(key_shaped) == (strategy == "allgather")
    assert ("collective_permute" in text) == (strategy == "ring")
    assert not re.search(r"tensor<3x\d+x\d+x\d+x", text)


@pytest.mark.parametrize("strategy, calls, exchange", [
    ("ring", 7, "collective_permute"), ("ulysses", 3, "all_to_all")])
def test_pallas_steps_lower_to_flash_calls_for_gpu(monkeypatch, strategy, calls, exchange):
    """No GPU needed: the model's loss and gradients under `mesh.sequence=4` and
    impl=pallas, lowered for CUDA, hold per layer 7 Triton calls for the ring (forward:
    the diagonal step, the loop's step, the last step; backward: dK/dV and dQ for the
    diagonal and for the loop's step) and 3 for Ulysses (the whole length's forward,
    dK/dV and dQ on each device's heads), besides their exchanges."""
    from efflm.models import LM

    cfg = load_config("tiny", [*SMALL, "mesh.sequence=4", "mesh.data=2",
                               "model.attention.impl=pallas", "model.dtype=bfloat16",
                               f"model.attention.context_parallel={strategy}"])
    mesh = mesh_lib.make_mesh(cfg.mesh)
    model = LM(cfg.model)
    tokens = jax.ShapeDtypeStruct((2, 64), jnp.int32)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # compiled kernels, no interpreter
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]

    def loss(params, tokens):
        return jnp.mean(model.apply({"params": params}, tokens, segment_ids=tokens))

    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.logical_rules(cfg, mesh)):
        text = jax.jit(jax.grad(loss)).trace(params, tokens).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("@__gpu$xla.gpu.triton(") == calls * cfg.model.num_layers
    assert exchange in text


def test_sliding_halo_equals_the_unsharded_window_and_sends_only_the_halo():
    """`sliding` (window 20, no sinks) under mesh.sequence=8: chunks of 8 tokens, so the
    19-token halo comes from three earlier devices (8 + 8 + 3 tokens), documents crossing
    the borders. Values and gradients equal the unsharded layer's; the exchanges are
    collective-permutes of those tails only, and nothing is gathered."""
    from efflm.layers.attention.sliding import sliding_attention

    local = functools.partial(sliding_attention, window=20, sinks=0, block=4)
    text = _sharded_equals_unsharded(local, lambda q, k, v, seg: context_parallel_attention(
        q, k, v, seg, "halo", attend=local, halo=19), "mesh.sequence=8", "mesh.data=1")
    assert "all_gather" not in text and "all_to_all" not in text
    tokens = sorted(int(m) for m in re.findall(
        r"collective_permute.*?->\s*tensor<2x(\d+)x2x8xf32>", text))
    assert tokens and set(tokens) == {8, 3}  # full chunks and the last tail, keys/values


@pytest.mark.parametrize("decay, normalize, mesh", [
    (None, True, ("mesh.sequence=4", "mesh.data=2")),  # linear: no decay, key sums z
    ("head", False, ("mesh.sequence=4", "mesh.data=2")),  # one gate per head (RetNet)
    ("key", False, ("mesh.sequence=8", "mesh.data=1")),  # one per key dimension (GLA)
])
def test_allscan_equals_the_unsharded_mix(decay, normalize, mesh):
    """The linear kinds' all-scan: values and gradients (q, k, v and the decays) of the
    outputs, key sums and final state equal the unsharded chunked mix, with documents
    crossing the chunk borders and one starting exactly at one (token 32); only
    fixed-size states are gathered."""
    from efflm.layers.attention.context_parallel import allscan_linear_attention
    from efflm.pallas_kernels.linear_attention import chunked_linear_attention, segment_cumsum

    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.uniform(0.1, 1.0, (B, T, 2, DIM)), jnp.float32) for _ in "qk")
    v, w, w_z = (jnp.asarray(rng.standard_normal((B, T, 2, DIM)), jnp.float32) for _ in "vww")
    w_s = jnp.asarray(rng.standard_normal((B, 2, DIM, DIM)), jnp.float32)
    shape = {None: None, "head": (B, T, 2), "key": (B, T, 2, DIM)}[decay]
    log_decay = None if shape is None else jnp.asarray(rng.uniform(-0.5, 0.0, shape),
                                                       jnp.float32)
    seg = jnp.asarray([[1] * 10 + [2] * 22 + [3] * 28 + [0] * 4, [1] * T], jnp.int32)

    def local(q, k, v, log_decay, seg):
        return chunked_linear_attention(q, k, v, log_decay=log_decay, chunk=8, impl="xla",
                                        segment_ids=seg)

    def loss(mix):
        def f(q, k, v, log_decay):
            out, z, final = mix(q, k, v, log_decay)
            return jnp.sum(out * w) + jnp.sum(z * w_z) + jnp.sum(final * w_s)
        return jax.value_and_grad(f, argnums=(0, 1, 2) if decay is None else (0, 1, 2, 3))

    def unsharded(q, k, v, log_decay):
        z = segment_cumsum(k, seg) if normalize else jnp.zeros(q.shape)
        out, final = local(q, k, v, log_decay, seg)
        return out, z, final

    want, want_grads = fast_jit(loss(unsharded))(q, k, v, log_decay)
    sharded = loss(lambda q, k, v, log_decay: allscan_linear_attention(
        q, k, v, log_decay, seg, local, normalize))
    mesh, rules = _mesh_context(*mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = fast_jit(sharded)
        text = step.lower(q, k, v, log_decay).as_text()
        got, grads = step(q, k, v, log_decay)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, r in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    assert "collective_permute" not in text and "all_to_all" not in text
    assert all(T not in s for s in _all_gather_shapes(text))  # no length-long array


@pytest.mark.parametrize("mesh", [("mesh.sequence=4", "mesh.data=2"),
                                  ("mesh.sequence=8", "mesh.data=1")])
def test_delta_rule_allscan_equals_the_unsharded_rule(mesh):
    """The gated delta rule's all-scan (dense transitions, three passes): values and
    gradients of q, k, v, the decays and beta, through the outputs and the final state,
    equal the unsharded chunked rule, with documents crossing chunk borders and one
    starting at token 32."""
    from efflm.layers.attention.context_parallel import allscan_delta_rule
    from efflm.layers.attention.parts import l2_normalize
    from efflm.pallas_kernels.gated_delta_rule import gated_delta_rule_chunked

    rng = np.random.default_rng(2)
    q, k = (l2_normalize(jnp.asarray(rng.standard_normal((B, T, 2, DIM)), jnp.float32))
            for _ in "qk")
    v, w = (jnp.asarray(rng.standard_normal((B, T, 2, DIM)), jnp.float32) for _ in "vw")
    w_s = jnp.asarray(rng.standard_normal((B, 2, DIM, DIM)), jnp.float32)
    log_alpha = jnp.asarray(rng.uniform(-0.5, 0.0, (B, T, 2)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0.1, 0.9, (B, T, 2)), jnp.float32)
    seg = jnp.asarray([[1] * 10 + [2] * 22 + [3] * 28 + [0] * 4, [1] * T], jnp.int32)

    def local(q, k, v, log_alpha, beta, seg, initial_state):
        return gated_delta_rule_chunked(q, k, v, log_alpha, beta, chunk=4, segment_ids=seg,
                                        initial_state=initial_state)

    def loss(mix):
        def f(*args):
            out, final = mix(*args)
            return jnp.sum(out * w) + jnp.sum(final * w_s)
        return jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4))

    args = (q, k, v, log_alpha, beta)
    want, want_grads = fast_jit(loss(lambda *a: local(*a, seg, None)))(*args)
    mesh, rules = _mesh_context(*mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got, grads = fast_jit(loss(lambda *a: allscan_delta_rule(*a, seg, local)))(*args)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, r in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_gated_deltanet_layer_exchanges_only_states_and_convolution_halos():
    """A gated DeltaNet layer's compiled gradient under data=2 x sequence=4: the all-scan
    gathers the (4 devices x) dk x dk transitions and dk x dv states (values twice as
    wide, the default value_expansion), and XLA's partitioner gives
    the short convolutions (4 taps) their 3-token halo by collective-permutes; nothing
    length-long is gathered."""
    from efflm.layers import ATTENTION

    cfg = load_config("tiny", ["model.attention.kind=gated_deltanet", "mesh.data=2",
                               "mesh.sequence=4", "model.d_model=32",
                               "model.attention.num_heads=2", "model.attention.chunk_size=8"])
    mesh = mesh_lib.make_mesh(cfg.mesh)
    x = jnp.zeros((B, T, 32))
    pos, seg = jnp.broadcast_to(jnp.arange(T), (B, T)), jnp.ones((B, T), jnp.int32)
    layer = ATTENTION["gated_deltanet"](cfg.model)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.logical_rules(cfg, mesh)):
        params = jax.eval_shape(layer.init, jax.random.key(0), x, pos, seg, None)
        grad = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x, pos, seg, None)),
                                argnums=1))
        text = grad.lower(params, x).compile().as_text()
    gathered = re.findall(r"= [a-z0-9]+\[([0-9,]+)\]\S* all-gather", text)
    assert gathered and all(s.split(",")[0] == "4" for s in gathered), gathered
    assert {tuple(s.split(",")[-2:]) for s in gathered} == {("16", "16"), ("16", "32")}
    halos = re.findall(r"= [a-z0-9]+\[\d+,(\d+)[0-9,]*\]\S* collective-permute", text)
    assert halos and {int(n) for n in halos} <= {1, 2, 3}, halos


def test_auto_picks_each_kinds_first_strategy_and_zigzag_needs_halves():
    """Under `auto` softmax runs zig-zag where 2N divides the length, the plain ring where
    only N does and nothing (XLA's partitioner) where N does not; sliding the halo."""
    from efflm.layers.attention.context_parallel import strategy
    from efflm.layers.attention.sliding import SlidingAttention
    from efflm.layers.attention.softmax import SoftmaxAttention

    cfg = load_config("tiny", ["mesh.sequence=4", "mesh.data=2"]).model
    mesh, _ = _mesh_context("mesh.sequence=4", "mesh.data=2")
    with jax.set_mesh(mesh):
        assert strategy(cfg, SoftmaxAttention.context_parallel, 32) == "zigzag"
        assert strategy(cfg, SoftmaxAttention.context_parallel, 36) == "ring"
        assert strategy(cfg, SoftmaxAttention.context_parallel, 34) is None
        assert strategy(cfg, SlidingAttention.context_parallel, 32) == "halo"
