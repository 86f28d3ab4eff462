"""Blockwise linear cross-entropy (xla scan, Pallas interpreted) against full logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE

from efflm import mesh as mesh_lib
from efflm.pallas_kernels import fused_cross_entropy as ce_module
from efflm.pallas_kernels.fused_cross_entropy import cross_entropy, linear_cross_entropy
from efflm.train.step import build_program


def _inputs(tokens, d, vocab, dtype, batch=None, seed=0):
    rng = np.random.default_rng(seed)
    lead = (batch, tokens) if batch else (tokens,)
    h = jnp.asarray(rng.standard_normal((*lead, d)), dtype)
    w = jnp.asarray(rng.standard_normal((d, vocab)) / np.sqrt(d) * 3, dtype)
    targets = jnp.asarray(rng.integers(0, vocab, lead), jnp.int32)
    mask = jnp.asarray(rng.random(lead) > 0.25)  # padding scattered through the batch
    return h, w, targets, mask


def _value_and_grads(impl, h, w, targets, mask, z_loss, **blocks):
    def objective(h, w):
        if impl == "reference":
            terms = cross_entropy(h @ w, targets, mask, z_loss)
        else:
            terms = linear_cross_entropy(h, w, targets, mask, impl=impl, z_loss=z_loss,
                                         **blocks)
        loss_sum, z_sum, _ = terms
        # Weight the two sums differently so a swapped gradient would show.
        return loss_sum + 0.5 * z_sum, terms

    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(h, w)


def _close(got, want, rtol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.max(np.abs(want)) + 1e-30
    assert np.max(np.abs(got - want)) <= rtol * scale, (np.max(np.abs(got - want)), scale)


# (tokens, d, vocab, batch, block_t, block_v, z_loss): token counts and vocabularies that
# are not multiples of the blocks; one vocabulary smaller than a single block.
CASES = [
    (37, 40, 300, None, 16, 128, 0.0),
    (2 * 21, 32, 257, 2, 32, 64, 1e-2),
    (24, 8, 50, None, 16, 64, 1e-3),
]


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}d{c[1]}V{c[2]}z{c[6]}")
def test_matches_full_logits_float32(impl, case):
    tokens, d, vocab, batch, block_t, block_v, z_loss = case
    length = tokens // batch if batch else tokens
    h, w, targets, mask = _inputs(length, d, vocab, jnp.float32, batch)
    (want, want_terms), want_grads = _value_and_grads("reference", h, w, targets, mask, z_loss)
    (got, got_terms), got_grads = _value_and_grads(
        impl, h, w, targets, mask, z_loss, block_t=block_t, block_v=block_v, block_d=16)
    for g, r in zip(got_terms, want_terms):
        _close(g, r, 1e-5)
    _close(got, want, 1e-5)
    if z_loss == 0.0:
        assert float(got_terms[1]) == 0.0
    for g, r in zip(got_grads, want_grads):
        assert g.shape == r.shape and g.dtype == r.dtype
        _close(g, r, 1e-5)
    assert float(jnp.abs(got_grads[0]).max()) > 0  # the inputs really carry a gradient


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_matches_full_logits_bfloat16(impl):
    h, w, targets, mask = _inputs(40, 32, 200, jnp.bfloat16, seed=1)
    (want, _), want_grads = _value_and_grads("reference", h, w, targets, mask, 1e-2)
    (got, _), got_grads = _value_and_grads(impl, h, w, targets, mask, 1e-2,
                                           block_t=16, block_v=64)
    _close(got, want, 2e-2)
    for g, r in zip(got_grads, want_grads):
        assert g.dtype == jnp.bfloat16
        _close(g, r, 5e-2)


def test_pallas_kernels_write_every_output_element():
    """The forward, dh and dw kernels write into NaN-filled buffers: no NaN may survive,
    padding included, and the results are those of the plain calls. The backward sweeps
    take two blocks each (two sweeps over tokens and over the vocabulary)."""
    tokens, d, vocab = 37, 40, 300
    h, w, targets, _ = _inputs(tokens, d, vocab, jnp.float32, seed=5)
    blocks = ce_module._Blocks(vocab=vocab, block_t=16, block_v=128, block_d=16,
                               interpret=True, sweep_v=2, sweep_t=2)
    hp, wp, tp = ce_module._pad_operands(h, w, targets, blocks)
    assert hp.shape[0] > tokens and hp.shape[1] > d and wp.shape[1] > vocab
    static = dict(b=blocks)
    nan = lambda a: jnp.full(a.shape, jnp.nan, a.dtype)

    forward = jax.jit(functools.partial(ce_module._forward_call, **static))
    want = forward(hp, wp, tp)
    got = forward(hp, wp, tp, initial_outputs=[nan(x) for x in want])
    rng = np.random.default_rng(6)
    g_lse, g_target = (jnp.asarray(rng.standard_normal(tp.shape), jnp.float32)
                       for _ in range(2))
    vectors = [want[0], g_lse, g_target]
    backward = jax.jit(functools.partial(ce_module._backward_calls, **static))
    want_grads = backward(hp, wp, tp, vectors)
    got_grads = backward(hp, wp, tp, vectors, initial_outputs=[nan(x) for x in want_grads])
    for name, g, r in zip(("lse", "target_logit", "dh", "dw"), [*got, *got_grads],
                          [*want, *want_grads]):
        assert g.shape == r.shape and np.isfinite(g).all(), name
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6, err_msg=name)


def test_backward_sweeps_of_several_blocks_equal_one_block_sweeps():
    """dh (sweeps over vocab blocks) and dw (over token blocks) do not depend on how many
    blocks a sweep adds before its read-modify-write, ragged counts and padding included."""
    tokens, d, vocab = 100, 24, 300  # 7 token blocks of 16, 10 vocab blocks of 32
    h, w, targets, _ = _inputs(tokens, d, vocab, jnp.float32, seed=7)
    rng = np.random.default_rng(8)
    lse, g_lse, g_target = (jnp.asarray(rng.standard_normal(tokens), jnp.float32)
                            for _ in range(3))

    def grads(sweep_v, sweep_t):
        blocks = ce_module._Blocks(vocab=vocab, block_t=16, block_v=32, block_d=16,
                                   interpret=True, sweep_v=sweep_v, sweep_t=sweep_t)
        return jax.jit(functools.partial(ce_module._pallas_backward, b=blocks))(
            h, w, targets, lse, g_lse, g_target)

    want = grads(1, 1)
    assert float(jnp.abs(want[0]).max()) > 0 and float(jnp.abs(want[1]).max()) > 0
    for sweeps in ((4, 3), (3, 4)):
        for g, r in zip(grads(*sweeps), want):
            _close(g, r, 1e-5)


def test_naive_impl_is_the_reference():
    h, w, targets, mask = _inputs(20, 8, 30, jnp.float32)
    got = linear_cross_entropy(h, w, targets, mask, impl="naive", z_loss=1e-3)
    want = cross_entropy(h @ w, targets, mask, 1e-3)
    for g, r in zip(got, want):
        _close(g, r, 1e-6)


def test_xla_grad_never_holds_the_logits():
    tokens, d, vocab, block_v = 2048, 64, 8192, 256
    h, w, targets, mask = _inputs(tokens, d, vocab, jnp.float32)

    def temp_bytes(impl):
        def objective(h, w):
            return linear_cross_entropy(h, w, targets, mask, impl=impl, block_v=block_v,
                                        z_loss=1e-4)[0]

        fn = jax.jit(jax.grad(objective, argnums=(0, 1)))
        return fn.lower(h, w).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = tokens * vocab * 4
    fused = temp_bytes("xla")
    assert fused < logits_bytes / 8, (fused, logits_bytes)
    assert fused < 4 * tokens * block_v * 4  # a few (tokens x block_v) blocks, no more
    assert temp_bytes("naive") >= logits_bytes  # the measure itself sees full logits


def _run_steps(small_config, loss_impl, steps=3):
    cfg = small_config(f"train.loss_impl={loss_impl}", "train.z_loss=1e-3",
                       "model.tie_embeddings=false", "train.steps=10")
    program = build_program(cfg)
    rng = np.random.default_rng(0)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    segment_ids = np.ones((b, t), np.int32)
    segment_ids[:, t - 5:] = 0  # padding at the end of every row
    local = {"inputs": rng.integers(0, 256, (b, t), dtype=np.int32),
             "targets": rng.integers(0, 256, (b, t), dtype=np.int32),
             "segment_ids": segment_ids,
             "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}
    losses = []
    # A few steps at small shapes: compiled without backend optimisation.
    options = FAST_COMPILE
    with program.context():
        key = jax.random.key(0)
        state = program.init.lower(key).compile(compiler_options=options)(key)
        batch = mesh_lib.global_batch(local, program.mesh)
        train_step = program.train_step.lower(state, batch).compile(compiler_options=options)
        for _ in range(steps):
            state, metrics = train_step(state, batch)
            losses.append(float(metrics["loss"]))
        return losses, jax.device_get(state.params)


def test_train_steps_match_naive(small_config):
    naive_losses, naive_params = _run_steps(small_config, "naive")
    xla_losses, xla_params = _run_steps(small_config, "xla")
    np.testing.assert_allclose(xla_losses, naive_losses, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(xla_params), jax.tree.leaves(naive_params)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("interpret", [True, False])
@pytest.mark.parametrize("block", ["block_t", "block_v", "block_d"])
def test_pallas_blocks_that_are_no_power_of_two_are_refused(block, interpret):
    """Triton cannot lower a block of 96: refused naming it, compiled or interpreted."""
    h, w, targets, mask = _inputs(32, 16, 100, jnp.float32)
    with pytest.raises(ValueError, match=f"{block}=96 must be a power of two"):
        linear_cross_entropy(h, w, targets, mask, impl="pallas", interpret=interpret,
                             **{block: 96})


def test_config_rejects_unknown_loss_impl(small_config):
    from efflm.errors import ConfigError

    with pytest.raises(ConfigError, match="train.loss_impl"):
        small_config("train.loss_impl=fast")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_compiled_on_gpu(dtype):
    h, w, targets, mask = _inputs(1000, 128, 5000, dtype, seed=2)
    (want, _), want_grads = _value_and_grads("reference", h.astype(jnp.float32),
                                             w.astype(jnp.float32), targets, mask, 1e-3)
    (got, _), got_grads = _value_and_grads("pallas", h, w, targets, mask, 1e-3,
                                           block_t=64, block_v=128, interpret=False)
    rtol = 2e-2 if dtype == jnp.bfloat16 else 2e-3  # TF32 dots on GPU
    _close(got, want, rtol)
    for g, r in zip(got_grads, want_grads):
        _close(g, r, 5 * rtol)


def test_lowers_to_triton_for_gpu():
    """No GPU needed: lowering for CUDA checks the forward, dh and dw kernels against
    Pallas' Triton backend."""
    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.standard_normal((512, 256)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((256, 1024)) * 0.05, jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 1024, 512), jnp.int32)
    mask = jnp.ones(512, bool)

    def loss(h, w):
        return linear_cross_entropy(h, w, targets, mask, impl="pallas", interpret=False)[0]

    text = jax.jit(jax.grad(loss, (0, 1))).trace(h, w).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("@__gpu$xla.gpu.triton(") == 3


def test_partitioned_pallas_loss_matches_under_a_mesh():
    """Per batch shard under a data x fsdp x tensor mesh: the sums and the gradients of h
    and w (added across shards) equal the unsharded reference."""
    import flax.linen as nn

    from efflm.config import load_config
    from efflm.pallas_kernels.fused_cross_entropy import partitioned_linear_cross_entropy

    cfg = load_config("tiny", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    mesh = mesh_lib.make_mesh(cfg.mesh)
    h, w, targets, mask = _inputs(12, 24, 100, jnp.float32, batch=8, seed=8)

    def objective(fn):
        def f(h, w):
            loss_sum, z_sum, count = fn(h, w)
            return loss_sum + 0.5 * z_sum, count
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(h, w)

    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.logical_rules(cfg, mesh)):
        (got, got_count), got_grads = objective(lambda h, w: partitioned_linear_cross_entropy(
            h, w, targets, mask, impl="pallas", z_loss=1e-3, block_t=16, block_v=64,
            interpret=True))
    (want, _), want_grads = _value_and_grads("reference", h, w, targets, mask, 1e-3)
    assert float(got_count) == float(np.sum(mask))
    _close(got, want, 1e-5)
    for g, r in zip(got_grads, want_grads):
        _close(g, r, 1e-5)


@pytest.mark.parametrize("impl, kernels", [("pallas", True), ("xla", False)])
def test_loss_terms_run_the_impl_they_are_given(impl, kernels):
    """train.loss_impl reaches the kernels, through the partitioning wrapper too."""
    from efflm.train.loss import linear_cross_entropy_terms

    h, w, targets, mask = _inputs(16, 8, 40, jnp.float32)
    jaxpr = jax.make_jaxpr(lambda h, w: linear_cross_entropy_terms(
        h, w, targets, mask, 0.0, impl))(h, w)
    assert ("pallas_call" in str(jaxpr)) == kernels
