"""NSA's selected-branch kernels (`pallas_kernels/selected_attention.py`) against the full
masked softmax over the same traced selection: values and gradients, packed documents,
uneven unions per query block; the tables; every output written; the CUDA lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE

from efflm.pallas_kernels.selected_attention import (
    _forward,
    _rows,
    selected_attention,
    selected_reference,
    selection_tables,
    union_blocks,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*runs in interpret mode")


def _selection(seed, batch, length, kv_heads, n, block, seg):
    """Per query: its own block, its document's first, then random earlier blocks of its
    document; fewer than n where fewer exist (the rest invalid, holding junk indices)."""
    rng = np.random.default_rng(seed)
    seg = np.asarray(seg)
    index = rng.integers(0, -(-length // block), (batch, length, kv_heads, n))
    valid = np.zeros(index.shape, bool)
    for b in range(batch):
        for p in range(length):
            first = np.flatnonzero(seg[b] == seg[b, p])[0] // block
            mine = p // block
            for g in range(kv_heads):
                rest = rng.permutation(np.arange(first + 1, mine))[:max(0, n - 2)]
                chosen = list(dict.fromkeys([mine, first, *rest]))[:n]
                index[b, p, g, :len(chosen)] = chosen
                valid[b, p, g, :len(chosen)] = True
    return jnp.asarray(index, jnp.int32), jnp.asarray(valid)


def _inputs(seed, batch, length, heads, kv_heads, dim, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, length, n, dim)), dtype)
               for n in (heads, kv_heads, kv_heads))
    # Long documents, so that queries have several blocks to pick from: row 0 holds two
    # and 5 tokens of padding, the others one each.
    seg = np.ones((batch, length), np.int64)
    seg[0, (7 * length) // 10:] = 2
    seg[0, -5:] = 0
    w = jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32)
    return q, k, v, jnp.asarray(seg, jnp.int32), w


def _value_and_grads(fn, q, k, v, w, *args, **kw):
    def f(q, k, v):
        out = fn(q, k, v, *args, **kw)
        return jnp.sum(out.astype(jnp.float32) * w), out
    return jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True),
                   compiler_options=FAST_COMPILE)(q, k, v)


def _check(q, k, v, seg, w, index, valid, block, block_q, tol, gtol):
    kw = dict(select_block=block, segment_ids=seg)
    (_, out), grads = _value_and_grads(selected_attention, q, k, v, w, index, valid,
                                       block_q=block_q, interpret=True, **kw)
    (_, ref), ref_grads = _value_and_grads(selected_reference, q, k, v, w, index, valid, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=tol,
                               atol=tol)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == q.dtype, name
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        np.testing.assert_allclose(g, r, rtol=gtol, atol=gtol * max(1.0, np.abs(r).max()),
                                   err_msg=f"d{name}")


def test_gqa_packed_ragged_with_uneven_unions():
    """100 tokens (not a block multiple), 7 blocks of 16, 3 per query, query blocks of 32
    whose unions hold 3 to 7 blocks; 4 heads on 2 K/V heads; three documents a row."""
    q, k, v, seg, w = _inputs(0, 2, 100, 4, 2, 16)
    index, valid = _selection(1, 2, 100, 2, 3, 16, seg)
    rows, length = _rows(index, valid, 32)
    counts = np.asarray(selection_tables(rows, length // 16, 32)[0][..., 0])
    assert counts.min() < counts.max() and counts.max() > 3  # uneven, some beyond n
    _check(q, k, v, seg, w, index, valid, 16, 32, 1e-5, 1e-4)


def test_bfloat16_multi_query_head_dim_24_blocks_of_32():
    """One K/V head for 3 query heads, head_dim padded 24 -> 32, select and query blocks
    of 32 over 80 tokens, 2 per query, in bfloat16."""
    q, k, v, seg, w = _inputs(2, 1, 80, 3, 1, 24, jnp.bfloat16)
    index, valid = _selection(3, 1, 80, 1, 2, 32, seg)
    _check(q, k, v, seg, w, index, valid, 32, 32, 2e-2, 5e-2)


def test_tables_hold_each_query_blocks_union_and_its_transpose():
    seg = jnp.ones((1, 64), jnp.int32)
    index, valid = _selection(6, 1, 64, 2, 2, 16, seg)
    rows, length = _rows(index, valid, 16)
    q_table, k_table = (np.asarray(t) for t in selection_tables(rows, 4, 16))
    assert q_table.shape == (1, 2, 4, 8) and k_table.shape == (1, 2, 4, 8)  # 1 + 4 -> 8
    index, valid = np.asarray(index), np.asarray(valid)
    for g in range(2):
        union = [sorted({int(i) for p in range(16 * qb, 16 * qb + 16)
                         for i in index[0, p, g][valid[0, p, g]]}) for qb in range(4)]
        for qb in range(4):
            assert q_table[0, g, qb, 0] == len(union[qb])
            assert q_table[0, g, qb, 1:1 + len(union[qb])].tolist() == union[qb]
        for kb in range(4):
            readers = [qb for qb in range(4) if kb in union[qb]]
            assert k_table[0, g, kb, :1 + len(readers)].tolist() == [len(readers), *readers]
    assert float(union_blocks(jnp.asarray(index), jnp.asarray(valid), 16, 16)) == np.mean(
        q_table[..., 0])


def test_forward_writes_every_output_element():
    """Into NaN-filled buffers, padded query rows (no selection) included: 0 and lse
    +inf there."""
    from efflm.pallas_kernels.flash_attention import CallStatics

    q, k, v, seg, _ = _inputs(7, 1, 48, 2, 1, 16)
    index, valid = _selection(8, 1, 40, 1, 2, 16, seg[:, :40])
    rows, length = _rows(index, valid, 16)
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, 48 - length), (0, 0)), constant_values=-1)
    q_table, _ = selection_tables(rows, 3, 16)
    s = CallStatics(causal=True, window=0, sm_scale=0.25, block_q=16, block_k=16, q_len=40,
                    kv_len=40, interpret=True)
    run = jax.jit(lambda *a, **kw: _forward(*a, s, **kw))
    want = run(q, k, v, None, None, rows, q_table)
    got = run(q, k, v, None, None, rows, q_table,
              initial_outputs=[jnp.full(x.shape, jnp.nan, x.dtype) for x in want])
    for name, g, w in zip(("out", "lse"), got, want):
        assert not np.isnan(np.asarray(g)).any(), name
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)
    assert np.all(np.asarray(got[0])[:, 40:] == 0) and np.all(np.isinf(got[1][:, :, 40:]))


def test_bad_arguments_are_rejected():
    q, k, v, seg, _ = _inputs(9, 1, 32, 2, 1, 16)
    index, valid = _selection(9, 1, 32, 1, 2, 16, seg)
    with pytest.raises(ValueError, match="select_block must be a power of two"):
        selected_attention(q, k, v, index, valid, select_block=8)
    with pytest.raises(ValueError, match=r"index and valid must be \(batch, length, kv_heads"):
        selected_attention(q, k, v, index[:, :16], valid[:, :16], select_block=16)


def test_lowers_to_triton_for_gpu():
    """No GPU needed: forward, dK/dV and dQ kernels lower for CUDA through Triton."""
    q, k, v, seg, _ = _inputs(10, 1, 256, 4, 2, 64, jnp.bfloat16)
    index, valid = _selection(11, 1, 256, 2, 4, 64, seg)

    def value_and_grads(q, k, v):
        out, pullback = jax.vjp(lambda q, k, v: selected_attention(
            q, k, v, index, valid, select_block=64, segment_ids=seg, interpret=False), q, k, v)
        return (out, *pullback(out))

    text = jax.jit(value_and_grads).trace(q, k, v).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("@__gpu$xla.gpu.triton(") == 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-3), (jnp.bfloat16, 3e-2)])
def test_on_gpu_against_the_reference(dtype, tol):
    """Compiled for the GPU: 1,024 tokens, blocks of 64, 8 per query, GQA 8 on 2."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a CUDA GPU")
    q, k, v, seg, w = _inputs(12, 2, 1024, 8, 2, 64, dtype)
    index, valid = _selection(13, 2, 1024, 2, 8, 64, seg)
    _check(q, k, v, seg, w, index, valid, 64, 64, tol, 2 * tol)
