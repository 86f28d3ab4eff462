"""Chunked linear attention: XLA chunked and Pallas (interpreted on CPU) vs the recurrent scan."""

import functools
import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fast_jit

from efflm.pallas_kernels.linear_attention import (
    chunked_linear_attention,
    linear_attention_chunked_xla,
    linear_attention_recurrent,
)

# The package may re-export the function under the module's name: fetch the module.
la_module = importlib.import_module("efflm.pallas_kernels.linear_attention")

# length 13 with chunk 4: three whole chunks and a partial one.
BATCH, LENGTH, HEADS, DK, DV, CHUNK = 2, 13, 3, 4, 5, 4


def _inputs(length=LENGTH, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 7)
    q = jax.random.normal(keys[0], (BATCH, length, HEADS, DK), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (BATCH, length, HEADS, DK), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (BATCH, length, HEADS, DV), jnp.float32).astype(dtype)
    # Log decays in (-inf, 0): -softplus of normals, so decays span roughly 0.1 .. 0.95.
    log_decay = -jax.nn.softplus(jax.random.normal(keys[3], (BATCH, length, HEADS)))
    state = jax.random.normal(keys[4], (BATCH, HEADS, DK, DV), jnp.float32)
    d_out = jax.random.normal(keys[5], (BATCH, length, HEADS, DV), jnp.float32)
    d_state = jax.random.normal(keys[6], (BATCH, HEADS, DK, DV), jnp.float32)
    return q, k, v, log_decay, state, d_out, d_state




def _close(actual, expected, tol):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert actual.shape == expected.shape
    assert np.isfinite(actual).all()
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, atol=tol * scale, rtol=tol)


def _value_and_grads(fn, q, k, v, log_decay, state, d_out, d_state, decay, with_state):
    """Value and grads of <out, d_out> + <final_state, d_state> in all differentiable inputs."""

    def objective(q, k, v, log_decay, state):
        out, final = fn(q, k, v, log_decay=log_decay if decay else None,
                        initial_state=state if with_state else None)
        return (jnp.sum(out.astype(jnp.float32) * d_out)
                + jnp.sum(final * d_state)), (out, final)

    # One jit per configuration: far fewer compilations than eager scans and vjps.
    grad_fn = fast_jit(jax.value_and_grad(objective, argnums=(0, 1, 2, 3, 4), has_aux=True))
    (_, (out, final)), grads = grad_fn(q, k, v, log_decay, state)
    return (out, final, *grads)


NAMES = ("out", "final_state", "dq", "dk", "dv", "dlog_decay", "dinitial_state")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("decay,with_state", [(True, True), (False, False)])
def test_matches_recurrent_scan_values_and_grads(impl, decay, with_state):
    inputs = _inputs()
    expected = _value_and_grads(linear_attention_recurrent, *inputs, decay, with_state)
    fast = lambda q, k, v, **kw: chunked_linear_attention(q, k, v, chunk=CHUNK, impl=impl, **kw)
    got = _value_and_grads(fast, *inputs, decay, with_state)
    for name, a, b in zip(NAMES, got, expected):
        if (name == "dlog_decay" and not decay) or (name == "dinitial_state" and not with_state):
            continue  # not inputs in this configuration
        _close(a, b, 2e-5)
    assert got[1].dtype == jnp.float32


def test_chunked_xla_other_chunk_sizes():
    # A chunk longer than the sequence, a chunk of one token, and an exact multiple.
    q, k, v, log_decay, state, _, _ = _inputs(length=8, seed=1)
    expected = fast_jit(linear_attention_recurrent)(q, k, v, log_decay=log_decay,
                                                initial_state=state)
    for chunk in (1, 8, 16):
        chunked = fast_jit(linear_attention_chunked_xla, static_argnames="chunk")
        got = chunked(q, k, v, log_decay=log_decay, initial_state=state, chunk=chunk)
        _close(got[0], expected[0], 2e-5)
        _close(got[1], expected[1], 2e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_state_carry_equals_one_pass(impl):
    q, k, v, log_decay, state, _, _ = _inputs(seed=2)
    run = fast_jit(lambda q, k, v, g, s: chunked_linear_attention(
        q, k, v, log_decay=g, initial_state=s, chunk=CHUNK, impl=impl))
    whole_out, whole_state = run(q, k, v, log_decay, state)
    split = 6  # not on a chunk boundary
    first_out, carried = run(q[:, :split], k[:, :split], v[:, :split], log_decay[:, :split], state)
    second_out, final = run(q[:, split:], k[:, split:], v[:, split:], log_decay[:, split:],
                            carried)
    _close(jnp.concatenate([first_out, second_out], axis=1), whole_out, 2e-5)
    _close(final, whole_state, 2e-5)


@pytest.mark.parametrize("gates", ["head", "keys", "values"])
def test_pallas_kernel_writes_every_output_element(gates):
    """The forward kernels (the backward reuses them) write into NaN-filled buffers: no NaN
    may survive, the padded tail of the last chunk included."""
    chunk = CHUNK if gates == "head" else 32
    q, k, v, log_decay, state, _, _ = _inputs(LENGTH if gates == "head" else 45, seed=4)
    if gates != "head":  # one gate per key (GLA) or value dimension; two sub-chunks of 16
        width = DK if gates == "keys" else DV
        log_decay = jnp.repeat(log_decay[..., None], width, axis=-1) * jnp.linspace(
            0.5, 1.5, width)
    call = functools.partial(la_module._forward_call, chunk=chunk, interpret=True,
                             on_keys=gates != "values")
    layout = la_module.kernel_layout(q, k, v, log_decay, chunk)
    assert layout[0].shape[2] > q.shape[1]  # padding is exercised
    # The output pass's grid covers the chunks: several programs per row.
    assert layout[0].shape[2] // chunk == (4 if gates == "head" else 2)
    run = fast_jit(call)
    want = run(*layout, state)
    got = run(*layout, state,
              initial_outputs=[jnp.full(a.shape, jnp.nan, a.dtype) for a in want])
    for name, a, b in zip(("out", "final_state"), got, want):
        assert a.shape == b.shape and np.isfinite(a).all(), name
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)


def test_pallas_bfloat16_loose():
    q, k, v, log_decay, state, _, _ = _inputs(dtype=jnp.bfloat16, seed=3)
    out, final = chunked_linear_attention(q, k, v, log_decay=log_decay, initial_state=state,
                                          chunk=CHUNK, impl="pallas")
    assert out.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    f32 = lambda a: a.astype(jnp.float32)
    ref_out, ref_final = linear_attention_recurrent(f32(q), f32(k), f32(v), log_decay=log_decay,
                                                    initial_state=state)
    _close(out, ref_out, 3e-2)
    _close(final, ref_final, 3e-2)


def test_bad_inputs_and_impl():
    q, k, v, log_decay, state, _, _ = _inputs()
    with pytest.raises(ValueError, match="impl"):
        chunked_linear_attention(q, k, v, impl="triton")
    with pytest.raises(ValueError, match="log_decay"):
        chunked_linear_attention(q, k, v, log_decay=log_decay[..., None])
    with pytest.raises(ValueError, match="initial_state"):
        chunked_linear_attention(q, k, v, initial_state=state[:, :, :2])
    with pytest.raises(ValueError, match="v must be"):
        chunked_linear_attention(q, k, v[:, :-1])


def test_auto_is_xla_on_cpu():
    if jax.default_backend() == "gpu":
        pytest.skip("auto picks pallas on GPU")
    q, k, v, *_ = _inputs()
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: chunked_linear_attention(q, k, v))(q, k, v))
    assert "pallas_call" not in jaxpr


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_gpu(dtype):
    keys = jax.random.split(jax.random.key(0), 5)
    shape = (2, 200, 4, 64)
    q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys[:3])
    q = q / 8
    log_decay = -jax.nn.softplus(jax.random.normal(keys[3], shape[:3]))
    objective = lambda fn: lambda q, k, v, g: jnp.sum(
        fn(q, k, v, log_decay=g)[0].astype(jnp.float32) ** 2)
    fast = lambda *a, **kw: chunked_linear_attention(*a, chunk=64, impl="pallas",
                                                     interpret=False, **kw)
    got = jax.value_and_grad(objective(fast), argnums=(0, 1, 2, 3))(q, k, v, log_decay)
    f32 = lambda a: a.astype(jnp.float32)
    want = jax.value_and_grad(objective(linear_attention_recurrent), argnums=(0, 1, 2, 3))(
        f32(q), f32(k), f32(v), log_decay)
    tol = 2e-2 if dtype == jnp.float32 else 6e-2  # TF32 / bf16 dots
    _close(got[0], want[0], tol)
    for a, b in zip(got[1], want[1]):
        _close(a, b, tol)


def test_lowers_to_triton_for_gpu():
    # No GPU needed: lowering for CUDA checks that the kernel uses only what the
    # Triton backend supports, at GPU-sized (power-of-two) chunk and head dims.
    q = jnp.ones((2, 200, 4, 64), jnp.bfloat16)
    log_decay = jnp.full((2, 200, 4), -0.1)

    def grads(q, log_decay):
        fn = lambda q, g: chunked_linear_attention(q, q, q, log_decay=g, chunk=64,
                                                   impl="pallas", interpret=False)
        return jax.grad(lambda q, g: jnp.sum(fn(q, g)[0].astype(jnp.float32)),
                        argnums=(0, 1))(q, log_decay)

    text = jax.jit(grads).trace(q, log_decay).lower(lowering_platforms=("cuda",)).as_text()
    # Triton, not Mosaic GPU: a state pass and an output pass, forward and three times
    # in the backward.
    assert text.count("@__gpu$xla.gpu.triton(") == 8


# Per-key-dimension gates (GLA).


def _gla_inputs(length, gate_scale, seed=3):
    q, k, v, _, state, d_out, d_state = _inputs(length=length, seed=seed)
    key = jax.random.key(seed + 100)
    log_decay = -gate_scale * jax.nn.softplus(
        jax.random.normal(key, (BATCH, length, HEADS, DK)))
    return q, k, v, log_decay, state, d_out, d_state


@pytest.mark.parametrize("length, chunk, gate_scale", [
    (13, 4, 1.0),    # sub-chunk = chunk
    (45, 32, 1.0),   # two sub-chunks of 16 per chunk, a partial last chunk
    (70, 64, 8.0),   # gates down to exp(-30) per step: b reaches about -700 in a chunk
])
def test_per_key_dim_gates_match_recurrent(length, chunk, gate_scale):
    """GLA gates: the chunked form (values and all gradients, the gates' included) equals
    the token-by-token scan, also where exp(-b) alone would overflow float32."""
    args = _gla_inputs(length, gate_scale)
    want = _value_and_grads(linear_attention_recurrent, *args, decay=True, with_state=True)
    got = _value_and_grads(functools.partial(chunked_linear_attention, impl="xla",
                                             chunk=chunk), *args, decay=True, with_state=True)
    if gate_scale > 1:
        assert float(jnp.min(jnp.cumsum(args[3][:, :64], axis=1))) < -100
    for name, g, w in zip(("out", "state", "dq", "dk", "dv", "dg", "ds0"), got, want):
        try:
            _close(g, w, 1e-4)
        except AssertionError as e:
            raise AssertionError(name) from e


@pytest.mark.filterwarnings("ignore:.*runs in interpret mode")
@pytest.mark.parametrize("length, chunk, gate_scale", [(45, 32, 1.0), (40, 16, 8.0)])
def test_per_key_dim_gates_pallas_match_recurrent(length, chunk, gate_scale):
    """The Pallas GLA kernel (interpreted) and its backward, whose dq and dk passes gate
    the state's columns, against the token scan."""
    args = _gla_inputs(length, gate_scale)
    want = _value_and_grads(linear_attention_recurrent, *args, decay=True, with_state=True)
    got = _value_and_grads(functools.partial(chunked_linear_attention, impl="pallas",
                                             chunk=chunk, interpret=True),
                           *args, decay=True, with_state=True)
    for name, g, w in zip(("out", "state", "dq", "dk", "dv", "dg", "ds0"), got, want):
        try:
            _close(g, w, 1e-4)
        except AssertionError as e:
            raise AssertionError(name) from e


@pytest.mark.parametrize("gates", ["none", "head", "key_dim"])
def test_compiled_kernel_refuses_a_chunk_that_is_no_power_of_two(gates):
    """Triton cannot lower a chunk of 24: refused with the setting and its allowed values
    before any kernel is built."""
    q, k, v, log_decay, *_ = _gla_inputs(8, 1.0)
    log_decay = {"none": None, "head": log_decay[..., 0], "key_dim": log_decay}[gates]
    with pytest.raises(ValueError, match=r"chunk=24: .*power of two \(1, 2, 4, .*256\)"):
        chunked_linear_attention(q, k, v, log_decay=log_decay, impl="pallas", chunk=24,
                                 interpret=False)


def test_per_key_dim_gates_bad_input():
    q, k, v, log_decay, *_ = _gla_inputs(8, 1.0)
    with pytest.raises(ValueError, match=r"\(batch, length, heads, dk\)"):
        chunked_linear_attention(q, k, v, log_decay=log_decay[..., :2], impl="xla")


@pytest.mark.parametrize("on_keys", [True, False])
def test_gated_kernel_splits_the_value_dimension(on_keys, monkeypatch):
    """Programs over slices of dv (two here) give the unsplit result: gates on state rows
    apply to every slice, gates on columns are sliced with them; so do the gated-keys
    sums over slices of the key dimension (two of 2 here)."""
    keys = jax.random.split(jax.random.key(9), 5)
    q, k = (jax.random.normal(key, (1, 40, 2, 4)) for key in keys[:2])
    v = jax.random.normal(keys[2], (1, 40, 2, 16))
    gates = -jax.nn.softplus(jax.random.normal(keys[3], (1, 40, 2, 4 if on_keys else 16)))
    state = jax.random.normal(keys[4], (1, 2, 4, 16))
    layout = la_module.kernel_layout(q, k, v, gates, 32)
    run = functools.partial(la_module._forward_call, chunk=32, interpret=True,
                            on_keys=on_keys)
    split = fast_jit(functools.partial(run, block_dv=8))(*layout, state)
    whole = fast_jit(functools.partial(run, block_dv=16))(*layout, state)
    for a, b in zip(split, whole):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(la_module, "_GATED_KEY_BLOCK", 2)
    for a, b in zip(fast_jit(functools.partial(run, block_dv=16))(*layout, state), whole):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    if on_keys:  # and both equal the token scan
        want, want_state = linear_attention_recurrent(q, k, v, log_decay=gates,
                                                      initial_state=state)
        np.testing.assert_allclose(jnp.moveaxis(split[0], 1, 2)[:, :40], want, rtol=1e-4,
                                   atol=1e-4)
        np.testing.assert_allclose(split[1], want_state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gates", ["none", "head", "key_dim"])
def test_segments_restart_the_state(gates):
    """Packed segments: chunked XLA and Pallas (interpreted; per-key-dimension gates in
    two sub-chunks of 16) equal the recurrent scan (values and grads, a length that is
    no chunk multiple, boundaries inside and at the edges of chunks), and a segment's
    outputs equal a separate pass over it alone."""
    length, chunk = 45, 32 if gates == "key_dim" else 8
    q, k, v, _, state, d_out, d_state = _inputs(length=length, seed=3)
    g = jax.random.normal(jax.random.key(9), (BATCH, length, HEADS, DK))
    log_decay = {"none": None, "head": -jax.nn.softplus(g[..., 0]),
                 "key_dim": -jax.nn.softplus(g)}[gates]
    seg = jnp.array([[1] * 5 + [2] * 3 + [3] * 13 + [6] * 20 + [0] * 4,
                     [4] * 16 + [5] * 29])

    def run(fn):
        def objective(q, k, v, state):
            out, final = fn(q, k, v, log_decay=log_decay, initial_state=state,
                            segment_ids=seg)
            return jnp.sum(out * d_out) + jnp.sum(final * d_state), (out, final)
        (_, aux), grads = fast_jit(jax.value_and_grad(objective, argnums=(0, 1, 2, 3),
                                                  has_aux=True))(q, k, v, state)
        return (*aux, *grads)

    expected = run(linear_attention_recurrent)
    got = run(functools.partial(linear_attention_chunked_xla, chunk=chunk))
    pallas = run(functools.partial(chunked_linear_attention, chunk=chunk, impl="pallas"))
    for a, b, c in zip(got, pallas, expected):
        _close(a, c, 2e-5)
        _close(b, c, 2e-5)
    alone, _ = linear_attention_recurrent(
        q[:1, 8:21], k[:1, 8:21], v[:1, 8:21],
        log_decay=None if log_decay is None else log_decay[:1, 8:21])
    _close(got[0][:1, 8:21], alone, 2e-5)


@pytest.mark.parametrize("gates", ["head", "key_dim"])
def test_lowers_to_triton_with_segments(gates):
    """Segment masking uses only what the Triton backend supports (no GPU needed)."""
    q = jnp.ones((2, 200, 4, 64), jnp.bfloat16)
    log_decay = jnp.full((2, 200, 4) if gates == "head" else (2, 200, 4, 64), -0.1)
    seg = jnp.repeat(jnp.arange(1, 5), 50)[None].repeat(2, axis=0)

    def grads(q, log_decay):
        fn = lambda q, g: chunked_linear_attention(q, q, q, log_decay=g, chunk=64,
                                                   impl="pallas", interpret=False,
                                                   segment_ids=seg)
        return jax.grad(lambda q, g: jnp.sum(fn(q, g)[0].astype(jnp.float32)),
                        argnums=(0, 1))(q, log_decay)

    text = jax.jit(grads).trace(q, log_decay).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("@__gpu$xla.gpu.triton(") == 8


@pytest.mark.parametrize("gates", ["head", "key_dim"])
def test_head_dims_that_are_no_power_of_two_lower_to_triton(gates):
    """dk = 24 and dv = 40 are zero-padded to 32 and 64 before the kernels (no GPU
    needed: unpadded, the Triton lowering refuses them)."""
    q = jnp.ones((1, 40, 2, 24), jnp.bfloat16)
    v = jnp.ones((1, 40, 2, 40), jnp.bfloat16)
    log_decay = jnp.full((1, 40, 2) if gates == "head" else (1, 40, 2, 24), -0.1)

    def grads(q, v, log_decay):
        fn = lambda q, v, g: chunked_linear_attention(q, q, v, log_decay=g, chunk=16,
                                                      impl="pallas", interpret=False)
        return jax.grad(lambda q, v, g: jnp.sum(fn(q, v, g)[0].astype(jnp.float32)),
                        argnums=(0, 1, 2))(q, v, log_decay)

    text = jax.jit(grads).trace(q, v, log_decay).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("@__gpu$xla.gpu.triton(") == 8


def _in_range_block_indices(monkeypatch):
    """Wrap the module's pallas_call so that each call first checks every operand's and
    output's BlockSpec: at every grid point its index map must name a block inside the
    array. (Interpret mode clamps an out-of-range block back inside, so the value tests
    cannot see one; a GPU reads past the rows it should.) Returns the calls' names."""
    real, names = la_module.pl.pallas_call, []

    def check(name, spec, shape, grid):
        block = [1 if b is None else b for b in spec.block_shape]
        for point in itertools.product(*map(range, grid)):
            index = spec.index_map(*point)
            assert all(0 <= int(i) * b and (int(i) + 1) * b <= n
                       for i, b, n in zip(index, block, shape)), (name, point, index, shape)

    def pallas_call(kernel, *, grid, in_specs, out_specs, out_shape, name, **kw):
        names.append(name)
        call = real(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                    out_shape=out_shape, name=name, **kw)

        def run(*args):
            for spec, a in zip(in_specs, args):
                check(name, spec, a.shape, grid)
            for spec, a in zip(jax.tree.leaves(out_specs), jax.tree.leaves(out_shape)):
                check(name, spec, a.shape, grid)
            return call(*args)

        return run

    monkeypatch.setattr(la_module.pl, "pallas_call", pallas_call)
    return names


@pytest.mark.parametrize("gates", ["head", "keys", "values"])
def test_block_indices_stay_inside_the_arrays(gates, monkeypatch):
    """Value columns split in two (dv = 32, slices of 16 = dk): q and k are read whole by
    every slice's programs, v, the gates on values, the states and the output by slice."""
    names = _in_range_block_indices(monkeypatch)
    keys = jax.random.split(jax.random.key(12), 4)
    q, k = (jax.random.normal(key, (1, 40, 1, 16)) for key in keys[:2])
    v = jax.random.normal(keys[2], (1, 40, 1, 32))
    width = {"head": (), "keys": (16,), "values": (32,)}[gates]
    gate = -jax.nn.softplus(jax.random.normal(keys[3], (1, 40, 1, *width)))
    layout = la_module.kernel_layout(q, k, v, gate, 16)
    la_module._forward_call(*layout, jnp.zeros((1, 1, 16, 32)), 16, True, block_dv=16,
                            on_keys=gates == "keys")
    assert len(names) == 2


def test_large_states_split_the_value_columns():
    """From a 128 x 128 state on, the per-head kernel's programs take slices of the value
    columns (head dim 256: four of 64, which fit in an sm_90 block's shared memory), and
    slices give the unsplit result."""
    assert [la_module.value_block(d, d) for d in (16, 64, 128, 256)] == [16, 64, 128, 64]
    assert la_module.value_block(256, 32) == 32 and la_module.value_block(24, 40) == 40
    keys = jax.random.split(jax.random.key(11), 5)
    q, k = (jax.random.normal(key, (1, 32, 1, 16)) for key in keys[:2])
    v = jax.random.normal(keys[2], (1, 32, 1, 32))
    gates = -jax.nn.softplus(jax.random.normal(keys[3], (1, 32, 1)))
    state = jax.random.normal(keys[4], (1, 1, 16, 32))
    layout = la_module.kernel_layout(q, k, v, gates, 16)
    run = functools.partial(la_module._forward_call, chunk=16, interpret=True)
    split = fast_jit(functools.partial(run, block_dv=16))(*layout, state)
    whole = fast_jit(run)(*layout, state)
    for a, b in zip(split, whole):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("gates", ["head", "key_dim"])
def test_compiled_gpu_with_segments(gates):
    """The compiled Triton kernels mask packed segments like the reference (TF32 dots)."""
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (2, 200, 4, 64)
    q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in keys[:3])
    q = q / 8
    g = jax.random.normal(keys[3], shape if gates == "key_dim" else shape[:3])
    log_decay = -jax.nn.softplus(g)
    seg = jnp.repeat(jnp.array([1, 2, 3, 4, 4]), 40)[None].repeat(2, axis=0)
    objective = lambda fn: lambda q, k, v, g: jnp.sum(
        fn(q, k, v, log_decay=g, segment_ids=seg)[0] ** 2)
    fast = lambda *a, **kw: chunked_linear_attention(*a, chunk=64, impl="pallas",
                                                     interpret=False, **kw)
    got = jax.value_and_grad(objective(fast), argnums=(0, 1, 2, 3))(q, k, v, log_decay)
    want = jax.value_and_grad(objective(linear_attention_recurrent), argnums=(0, 1, 2, 3))(
        q, k, v, log_decay)
    _close(got[0], want[0], 2e-2)
    for a, b in zip(got[1], want[1]):
        _close(a, b, 2e-2)


@pytest.mark.parametrize("gates", [False, True])
def test_pallas_bfloat16_dots_over_many_chunks(gates):
    """bf16 inputs, 6 chunks of 16: values and gradients within 2% of the float32
    recurrence on the same (rounded) inputs, the error of bf16 dot operands alone."""
    keys = jax.random.split(jax.random.key(11), 5)
    shape = (1, 96, 2, 16)
    q, k, v = (jax.random.normal(key, shape).astype(jnp.bfloat16) for key in keys[:3])
    log_decay = -jax.nn.softplus(jax.random.normal(keys[3], shape if gates else shape[:3]))
    d_out = jax.random.normal(keys[4], shape)

    def objective(fn, q, k, v, log_decay):
        out, final = fn(q, k, v, log_decay=log_decay)
        return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(final), out

    kernel = functools.partial(chunked_linear_attention, chunk=16, impl="pallas")
    f32 = lambda a: a.astype(jnp.float32)
    got = fast_jit(jax.value_and_grad(functools.partial(objective, kernel), (0, 1, 2, 3),
                                      has_aux=True))(q, k, v, log_decay)
    want = fast_jit(jax.value_and_grad(functools.partial(objective, linear_attention_recurrent),
                                       (0, 1, 2, 3), has_aux=True))(f32(q), f32(k), f32(v),
                                                                    log_decay)
    assert got[0][1].dtype == jnp.bfloat16 and got[1][0].dtype == jnp.bfloat16
    _close(got[0][1], want[0][1], 2e-2)
    for g, w in zip(got[1], want[1]):
        _close(g, w, 2e-2)
