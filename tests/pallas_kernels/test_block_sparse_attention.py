"""Pallas block-sparse attention against the full masked softmax: values and gradients.

The kernels run in interpret mode at small shapes on CPU; one test lowers them for CUDA.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE

from efflm.pallas_kernels import flash_attention
from efflm.pallas_kernels.block_sparse_attention import (
    _block_table,
    _visible_blocks,
    block_sparse_attention,
    power_block_mask,
    reference_block_sparse_attention,
    sliding_block_mask,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*runs in interpret mode")


def _inputs(seed, batch, length, heads, kv_heads, dim, segments, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, length, n, dim)), dtype)
               for n in (heads, kv_heads, kv_heads))
    seg = None
    if segments:
        seg = jnp.asarray(np.sort(rng.integers(1, 4, (batch, length)), axis=1), jnp.int32)
    w = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32)
    return q, k, v, seg, w


def _random_mask(seed, nq, nk, causal):
    mask = np.random.default_rng(seed).random((nq, nk)) < 0.4
    if causal:  # the diagonal (query block i, key block i) always computed
        n = min(nq, nk)
        mask[np.arange(n), np.arange(n)] = True
    return mask


def _value_and_grads(fn, q, k, v, w, **kw):
    def f(q, k, v):
        out = fn(q, k, v, **kw)
        return jnp.sum(out.astype(jnp.float32) * w), out
    # Without backend optimisation: about half the compile time, for a program run once.
    return jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True),
                   compiler_options=FAST_COMPILE)(q, k, v)


def _check(q, k, v, seg, w, mask, block_q, block_k, causal=True, tol=1e-5, gtol=1e-4,
           interpret=True):
    kw = dict(block_mask=mask, block_q=block_q, block_k=block_k, segment_ids=seg,
              causal=causal)
    (_, out), grads = _value_and_grads(block_sparse_attention, q, k, v, w,
                                       interpret=interpret, **kw)
    (_, ref), ref_grads = _value_and_grads(reference_block_sparse_attention, q, k, v, w, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert float(jnp.abs(ref).max()) > 0  # not trivially all-masked
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               rtol=tol, atol=tol)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == q.dtype, name
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert np.all(np.isfinite(g)), name
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(g, r, rtol=gtol, atol=gtol * scale, err_msg=f"d{name}")


def test_random_mask_gqa_segments_ragged():
    # 45 tokens, blocks 16: 3 x 3 blocks, the last one partial; GQA 4 heads on 2.
    q, k, v, seg, w = _inputs(0, 2, 45, 4, 2, 16, segments=True)
    _check(q, k, v, seg, w, _random_mask(1, 3, 3, True), 16, 16)


def test_random_mask_unequal_blocks_mqa_dim24():
    q, k, v, _, w = _inputs(1, 1, 70, 4, 1, 24, segments=False)
    mask = _random_mask(2, 5, 3, True)  # block_q 16 -> 5 query blocks, block_k 32 -> 3
    _check(q, k, v, None, w, mask, 16, 32)


def test_random_mask_noncausal_with_empty_rows():
    q, k, v, _, w = _inputs(2, 1, 64, 2, 2, 16, segments=False)
    mask = _random_mask(3, 4, 4, False)
    mask[2] = False  # query block 2 computes nothing: its output and gradients are 0
    _check(q, k, v, None, w, mask, 16, 16, causal=False)
    out = block_sparse_attention(q, k, v, mask, block_q=16, block_k=16, causal=False)
    assert np.all(np.asarray(out[:, 32:48]) == 0)


def test_sliding_and_power_masks():
    q, k, v, seg, w = _inputs(3, 1, 100, 2, 1, 16, segments=True)
    sliding = sliding_block_mask(100, block_q=16, block_k=16, window_blocks=2)
    power = power_block_mask(100, block_q=16, block_k=16)
    assert sliding.shape == power.shape == (7, 7)
    # Query block 6: sliding sees blocks 5, 6; power sees 6 - {0, 1, 2, 4} = 6, 5, 4, 2.
    assert np.flatnonzero(sliding[6]).tolist() == [5, 6]
    assert np.flatnonzero(power[6]).tolist() == [2, 4, 5, 6]
    assert np.flatnonzero(power[0]).tolist() == [0]
    _check(q, k, v, None, w, sliding, 16, 16)
    _check(q, k, v, seg, w, power, 16, 16)


def test_block_tables_list_only_visible_blocks():
    mask = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]], bool)
    visible = _visible_blocks(mask, 48, 48, 16, 16, causal=True)  # drops (0, 1), (1, 2)
    table = _block_table(visible)
    assert table.shape == (3, 4)  # width: next power of two above the max count + 1
    assert table[:, 0].tolist() == [1, 1, 2]
    assert table[2, 1:3].tolist() == [0, 2]
    assert _block_table(visible.T)[:, 0].tolist() == [2, 1, 1]


def test_dense_causal_mask_equals_flash_attention():
    q, k, v, seg, w = _inputs(4, 1, 40, 4, 2, 16, segments=True)
    mask = np.ones((3, 3), bool)
    kw = dict(block_q=16, block_k=16, segment_ids=seg, interpret=True)
    (_, out), grads = _value_and_grads(
        lambda q, k, v, **a: block_sparse_attention(q, k, v, mask, **a), q, k, v, w, **kw)
    (_, ref), ref_grads = _value_and_grads(flash_attention, q, k, v, w, **kw)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_bfloat16():
    q, k, v, seg, w = _inputs(5, 1, 48, 2, 1, 32, segments=True, dtype=jnp.bfloat16)
    _check(q, k, v, seg, w, power_block_mask(48, block_q=16, block_k=16), 16, 16,
           tol=2e-2, gtol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-3), (jnp.bfloat16, 3e-2)])
def test_compiled_on_gpu(dtype, tol):
    """Compiled for the GPU: 1,000 tokens (the last block partial), blocks of 64, a random
    causal mask and a power mask, GQA 8 on 2, packed segments."""
    q, k, v, seg, w = _inputs(7, 2, 1000, 8, 2, 64, segments=True, dtype=dtype)
    _check(q, k, v, seg, w, _random_mask(8, 16, 16, True), 64, 64, tol=tol, gtol=2 * tol,
           interpret=False)
    _check(q, k, v, None, w, power_block_mask(1000, block_q=64, block_k=64), 64, 64, tol=tol,
           gtol=2 * tol, interpret=False)


def test_bad_arguments_are_rejected():
    q, k, v, _, _ = _inputs(6, 1, 32, 2, 1, 16, segments=False)
    with pytest.raises(ValueError, match="block_mask has shape"):
        block_sparse_attention(q, k, v, np.ones((3, 2), bool), block_q=16, block_k=16)
    with pytest.raises(ValueError, match="power of two"):
        block_sparse_attention(q, k, v, np.ones((2, 2), bool), block_q=24, block_k=16)


def test_lowers_to_triton_for_gpu():
    """No GPU needed: forward, dK/dV and dQ kernels lower for CUDA through Triton."""
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.standard_normal((1, 256, 4, 64)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((1, 256, 2, 64)), jnp.bfloat16) for _ in range(2))
    seg = jnp.ones((1, 256), jnp.int32)
    mask = power_block_mask(256, block_q=64, block_k=64)

    def value_and_grads(q, k, v):
        out, pullback = jax.vjp(
            lambda q, k, v: block_sparse_attention(q, k, v, mask, block_q=64, block_k=64,
                                                   segment_ids=seg, interpret=False),
            q, k, v)
        return (out, *pullback(out))

    text = jax.jit(value_and_grads).trace(q, k, v).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("@__gpu$xla.gpu.triton(") == 3


def test_forward_writes_every_output_element():
    """Into NaN-filled buffers: every row is written, including a query block whose key
    list is empty (output 0, lse +inf)."""
    from efflm.pallas_kernels.block_sparse_attention import _forward
    from efflm.pallas_kernels.flash_attention import CallStatics

    q, k, v, _, _ = _inputs(5, 2, 48, 4, 2, 16, segments=False)
    mask = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 1]], bool)  # block row 1 sees nothing
    visible = _visible_blocks(mask, 48, 48, 16, 16, causal=True)
    table = jnp.asarray(_block_table(visible))
    assert int(table[1, 0]) == 0
    s = CallStatics(causal=True, window=0, sm_scale=0.25, block_q=16, block_k=16, q_len=48,
                kv_len=48, interpret=True)
    run = jax.jit(lambda *a, **kw: _forward(*a, s, **kw))
    want = run(q, k, v, None, None, table)
    got = run(q, k, v, None, None, table,
              initial_outputs=[jnp.full(x.shape, jnp.nan, x.dtype) for x in want])
    for name, g, w in zip(("out", "lse"), got, want):
        assert not np.isnan(np.asarray(g)).any(), name
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)
    assert np.all(np.asarray(got[0])[:, 16:32] == 0) and np.all(np.isinf(got[1][:, :, 16:32]))
