"""MXFP4 (`layers/quant/mxfp4.py`): the block scales' rule, saturation, NaN and zeros;
rounding to nearest and stochastically (unbiased); the Hadamard transforms; the
matmul's forward against its dequantised operands and its backward, unbiased over the
step keys; the packed export form."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflm.layers.quant.mxfp4 import (
    DEFAULT,
    E2M1,
    Mxfp4,
    dequantize_blocks,
    hadamard,
    hadamard_matrix,
    mxfp4_matmul,
    quantize_blocks,
    round_stochastic,
    scale_ceil,
    scale_floor,
)

GRID = np.concatenate([-E2M1[::-1], E2M1])


def _round_trip(x, threshold, **kw):
    q, s = quantize_blocks(jnp.asarray(x, jnp.float32), 1, threshold, **kw)
    return np.asarray(q), np.asarray(s), np.asarray(dequantize_blocks(q, s, 1))


def test_block_scales_follow_the_floor_rule_and_saturate_at_six():
    """Scale 2^(floor(log2 amax) - 2), exact at powers of two; a block max of 7.9 * 2^k
    saturates to 6 * 2^k; values below lie within half a grid step of the value."""
    assert np.asarray(scale_floor(jnp.array([4.0, 7.99, 8.0, 0.3, 0.0]))).tolist() == [
        1.0, 1.0, 2.0, 2.0 ** -4, 1.0]
    assert np.asarray(scale_ceil(jnp.array([6.0, 6.01, 3.0, 0.0]))).tolist() == [
        1.0, 2.0, 0.5, 1.0]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 64)).astype(np.float32)
    x[0, 3] = 7.9 * 2.0 ** -3  # block 0 of row 0: amax 0.9875 -> scale 2^-3
    x[0, :32] = np.clip(x[0, :32], -0.98, 0.98)
    x[0, 3] = 7.9 * 2.0 ** -3
    q, s, back = _round_trip(x, "amax")
    assert s[0, 0] == 2.0 ** -3 and back[0, 3] == 6 * 2.0 ** -3
    assert set(np.unique(q)) <= set(GRID.tolist())
    scaled = np.abs(x) / np.repeat(s, 32, axis=1)
    step = np.where(scaled < 2, 0.5, np.where(scaled < 4, 1.0, 2.0))
    inside = scaled <= 6
    assert np.all(np.abs(back - x)[inside] <= (step / 2 * np.repeat(s, 32, 1))[inside] + 1e-7)


def test_nan_blocks_stay_nan_and_zero_blocks_are_zero():
    x = np.ones((1, 96), np.float32)
    x[0, 40] = np.nan
    x[0, 64:] = 0.0
    _, s, back = _round_trip(x, "rms", clip=2.8)
    assert np.isnan(back[0, 32:64]).all() and not np.isnan(back[0, :32]).any()
    assert (back[0, 64:] == 0).all() and s[0, 2] == 1.0


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    v = jnp.asarray(np.linspace(-6, 6, 97, dtype=np.float32))
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.vmap(lambda k: round_stochastic(v, k))(keys))
    assert set(np.unique(draws)) <= set(GRID.tolist())
    lower = np.asarray([GRID[GRID <= a].max() for a in np.asarray(v)])
    upper = np.asarray([GRID[GRID >= a].min() for a in np.asarray(v)])
    assert np.all((draws == lower) | (draws == upper))
    # Each mean within 4 standard errors of the value (the gap is at most 2).
    assert np.all(np.abs(draws.mean(0) - np.asarray(v)) <= 4 * 1.0 / np.sqrt(len(keys)))


def test_hadamard_is_orthogonal_and_undone():
    h = np.asarray(hadamard_matrix())
    np.testing.assert_allclose(h @ h.T, np.eye(32), atol=1e-6)
    x = jax.random.normal(jax.random.key(1), (5, 64))
    np.testing.assert_allclose(hadamard(hadamard(x, 1), 1), x, atol=1e-5)
    signs = jnp.where(jax.random.bernoulli(jax.random.key(2), 0.5, (64,)), 1.0, -1.0)
    np.testing.assert_allclose(hadamard(hadamard(x.T, 0, signs), 0) * signs[:, None], x.T,
                               atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(hadamard(x, 1, signs)), jnp.linalg.norm(x),
                               rtol=1e-5)


def test_quest_clipping_lowers_the_error_on_gaussian_blocks():
    """RMS clipping at 2.8 (after the transform) beats the amax rule's round trip, and
    2.8 is near the minimum of the error over the clipping threshold."""
    x = jax.random.normal(jax.random.key(3), (512, 256))

    def error(threshold, clip=2.8):
        q, s = quantize_blocks(x, 1, threshold, clip)
        return float(jnp.mean((dequantize_blocks(q, s, 1) - x) ** 2))

    assert error("rms") < 0.99 * error("amax")  # 3% lower here
    assert error("rms") < min(error("rms", 2.3), error("rms", 3.5))


@pytest.mark.parametrize("forward", ["quest", "rtn"])
def test_the_forward_multiplies_the_dequantised_operands(forward):
    """The product equals that of `fake_quantize`'s operands (in the original basis),
    within about a 4-bit format's error of the float product."""
    s = dataclasses.replace(DEFAULT, forward=forward)
    quant = type("Q", (), {"mxfp4": s})
    x = jax.random.normal(jax.random.key(4), (64, 128))
    w = jax.random.normal(jax.random.key(5), (128, 96)) / 10
    y = mxfp4_matmul(s, x, w, jax.random.key(0))
    xd, wd = Mxfp4.fake_quantize(None, quant, x, w)
    np.testing.assert_allclose(y, xd @ wd, rtol=1e-5, atol=1e-5)
    rel = float(jnp.linalg.norm(y - x @ w) / jnp.linalg.norm(x @ w))
    assert 0.01 < rel < 0.2, rel


def test_the_backward_is_an_unbiased_estimate_over_the_step_keys():
    """With stochastic rounding and the randomised transform, dx and dw averaged over
    128 keys approach g @ w^T and x^T @ g; with both off, one key gives the products
    of round-to-nearest operands, as much off the exact one as rounding is."""
    x = jax.random.normal(jax.random.key(6), (32, 64))
    w = jax.random.normal(jax.random.key(7), (64, 32)) / 8
    g = jax.random.normal(jax.random.key(8), (32, 32))

    def grads(settings):
        return jax.jit(lambda key: jax.vjp(
            lambda x, w: mxfp4_matmul(settings, x, w, key), x, w)[1](g))

    exact = (g @ w.T, x.T @ g)
    stochastic = grads(DEFAULT)
    keys = jax.random.split(jax.random.key(9), 128)
    mean = jax.tree.map(lambda a: a.mean(0), jax.vmap(stochastic)(keys))
    one = stochastic(keys[0])
    plain = grads(dataclasses.replace(DEFAULT, backward_rounding="nearest",
                                      backward_hadamard=False))(keys[0])
    for m, o, p, e in zip(mean, one, plain, exact):
        err = lambda a, e=e: float(jnp.linalg.norm(a - e) / jnp.linalg.norm(e))  # noqa: E731
        assert err(m) < err(o) / 6, (err(m), err(o))  # ~1/sqrt(128) of one draw's noise
        assert 0.01 < err(p) < 0.2
    # Round to nearest with no transform: the product of the block-quantised operands.
    qg, sg = quantize_blocks(g, 1, "ceil")
    qw, sw = quantize_blocks(w.T, 0, "ceil")
    np.testing.assert_allclose(plain[0], dequantize_blocks(qg, sg, 1)
                               @ dequantize_blocks(qw, sw, 0), rtol=1e-5, atol=1e-5)


def test_codes_and_scales_pack_into_four_bits_and_a_byte():
    w = jax.random.normal(jax.random.key(10), (64, 6))
    q, s = Mxfp4.quantize_weight(w)
    packed, scales = Mxfp4.pack(q), Mxfp4.pack_scale(s)
    assert packed.dtype == jnp.uint8 and packed.size == q.size // 2
    assert scales.dtype == jnp.uint8 and scales.shape == (2, 6)
    np.testing.assert_array_equal(Mxfp4.unpack(packed, q.shape), q)
    np.testing.assert_array_equal(Mxfp4.unpack_scale(scales), s)
    edges = Mxfp4.unpack_scale(Mxfp4.pack_scale(jnp.array([jnp.nan, 1.0, 2.0 ** -130])))
    assert np.isnan(edges[0]) and edges[1] == 1.0 and edges[2] == 2.0 ** -127  # clamped
