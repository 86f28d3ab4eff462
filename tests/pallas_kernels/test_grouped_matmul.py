"""Grouped matmul (dropless MoE dispatch): Pallas (interpreted on CPU) and XLA vs references."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflm.pallas_kernels.grouped_matmul import (
    grouped_matmul,
    grouped_matmul_reference,
    tgmm,
    tgmm_reference,
)

# The package re-exports the function under the module's name: fetch the module itself.
gmm_module = importlib.import_module("efflm.pallas_kernels.grouped_matmul")

BLOCKS = dict(block_m=8, block_n=8, block_k=8)

# (tokens, k, n, group sizes): empty groups, a group spanning several row blocks,
# groups smaller than a block, boundaries inside blocks, totals not multiples of
# the block, sum < tokens, and a single group.
CASES = {
    "mixed": (37, 20, 12, [5, 0, 17, 3, 0, 9]),           # sum 34 < 37
    "spanning": (40, 16, 24, [2, 31, 7]),                  # 31 rows over 4+ blocks
    "tiny_groups": (13, 9, 5, [1, 2, 0, 3, 1, 0, 4]),      # every group under a block
    "leading_empty": (24, 8, 8, [0, 0, 24, 0]),            # exact multiple, empties around
    "one_group_short": (19, 12, 10, [11]),                 # single group, tail zeros
    "all_empty": (10, 8, 8, [0, 0, 0]),
}


def _inputs(tokens, k, n, sizes, dtype=jnp.float32, seed=0):
    kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (tokens, k), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (len(sizes), k, n), jnp.float32).astype(dtype)
    dy = jax.random.normal(kd, (tokens, n), jnp.float32).astype(dtype)
    return x, w, jnp.asarray(sizes, jnp.int32), dy


def _close(actual, expected, tol):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert actual.shape == expected.shape
    assert np.isfinite(actual).all()
    if actual.size == 0:
        return
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, atol=tol * scale, rtol=tol)


def test_references_agree_with_ragged_dot():
    x, w, sizes, _ = _inputs(*CASES["mixed"])
    _close(grouped_matmul_reference(x, w, sizes), jax.lax.ragged_dot(x, w, sizes), 1e-5)
    # Rows past the sum are zero.
    assert np.all(np.asarray(grouped_matmul_reference(x, w, sizes))[34:] == 0)


# Gradients on the three cases that cover every boundary kind (the forward test
# below covers all cases); each case is a fresh interpret-mode compile.
@pytest.mark.parametrize("case", ["mixed", "spanning", "tiny_groups"])
def test_pallas_forward_and_grads_float32(case):
    x, w, sizes, dy = _inputs(*CASES[case])

    def value_and_grads(fn):
        def run(x, w, sizes, dy):
            out, pullback = jax.vjp(lambda x, w: fn(x, w, sizes), x, w)
            return (out, *pullback(dy))
        return jax.jit(run)(x, w, sizes, dy)  # one compilation per variant

    run = lambda impl: value_and_grads(
        lambda x, w, s: grouped_matmul(x, w, s, impl=impl, **BLOCKS))
    expected = value_and_grads(grouped_matmul_reference)
    for impl in ("xla", "pallas"):  # pallas last: its output is checked below
        results = run(impl)
        for got, want in zip(results, expected):
            _close(got, want, 1e-5)
    total = int(sizes.sum())
    out = np.asarray(results[0])
    assert np.all(out[total:] == 0), "rows past sum(group_sizes) must be zero"


def test_pallas_bfloat16_loose():
    x, w, sizes, dy = _inputs(*CASES["mixed"], dtype=jnp.bfloat16, seed=1)
    def run(x, w, sizes, dy):
        fn = lambda x, w: grouped_matmul(x, w, sizes, impl="pallas", **BLOCKS)
        out, pullback = jax.vjp(fn, x, w)
        return (out, *pullback(dy))

    out, dx, dw = jax.jit(run)(x, w, sizes, dy)
    assert out.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    x32, w32, dy32 = (a.astype(jnp.float32) for a in (x, w, dy))
    ref_out, ref_pullback = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, sizes), x32, w32)
    ref_dx, ref_dw = ref_pullback(dy32)
    _close(out, ref_out, 2e-2)
    _close(dx, ref_dx, 2e-2)
    _close(dw, ref_dw, 2e-2)


_gmm_nan_filled = jax.jit(lambda x, w, sizes: gmm_module._gmm_pallas(
    x, w, sizes, interpret=True, fill=jnp.nan, **BLOCKS))


def test_every_row_inside_a_group_is_written():
    # Start the output buffer at NaN: rows inside groups must all be overwritten,
    # rows past the sum are never touched by the kernel. Group sizes are data, so
    # one compilation serves every layout.
    x, w, _, _ = _inputs(*CASES["mixed"])
    layouts = ([5, 0, 17, 3, 0, 9], [0, 0, 37, 0, 0, 0], [1, 2, 0, 3, 1, 4],
               [11, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 20], [0, 0, 0, 0, 0, 0])
    for layout in layouts:
        sizes = jnp.asarray(layout, jnp.int32)
        out = np.asarray(_gmm_nan_filled(x, w, sizes))
        total = int(sizes.sum())
        assert np.isfinite(out[:total]).all(), layout
        assert np.isnan(out[total:]).all(), layout
        _close(out[:total], grouped_matmul_reference(x, w, sizes)[:total], 1e-5)


def _transposed_operand_shapes(jaxpr):
    """Operand shapes of every transpose in a jaxpr, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "transpose":
            found.append(eqn.invars[0].aval.shape)
        for param in eqn.params.values():
            for inner in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    found += _transposed_operand_shapes(inner)
    return found


def test_backward_reads_the_weight_without_a_transposed_copy():
    """dx = dy @ w[g]^T indexes w's blocks transposed in the kernel: the backward
    program holds no transpose of the weight."""
    x, w, sizes, dy = _inputs(*CASES["mixed"])

    def grads(x, w, dy):
        _, pullback = jax.vjp(lambda x, w: grouped_matmul(x, w, sizes, impl="pallas",
                                                          **BLOCKS), x, w)
        return pullback(dy)

    jaxpr = jax.make_jaxpr(grads)(x, w, dy).jaxpr
    assert "pallas_call" in str(jaxpr)
    assert w.shape not in _transposed_operand_shapes(jaxpr)


def test_tgmm_matches_reference():
    x, _, sizes, dy = _inputs(*CASES["mixed"], seed=2)
    expected = tgmm_reference(x, dy, sizes)
    assert expected.shape == (len(sizes), x.shape[1], dy.shape[1])
    _close(tgmm(x, dy, sizes, impl="pallas", **BLOCKS), expected, 1e-5)
    _close(tgmm(x, dy, sizes, impl="xla"), expected, 1e-5)
    # Empty groups get exactly zero.
    got = np.asarray(tgmm(x, dy, sizes, impl="pallas", **BLOCKS))
    for g, size in enumerate(np.asarray(sizes)):
        if size == 0:
            assert np.all(got[g] == 0)


def test_default_blocks_and_jit():
    # Default (GPU-sized) blocks on shapes smaller than a block, under jit.
    x, w, sizes, _ = _inputs(*CASES["mixed"], seed=3)
    fn = jax.jit(lambda x, w, s: grouped_matmul(x, w, s, impl="pallas"))
    _close(fn(x, w, sizes), jax.lax.ragged_dot(x, w, sizes), 1e-5)
    # Same compiled program, different group sizes (they are data, not shapes).
    sizes2 = jnp.asarray([0, 10, 0, 0, 20, 4], jnp.int32)
    _close(fn(x, w, sizes2), jax.lax.ragged_dot(x, w, sizes2), 1e-5)


def test_bad_inputs_and_impl():
    x, w, sizes, _ = _inputs(*CASES["mixed"])
    with pytest.raises(ValueError, match="impl"):
        grouped_matmul(x, w, sizes, impl="cuda")
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul(x, w, sizes[:-1])
    with pytest.raises(ValueError, match="k="):
        grouped_matmul(x[:, :-1], w, sizes)


@pytest.mark.parametrize("interpret", [True, False])
@pytest.mark.parametrize("block", ["block_m", "block_n", "block_k"])
def test_pallas_blocks_that_are_no_power_of_two_are_refused(block, interpret):
    """Triton cannot lower a block of 48: refused naming it, compiled or interpreted,
    for the grouped matmul and its transpose."""
    x, w, sizes, dy = _inputs(*CASES["mixed"])
    blocks = {**BLOCKS, block: 48}
    with pytest.raises(ValueError, match=f"{block}=48 must be a power of two"):
        grouped_matmul(x, w, sizes, impl="pallas", interpret=interpret, **blocks)
    with pytest.raises(ValueError, match=f"{block}=48 must be a power of two"):
        tgmm(x, dy, sizes, impl="pallas", interpret=interpret, **blocks)


def test_auto_is_xla_on_cpu():
    if jax.default_backend() == "gpu":
        pytest.skip("auto picks pallas on GPU")
    x, w, sizes, _ = _inputs(*CASES["mixed"])
    jaxpr = str(jax.make_jaxpr(lambda x, w: grouped_matmul(x, w, sizes))(x, w))
    assert "ragged_dot" in jaxpr and "pallas_call" not in jaxpr


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_gpu(dtype):
    tokens, k, n, sizes = 300, 128, 96, [0, 64, 37, 150, 0, 40]
    x, w, sizes, dy = _inputs(tokens, k, n, sizes, dtype=dtype)
    fn = lambda x, w: grouped_matmul(x, w, sizes, impl="pallas", interpret=False)
    out, pullback = jax.vjp(fn, x, w)
    dx, dw = pullback(dy)
    x32, w32, dy32 = (a.astype(jnp.float32) for a in (x, w, dy))
    ref_out, ref_pullback = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, sizes), x32, w32)
    ref_dx, ref_dw = ref_pullback(dy32)
    tol = 1e-2 if dtype == jnp.float32 else 3e-2  # TF32 dots on GPU
    _close(out, ref_out, tol)
    _close(dx, ref_dx, tol)
    _close(dw, ref_dw, tol)


@pytest.mark.parametrize("shape, dtype", [
    ((300, 128, 96, [0, 64, 37, 150, 0, 40]), jnp.bfloat16),
    (CASES["mixed"], jnp.float32),
])
def test_lowers_to_triton_for_gpu(shape, dtype):
    """No GPU needed: lowering for CUDA checks that the kernels (forward, dx, dw) use only
    what the Triton backend supports, at GPU-sized (power-of-two) blocks. Operands that
    are no block multiple (the second case: k = 20, n = 12) are padded to the blocks, not
    the blocks shrunk to them (which Triton would refuse)."""
    x, w, sizes, dy = _inputs(*shape, dtype=dtype)

    def value_and_grads(x, w, sizes, dy):
        fn = lambda x, w: grouped_matmul(x, w, sizes, impl="pallas", interpret=False)
        out, pullback = jax.vjp(fn, x, w)
        return (out, *pullback(dy))

    text = jax.jit(value_and_grads).trace(x, w, sizes, dy).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("@__gpu$xla.gpu.triton(") == 3  # Triton, not Mosaic GPU
