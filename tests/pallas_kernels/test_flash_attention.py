"""Pallas flash attention against the full masked softmax: values, lse and gradients.

On CPU the kernels run in interpret mode at small shapes; the `gpu` tests run the same
checks compiled at larger shapes.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fast_jit

from efflm.errors import ConfigError
from efflm.models import LM
from efflm.pallas_kernels import flash_attention, reference_attention
from efflm.pallas_kernels.flash_attention import (
    CallStatics,
    _forward,
    _key_block_range,
    _padded,
    _query_block_range,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*runs in interpret mode")




def _make(seed, batch, length, heads, kv_heads, dim, dtype, segments, kv_length=None):
    rng = np.random.default_rng(seed)
    kv_length = length if kv_length is None else kv_length
    q, k, v = (jnp.asarray(rng.standard_normal((batch, n_len, n, dim)), dtype)
               for n_len, n in ((length, heads), (kv_length, kv_heads), (kv_length, kv_heads)))
    seg = None
    if segments:  # packed sequences: sorted ids, a few segments per row
        seg = jnp.asarray(np.sort(rng.integers(1, 4, (batch, length)), axis=1), jnp.int32)
    w_out = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal((batch, heads, length)), jnp.float32)
    return q, k, v, seg, w_out, w_lse


def _check(length, heads, kv_heads, dim, block_q, block_k, causal, window, segments,
           dtype, interpret, batch=2, seed=0, kv_length=None):
    q, k, v, seg, w_out, w_lse = _make(seed, batch, length, heads, kv_heads, dim, dtype,
                                       segments, kv_length)
    kw = dict(segment_ids=seg, causal=causal, window=window, block_q=block_q,
              block_k=block_k, return_lse=True)

    def loss(fn):  # one compiled program per implementation: outputs and gradients
        def f(q, k, v):
            out, lse = fn(q, k, v, interpret=interpret, **kw)
            finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # rows that see no key: +inf
            value = jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(finite_lse * w_lse)
            return value, (out, lse)
        return fast_jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(q, k, v)

    (_, (out, lse)), grads = loss(flash_attention)
    (_, (ref_out, ref_lse)), ref_grads = loss(reference_attention)
    # On a GPU, Triton's float32 dots may run in TF32: looser there.
    tol = (1e-5 if interpret else 5e-3) if dtype == jnp.float32 else 2e-2
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == (batch, heads, length)
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(lse, ref_lse, rtol=tol, atol=tol)
    gtol = (1e-4 if interpret else 1e-2) if dtype == jnp.float32 else 5e-2
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype, name
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(g, r, rtol=gtol, atol=gtol * scale, err_msg=f"d{name}")


CASES = {
    # length, heads, kv_heads, dim, block_q, block_k, causal, window, segments
    "causal": (40, 4, 4, 16, 16, 16, True, 0, False),
    "noncausal_gqa_segments": (48, 4, 2, 32, 16, 32, False, 0, True),
    "mqa_window_ragged": (50, 4, 1, 16, 32, 16, True, 12, False),
    "gqa_segments_ragged": (45, 4, 2, 16, 16, 16, True, 0, True),
    "window_segments_dim24": (45, 2, 1, 24, 32, 16, True, 20, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_float32(case):
    _check(*CASES[case], dtype=jnp.float32, interpret=True)


def test_matches_reference_bfloat16():
    _check(*CASES["gqa_segments_ragged"], dtype=jnp.bfloat16, interpret=True, batch=1)


# Queries and keys of different lengths: queries are the last positions of the sequence.
LENGTH_CASES = {
    # length, kv_length, heads, kv_heads, dim, block_q, block_k, causal, window
    "prefill_after_cache": (24, 56, 4, 2, 16, 16, 16, True, 0),
    "short_queries_window": (20, 50, 2, 1, 16, 16, 32, True, 12),
    "decode_one_query_window": (1, 40, 4, 1, 16, 16, 16, True, 12),
    "noncausal_short_queries": (24, 40, 2, 2, 16, 16, 16, False, 0),
    "more_queries_causal": (40, 24, 2, 1, 16, 16, 16, True, 0),
    "more_queries_window": (64, 16, 2, 2, 16, 16, 16, True, 8),
}


def _check_lengths(length, kv_length, heads, kv_heads, dim, block_q, block_k, causal,
                   window, dtype, batch=2):
    _check(length, heads, kv_heads, dim, block_q, block_k, causal, window, False, dtype,
           interpret=True, batch=batch, kv_length=kv_length)


@pytest.mark.parametrize("case", list(LENGTH_CASES))
def test_query_and_key_lengths_differ_float32(case):
    _check_lengths(*LENGTH_CASES[case], dtype=jnp.float32)


def test_query_and_key_lengths_differ_bfloat16():
    _check_lengths(*LENGTH_CASES["more_queries_window"], dtype=jnp.bfloat16, batch=1)


def test_reference_aligns_queries_to_the_last_keys():
    """Query i of a short block is position i + kv_len - q_len: it sees what the same
    position sees in the full sequence, so the block's rows equal the full rows."""
    q, k, v, _, _, _ = _make(6, 1, 40, 2, 1, 16, jnp.float32, False)
    reference = fast_jit(functools.partial(reference_attention, window=7, return_lse=True))
    full, full_lse = reference(q, k, v)
    tail, tail_lse = reference(q[:, 30:], k, v)
    np.testing.assert_allclose(tail, full[:, 30:], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tail_lse, full_lse[:, :, 30:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", [reference_attention, flash_attention],
                         ids=["reference", "kernel"])
def test_rows_that_see_no_key_are_zero_with_infinite_lse_and_no_gradient(impl):
    """128 queries on 32 keys: queries 0..95 sit at negative positions and see no key."""
    q, k, v, _, w_out, _ = _make(8, 1, 128, 2, 1, 16, jnp.float32, False, kv_length=32)
    w_out = w_out[:, :128]

    def f(q, k, v):
        out, lse = impl(q, k, v, window=16, block_q=32, block_k=16, return_lse=True)
        return jnp.sum(out * w_out), (out, lse)

    (_, (out, lse)), (dq, dk, dv) = fast_jit(
        jax.value_and_grad(f, (0, 1, 2), has_aux=True))(q, k, v)
    assert np.all(np.asarray(out[:, :96]) == 0) and np.all(np.isinf(lse[:, :, :96]))
    assert np.all(np.asarray(lse[:, :, :96]) > 0)
    assert np.all(np.isfinite(lse[:, :, 96:])) and np.all(np.abs(out[:, 96:]).sum(-1) > 0)
    assert np.all(np.asarray(dq[:, :96]) == 0) and np.any(np.asarray(dq[:, 96:]) != 0)
    assert np.all(np.isfinite(dk)) and np.all(np.isfinite(dv))


def test_lse_is_logsumexp_of_scores():
    q, k, v, seg, _, _ = _make(3, 1, 40, 4, 2, 16, jnp.float32, True)
    _, lse = flash_attention(q, k, v, segment_ids=seg, block_q=16, block_k=16,
                             return_lse=True)
    scores = jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, 2, axis=2)) * 16 ** -0.5
    t = jnp.arange(40)
    mask = (t[:, None] >= t[None, :]) & (seg[:, :, None] == seg[:, None, :])[:, None]
    expected = jax.nn.logsumexp(jnp.where(mask, scores, -jnp.inf), axis=-1)
    np.testing.assert_allclose(lse, expected, rtol=1e-5, atol=1e-5)


def test_every_output_position_is_written():
    """The kernel writes into NaN-filled buffers: no NaN may survive, padding included."""
    q, k, v, seg, _, _ = _make(4, 1, 40, 4, 2, 24, jnp.float32, True)
    (qp, kp, vp, segp), s = _padded(q, k, v, seg, None, True, 8, None, 16, 16, True)
    assert qp.shape[1] > 40 and qp.shape[3] > 24  # padding is exercised
    nan_out = jnp.full(qp.shape, jnp.nan, qp.dtype)
    nan_lse = jnp.full((1, 4, qp.shape[1]), jnp.nan, jnp.float32)
    out, lse = fast_jit(lambda *a: _forward(*a, s, initial_outputs=(nan_out, nan_lse)))(
        qp, kp, vp, segp)
    # Padded query rows see no key: lse +inf there, but nothing is left unwritten.
    assert np.all(np.isfinite(out)) and not np.any(np.isnan(lse))
    ref = reference_attention(q, k, v, segment_ids=seg, window=8)
    np.testing.assert_allclose(out[:, :40, :, :24], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal, window, block_q, block_k, q_len, kv_len",
                         [(True, 0, 16, 16, 96, 96), (True, 0, 16, 32, 96, 96),
                          (True, 0, 32, 16, 96, 96), (True, 5, 16, 16, 96, 96),
                          (True, 40, 32, 16, 96, 96), (True, 17, 16, 32, 96, 96),
                          (False, 0, 16, 16, 96, 96), (True, 0, 16, 16, 32, 96),
                          (True, 12, 16, 32, 32, 128), (True, 0, 16, 16, 96, 32),
                          (True, 8, 32, 16, 128, 32)])
def test_loop_bounds_visit_exactly_the_visible_blocks(causal, window, block_q, block_k,
                                                      q_len, kv_len):
    """Forward and dQ skip key blocks (dK/dV skip query blocks) that are fully masked;
    a block that sees nothing gets an empty range."""
    s = CallStatics(causal=causal, window=window, sm_scale=1.0, block_q=block_q,
                block_k=block_k, q_len=q_len, kv_len=kv_len, interpret=True,
                q_offset=kv_len - q_len)
    i = np.arange(q_len)[:, None] + kv_len - q_len
    j = np.arange(kv_len)[None, :]
    visible = np.ones((q_len, kv_len), bool)
    if causal:
        visible &= i >= j
    if window:
        visible &= i - j < window
    nq, nk = q_len // block_q, kv_len // block_k
    blocks = visible.reshape(nq, block_q, nk, block_k).any(axis=(1, 3))

    def visited(lo, hi, n):
        return [b for b in range(n) if int(lo) <= b < int(hi)]

    for qb in range(nq):
        lo, hi = _key_block_range(s, jnp.int32(qb), nk)
        assert visited(lo, hi, nk) == list(np.flatnonzero(blocks[qb])), qb
    for kb in range(nk):
        lo, hi = _query_block_range(s, jnp.int32(kb), nq)
        assert visited(lo, hi, nq) == list(np.flatnonzero(blocks[:, kb])), kb


def _model_inputs(cfg):
    rng = np.random.default_rng(0)
    b, t = 2, cfg.data.seq_len
    tokens = rng.integers(0, 256, (b, t)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2 + 3:] = 2
    pos = np.concatenate([np.arange(t // 2 + 3), np.arange(t - t // 2 - 3)])
    return tokens, np.broadcast_to(pos, (b, t)).astype(np.int32), seg


def test_model_with_pallas_attention_matches_xla(small_config):
    common = ("model.attention.num_kv_heads=2", "model.num_layers=1")
    xla_cfg = small_config("model.attention.impl=xla", *common)
    pallas_cfg = small_config("model.attention.impl=pallas", *common)
    tokens, pos, seg = _model_inputs(xla_cfg)
    xla_model, pallas_model = LM(xla_cfg.model), LM(pallas_cfg.model)
    params = fast_jit(xla_model.init)(jax.random.key(0), tokens)["params"]

    jaxpr = str(jax.make_jaxpr(lambda p: pallas_model.apply({"params": p}, tokens, pos, seg))(
        params))
    assert "pallas_call" in jaxpr  # the switch really selects the kernel

    def logits(model):  # the kernel's gradients are checked above, at kernel level
        return fast_jit(lambda p: model.apply({"params": p}, tokens, pos, seg))(params)

    np.testing.assert_allclose(logits(pallas_model), logits(xla_model), rtol=1e-5, atol=1e-5)


def test_pallas_with_unsupported_head_dim_is_a_config_error(small_config):
    cfg = small_config("model.attention.impl=pallas", "model.attention.head_dim=24")
    tokens, _, _ = _model_inputs(cfg)
    with pytest.raises(ConfigError, match="head_dim 24.*impl=xla"):
        LM(cfg.model).init(jax.random.key(0), tokens)


def test_auto_falls_back_to_xla_for_unsupported_head_dim(small_config, monkeypatch):
    """Under auto on a GPU an unsupported head_dim warns once and runs the XLA path."""
    cfg = small_config("model.attention.head_dim=24")
    tokens, pos, seg = _model_inputs(cfg)
    params = fast_jit(LM(cfg.model).init)(jax.random.key(0), tokens)["params"]
    expected = fast_jit(LM(small_config("model.attention.impl=xla",
                                    "model.attention.head_dim=24").model).apply)(
        {"params": params}, tokens, pos, seg)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.warns(UserWarning, match="head_dim 24.*using impl=xla"):
        got = fast_jit(LM(cfg.model).apply)({"params": params}, tokens, pos, seg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        jax.eval_shape(LM(cfg.model).apply, {"params": params}, tokens, pos, seg)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def _check_blocks(dtype, interpret, half=24, dim=16):
    from efflm.pallas_kernels.flash_attention import (
        flash_attention_block,
        flash_attention_block_grads,
    )

    rng = np.random.default_rng(11)
    h2 = 2 * half
    q = jnp.asarray(rng.standard_normal((2, half, 4, dim)), dtype)
    w = jnp.asarray(rng.standard_normal((2, half, 4, dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, h2, 2, dim)), dtype) for _ in range(2))
    starts = (10 * half // 24, 30 * half // 24)  # document 3 starts 6/24 into the queries
    seg = jnp.asarray([[1] * starts[0] + [2] * (starts[1] - starts[0])
                       + [3] * (h2 - starts[1]), [1] * h2], jnp.int32)
    kw = dict(block_q=16, block_k=16, interpret=interpret)
    halves = [(slice(0, half), False), (slice(half, h2), True)]

    def whole(q, k, v):
        out, lse = reference_attention(q, k, v, segment_ids=seg[:, half:], kv_segment_ids=seg,
                                       return_lse=True)
        return jnp.sum(out * w), (out, lse)

    (_, (want, want_lse)), want_grads = jax.value_and_grad(whole, (0, 1, 2), has_aux=True)(
        q, k, v)

    def blocks(q, k, v):
        parts = [flash_attention_block(q, k[:, keys], v[:, keys], seg[:, half:], seg[:, keys],
                                       causal=causal, **kw) for keys, causal in halves]
        (o1, l1), (o2, l2) = parts
        lse = jnp.logaddexp(l1, l2)
        scale = lambda part: jnp.exp(part - lse).transpose(0, 2, 1)[..., None]
        out = o1 * scale(l1) + o2 * scale(l2)
        delta = jnp.einsum("bthd,bthd->bht", w, out)
        shares = [flash_attention_block_grads(q, k[:, keys], v[:, keys], seg[:, half:],
                                              seg[:, keys], w, lse, delta, causal=causal,
                                              **kw) for keys, causal in halves]
        (dq1, dk1, dv1), (dq2, dk2, dv2) = shares
        return (out, lse, l1, dq1 + dq2, jnp.concatenate([dk1, dk2], 1),
                jnp.concatenate([dv1, dv2], 1))

    def whole_kernel(q, k, v):  # flash_attention itself with separate key ids
        out = flash_attention(q, k, v, segment_ids=seg[:, half:], kv_segment_ids=seg, **kw)
        return jnp.sum(out * w), out

    (_, got), got_grads = fast_jit(jax.value_and_grad(whole_kernel, (0, 1, 2),
                                                      has_aux=True))(q, k, v)
    tol = (1e-5 if interpret else 5e-3) if dtype == jnp.float32 else 2e-2
    gtol = 10 * tol if dtype == jnp.float32 else 5e-2

    def close(a, b, tol, name=""):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())),
                                   err_msg=name)

    close(got, want, tol)
    for name, g, r in zip("qkv", got_grads, want_grads):
        close(g, r, gtol, f"d{name}")
    out, lse, first_lse, *grads = fast_jit(blocks)(q, k, v)
    assert out.dtype == jnp.float32 and grads[0].dtype == jnp.float32
    first_doc3 = starts[1] - half
    assert np.all(np.asarray(first_lse)[0, :, first_doc3:] == -np.inf)
    assert np.all(np.isfinite(np.asarray(first_lse)[0, :, :first_doc3]))
    close(out, want, tol)
    close(lse, want_lse, tol)
    for name, g, r in zip("qkv", grads, want_grads):
        close(g, r, gtol, f"d{name}")


def test_blocks_merge_to_the_whole_attention():
    """Queries 24..47 against an earlier key block (0..23, no causal mask) and their own
    (24..47, causal), separate query and key ids, a document starting inside the second
    block (its rows see no key in the first): `flash_attention` with `kv_segment_ids`
    equals the whole attention, values and gradients; so do `flash_attention_block`
    outputs merged by log-sum-exp, and `flash_attention_block_grads` with the whole lse
    and delta sum to its gradients."""
    _check_blocks(jnp.float32, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_blocks_merge_to_the_whole_attention_on_gpu(dtype):
    _check_blocks(dtype, interpret=False, half=384, dim=64)


def test_bad_arguments_are_rejected():
    q, k, v, seg, _, _ = _make(5, 1, 16, 3, 2, 16, jnp.float32, False)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        flash_attention(q, k, v)
    q, k, v, _, _, _ = _make(5, 1, 16, 2, 1, 16, jnp.float32, False)
    with pytest.raises(ValueError, match="causal"):
        flash_attention(q, k, v, causal=False, window=4)
    with pytest.raises(ValueError, match="kv_segment_ids"):
        flash_attention(q, k, v, kv_segment_ids=jnp.ones((1, 16), jnp.int32))


# Compiled (Triton) on a GPU, at larger shapes.

GPU_CASES = {
    "causal": (1024, 8, 8, 64, 64, 64, True, 0, False),
    "noncausal_gqa": (512, 8, 2, 128, 64, 64, False, 0, False),
    "window_ragged": (1000, 8, 2, 64, 64, 32, True, 256, False),
    "segments_ragged": (777, 8, 4, 64, 64, 64, True, 0, True),
    "dim80_segments_window": (600, 4, 1, 80, 32, 64, True, 100, True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_compiled_matches_reference_on_gpu(case, dtype):
    _check(*GPU_CASES[case], dtype=dtype, interpret=False)


def test_lowers_to_triton_for_gpu():
    """No GPU needed: lowering for CUDA checks that forward and backward kernels use
    only what Pallas' Triton backend supports, at GPU-sized blocks."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, 256, 4, 64)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((1, 256, 2, 64)), jnp.bfloat16) for _ in range(2))
    seg = jnp.ones((1, 256), jnp.int32)

    def value_and_grads(q, k, v):
        out, pullback = jax.vjp(
            lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, interpret=False), q, k, v)
        return (out, *pullback(out))

    text = jax.jit(value_and_grads).trace(q, k, v).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("@__gpu$xla.gpu.triton(") == 3


def _pallas_operand_shapes(jaxpr):
    """Shapes of the first operand of every pallas_call, in nested jaxprs too."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn.invars[0].aval.shape)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                found += _pallas_operand_shapes(inner)
    return found


@pytest.mark.parametrize("kv_heads, head_shards", [(4, 2), (1, 1)])
def test_partitioned_runs_the_kernel_per_shard(kv_heads, head_shards):
    """Under a data x fsdp x tensor mesh each device's kernel sees its batch shard, and
    its heads shard when K/V heads split alike; values equal the reference."""
    import flax.linen as nn

    from efflm import mesh as mesh_lib
    from efflm.config import load_config
    from efflm.pallas_kernels.flash_attention import partitioned_flash_attention

    cfg = load_config("tiny", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                               "model.attention.num_heads=4",
                               f"model.attention.num_kv_heads={kv_heads}"])
    mesh = mesh_lib.make_mesh(cfg.mesh)
    q, k, v, seg, _, _ = _make(7, 8, 40, 4, kv_heads, 16, jnp.float32, segments=True)

    def fn(q, k, v, seg):
        return partitioned_flash_attention(q, k, v, seg, block_q=16, block_k=16,
                                           interpret=True)

    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.logical_rules(cfg, mesh)):
        shapes = _pallas_operand_shapes(jax.make_jaxpr(fn)(q, k, v, seg).jaxpr)
        out = fast_jit(fn)(q, k, v, seg)
    assert shapes and all(s[0] == 8 // 4 and s[2] == 4 // head_shards for s in shapes)
    want = reference_attention(q, k, v, segment_ids=seg)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_a_tile_skips_its_mask_exactly_when_no_score_is_masked():
    """`tile_is_full` against the mask written out, over tiles on and off the diagonal,
    the window's edge, padded keys, segment boundaries and unread rows."""
    from efflm.pallas_kernels.flash_attention import CallStatics, tile_is_full

    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        causal, window = bool(rng.integers(2)), int(rng.choice([0, 24, 40]))
        s = CallStatics(causal=causal or bool(window), window=window, sm_scale=1.0,
                        block_q=16, block_k=16, q_len=64, kv_len=int(rng.choice([64, 60])),
                        interpret=True, q_offset=int(rng.choice([0, 16])))
        q_first, k_first = (16 * int(rng.integers(4)) for _ in range(2))
        q_seg = k_seg = rows = None
        if rng.integers(2):
            q_seg, k_seg = (jnp.asarray(rng.choice([1, 1, 1, 2], 16) if rng.integers(2)
                                        else np.full(16, 1)) for _ in range(2))
        if rng.integers(3) == 0:
            rows = jnp.asarray(rng.random(16) < 0.9)
        q_idx = q_first + s.q_offset + np.arange(16)[:, None]
        k_idx = k_first + np.arange(16)[None, :]
        mask = np.ones((16, 16), bool)
        if s.causal:
            mask &= q_idx >= k_idx
        if s.window:
            mask &= q_idx - k_idx < s.window
        mask &= k_idx < s.kv_len
        if q_seg is not None:
            mask &= np.asarray(q_seg)[:, None] == np.asarray(k_seg)[None, :]
        if rows is not None:
            mask &= np.asarray(rows)[:, None]
        full = bool(tile_is_full(s, q_first, k_first, q_seg, k_seg, rows))
        assert full == mask.all(), (s, q_first, k_first)
        seen.add(full)
    assert seen == {True, False}
