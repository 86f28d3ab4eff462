"""Softmax attention (`layers/attention/softmax.py`): grouped-query heads and the blocked
causal form against a per-query reference, and the blocked path inside a model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fast_jit, two_segment_inputs

from efflm.layers.attention.softmax import (
    attention_mask,
    blocked_causal_attention,
    dot_product_attention,
)
from efflm.models import LM


def naive_attention(q, k, v, segment_ids):
    """One head and one query at a time: the obviously-correct reference."""
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros(q.shape, np.float64)
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                keys = [j for j in range(i + 1) if segment_ids[bi, j] == segment_ids[bi, i]]
                s = np.array([q[bi, i, hi] @ k[bi, j, hi // group] for j in keys]) / np.sqrt(d)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, i, hi] = sum(pj * v[bi, j, hi // group] for pj, j in zip(p, keys))
    return out


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_grouped_query_attention_matches_naive(heads, kv_heads):
    rng = np.random.default_rng(0)
    b, t, d = 2, 7, 8
    q = rng.standard_normal((b, t, heads, d)).astype(np.float32)
    k = rng.standard_normal((b, t, kv_heads, d)).astype(np.float32)
    v = rng.standard_normal((b, t, kv_heads, d)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]], np.int32)
    got = dot_product_attention(q, k, v, attention_mask(jnp.asarray(seg), t))
    np.testing.assert_allclose(got, naive_attention(q, k, v, seg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t, block, kv_heads", [(64, 16, 2), (50, 16, 4), (32, 32, 1)])
def test_blocked_causal_attention_matches_full(t, block, kv_heads):
    """Values and gradients, with packed segments, lengths not a multiple of the block."""
    rng = np.random.default_rng(1)
    b, h, d = 2, 4, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, d)), jnp.float32)
               for n in (h, kv_heads, kv_heads))
    seg = np.sort(rng.integers(0, 4, (b, t)), axis=1).astype(np.int32)
    seg = jnp.asarray(seg)
    w = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)

    def full(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, attention_mask(seg, t)) * w)

    def blocked(q, k, v):
        return jnp.sum(blocked_causal_attention(q, k, v, seg, block) * w)

    def values_and_grads(q, k, v):
        return ((blocked_causal_attention(q, k, v, seg, block),
                 dot_product_attention(q, k, v, attention_mask(seg, t))),
                jax.grad(blocked, (0, 1, 2))(q, k, v), jax.grad(full, (0, 1, 2))(q, k, v))

    (got, want), grads, ref_grads = fast_jit(values_and_grads)(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, ref_grads):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)


def test_blocked_attention_path_gives_the_same_model(small_config):
    cfg = small_config("model.attention.softmax.block_size=0")
    tokens, pos, seg = two_segment_inputs(cfg)
    model = LM(cfg.model)
    params = fast_jit(model.init)(jax.random.key(0), tokens)["params"]
    blocked = LM(small_config("model.attention.softmax.block_size=8").model)
    np.testing.assert_allclose(fast_jit(blocked.apply)({"params": params}, tokens, pos, seg),
                               fast_jit(model.apply)({"params": params}, tokens, pos, seg),
                               rtol=1e-5, atol=1e-5)
