"""Grouped matrix multiply for dropless Mixture-of-Experts dispatch.

MegaBlocks ("MegaBlocks: Efficient Sparse Training with Mixture-of-Experts")
sorts the (token, expert) assignments by expert and runs one grouped matmul over
the sorted rows with per-expert group sizes, so no token is dropped and no
capacity padding is computed.

    out[i] = x[i] @ w[group_of(i)]            grouped_matmul(x, w, group_sizes)
    dw[g]  = x[rows of g]^T @ dy[rows of g]   tgmm(x, dy, group_sizes)

Rows of `x` are sorted by group; `group_sizes` sums to at most the number of
rows, and rows past the sum produce zeros (and receive zero gradient).

Three implementations sit side by side:
  * `grouped_matmul_reference`: a plain one-hot loop over groups (obviously
    correct, slow: it multiplies every row by every group's weight);
  * `xla`: `jax.lax.ragged_dot`;
  * `pallas`: Triton-style Pallas kernels. The forward walks a schedule of
    (row block, group) tiles computed from `group_sizes`, with a static maximum
    count of `row_blocks + groups - 1`, so a group boundary that falls inside a
    row block gives two tiles for that block, each storing only its own rows
    (masked store). `tgmm` runs one program per (group, k block, n block) and
    loops over the row blocks the group touches, zeroing rows outside it.
    The backward of `grouped_matmul` is `dx = grouped_matmul(dy, w^T)` and
    `dw = tgmm(x, dy)`, both Pallas kernels; the dx kernel reads w's blocks as they
    are stored and contracts their last axis, so no transposed copy of w is made.

On CPU the Pallas kernels run with `interpret=True` (tests, small shapes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from efflm.pallas_kernels.common import mm

__all__ = ["grouped_matmul", "tgmm", "grouped_matmul_reference", "tgmm_reference"]

_IMPLS = ("auto", "xla", "pallas")
# Triton-style kernels: name the Triton backend (GPU pallas_call otherwise picks Mosaic GPU).
_TRITON = plgpu.CompilerParams(num_warps=4, num_stages=2)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pad_to(array: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    pads = [(0, target - size) for size, target in zip(array.shape, shape)]
    if all(high == 0 for _, high in pads):
        return array
    return jnp.pad(array, pads)


def _check(x, w, group_sizes):
    if x.ndim != 2 or w.ndim != 3:
        raise ValueError(f"grouped_matmul wants x (tokens, k) and w (groups, k, n); "
                         f"got x{x.shape} and w{w.shape}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has k={x.shape[1]} but w has k={w.shape[1]}")
    if group_sizes.shape != (w.shape[0],):
        raise ValueError(f"group_sizes must have shape ({w.shape[0]},), one size per group; "
                         f"got {group_sizes.shape}")


# ----------------------------------------------------------------------------
# References.


def _group_ids(group_sizes: jax.Array, tokens: int) -> jax.Array:
    """The group of each row; rows past sum(group_sizes) get -1."""
    ends = jnp.cumsum(group_sizes)
    rows = jnp.arange(tokens)
    ids = jnp.sum(rows[:, None] >= ends[None, :], axis=1)
    return jnp.where(ids < group_sizes.shape[0], ids, -1)


def grouped_matmul_reference(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """One-hot loop over groups: out[i] = x[i] @ w[group_of(i)], zeros past the sum."""
    _check(x, w, group_sizes)
    ids = _group_ids(group_sizes.astype(jnp.int32), x.shape[0])
    out = jnp.zeros((x.shape[0], w.shape[2]), jnp.float32)
    for g in range(w.shape[0]):
        part = jnp.dot(x, w[g], preferred_element_type=jnp.float32)
        out = out + jnp.where((ids == g)[:, None], part, 0.0)
    return out.astype(x.dtype)


def tgmm_reference(x: jax.Array, dy: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Per group g: x[rows of g]^T @ dy[rows of g] -> (groups, k, n)."""
    ids = _group_ids(group_sizes.astype(jnp.int32), x.shape[0])
    outs = []
    for g in range(group_sizes.shape[0]):
        xg = jnp.where((ids == g)[:, None], x, 0).astype(x.dtype)
        outs.append(jnp.dot(xg.T, dy, preferred_element_type=jnp.float32))
    return jnp.stack(outs).astype(x.dtype)


# ----------------------------------------------------------------------------
# Pallas: forward grouped matmul.


def _tile_schedule(group_sizes: jax.Array, block_m: int, num_tiles: int):
    """(row block, row lo, row hi) for each (row block, group) tile.

    Group g touches row blocks start_g // block_m .. (end_g - 1) // block_m; its
    tiles come in group order. Unused tiles at the end get lo == hi == 0.
    """
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first = starts // block_m
    last = (jnp.maximum(ends, 1) - 1) // block_m
    tiles_per_group = jnp.where(sizes > 0, last - first + 1, 0)
    total = jnp.sum(tiles_per_group)
    tile_ids = jnp.arange(num_tiles, dtype=jnp.int32)
    tile_group = jnp.repeat(jnp.arange(sizes.shape[0], dtype=jnp.int32), tiles_per_group,
                            total_repeat_length=num_tiles)
    tiles_before = jnp.cumsum(tiles_per_group) - tiles_per_group
    block = first[tile_group] + tile_ids - tiles_before[tile_group]
    lo = jnp.maximum(starts[tile_group], block * block_m)
    hi = jnp.minimum(ends[tile_group], (block + 1) * block_m)
    valid = tile_ids < total
    block = jnp.where(valid, block, 0)
    lo = jnp.where(valid, lo, 0)
    hi = jnp.where(valid, hi, 0)
    return tile_group, block.astype(jnp.int32), lo.astype(jnp.int32), hi.astype(jnp.int32)


def _gmm_kernel(group_ref, block_ref, lo_ref, hi_ref, x_ref, w_ref, _init_ref, out_ref, *,
                block_m: int, block_n: int, block_k: int, num_k_blocks: int,
                transpose_w: bool):
    tile = pl.program_id(0)
    n_block = pl.program_id(1)
    group = group_ref[tile]
    row_block = block_ref[tile]
    lo = lo_ref[tile]
    hi = hi_ref[tile]

    @pl.when(hi > lo)
    def _():
        rows = pl.ds(pl.multiple_of(row_block * block_m, block_m), block_m)
        cols = pl.ds(pl.multiple_of(n_block * block_n, block_n), block_n)

        def body(k_block, acc):
            ks = pl.ds(pl.multiple_of(k_block * block_k, block_k), block_k)
            xs = x_ref[rows, ks]
            if transpose_w:  # w stored (groups, n, k): contract the blocks' last axes
                return acc + mm(xs, w_ref[group, cols, ks], trans_b=True)
            return acc + mm(xs, w_ref[group, ks, cols])

        acc = jax.lax.fori_loop(0, num_k_blocks, body,
                                jnp.zeros((block_m, block_n), jnp.float32))
        row_ids = row_block * block_m + jnp.arange(block_m)
        mask = ((row_ids >= lo) & (row_ids < hi))[:, None]
        mask = jnp.broadcast_to(mask, (block_m, block_n))
        plgpu.store(out_ref.at[rows, cols], acc.astype(out_ref.dtype), mask=mask)


def _full_spec(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def check_blocks(block_m: int, block_n: int, block_k: int) -> None:
    """Triton's arrays have power-of-two sizes: a ValueError naming the block that is not
    one (blocks of 8 and up lower and compile for sm_90a, `efflm bench compile`)."""
    for name, block in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if block < 1 or block & (block - 1):
            raise ValueError(f"grouped_matmul: {name}={block} must be a power of two "
                             f"(e.g. 16, 32, 64, 128) for the Pallas (Triton) kernels")


def _operand_blocks(k: int, n: int, block_n: int, block_k: int, interpret: bool):
    """(block_k, block_n) of one call. Interpreted, blocks shrink to the (8-rounded)
    operand; compiled, they stay the given powers of two and the operands are padded."""
    if not interpret:
        return block_k, block_n
    return min(block_k, _round_up(k, 8)), min(block_n, _round_up(n, 8))


def _gmm_pallas(x, w, group_sizes, *, block_m, block_n, block_k, interpret, fill=0.0,
                transpose_w=False):
    """Pallas forward: x @ w[g], or with `transpose_w` x @ w[g]^T, reading w (groups, n,
    k) in place. `fill` is what rows outside every group hold (tests use NaN)."""
    tokens, k = x.shape
    groups, n = w.shape[0], w.shape[1 if transpose_w else 2]
    bk, bn = _operand_blocks(k, n, block_n, block_k, interpret)
    m_pad, k_pad, n_pad = _round_up(tokens, block_m), _round_up(k, bk), _round_up(n, bn)
    xp = _pad_to(x, (m_pad, k_pad))
    w_shape = (groups, n_pad, k_pad) if transpose_w else (groups, k_pad, n_pad)
    wp = _pad_to(w.astype(x.dtype), w_shape)
    num_tiles = m_pad // block_m + groups - 1
    schedule = _tile_schedule(group_sizes, block_m, num_tiles)
    init = jnp.full((m_pad, n_pad), fill, x.dtype)
    kernel = functools.partial(_gmm_kernel, block_m=block_m, block_n=bn, block_k=bk,
                               num_k_blocks=k_pad // bk, transpose_w=transpose_w)
    out = pl.pallas_call(
        kernel,
        grid=(num_tiles, n_pad // bn),
        in_specs=[_full_spec((num_tiles,))] * 4 + [
            _full_spec((m_pad, k_pad)), _full_spec(w_shape),
            _full_spec((m_pad, n_pad))],
        out_specs=_full_spec((m_pad, n_pad)),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), x.dtype),
        input_output_aliases={6: 0},
        interpret=interpret,
        compiler_params=_TRITON,
        name="grouped_matmul",
    )(*schedule, xp, wp, init)
    return out[:tokens, :n]


# ----------------------------------------------------------------------------
# Pallas: transposed grouped matmul (the weight gradient).


def _tgmm_kernel(starts_ref, ends_ref, x_ref, dy_ref, out_ref, *, block_m: int):
    group = pl.program_id(0)
    start = starts_ref[group]
    end = ends_ref[group]
    block_k, block_n = out_ref.shape
    first = start // block_m
    last = jnp.where(end > start, (end + block_m - 1) // block_m, first)

    def body(row_block, acc):
        rows = pl.ds(pl.multiple_of(row_block * block_m, block_m), block_m)
        row_ids = row_block * block_m + jnp.arange(block_m)
        inside = ((row_ids >= start) & (row_ids < end))[:, None]
        xs = x_ref[rows, :]
        dys = dy_ref[rows, :]
        xs = jnp.where(inside, xs, jnp.zeros_like(xs))
        return acc + jnp.dot(xs.T, dys, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(first, last, body, jnp.zeros((block_k, block_n), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _tgmm_pallas(x, dy, group_sizes, *, block_m, block_n, block_k, interpret):
    tokens, k = x.shape
    n = dy.shape[1]
    groups = group_sizes.shape[0]
    bk, bn = _operand_blocks(k, n, block_n, block_k, interpret)
    m_pad, k_pad, n_pad = _round_up(tokens, block_m), _round_up(k, bk), _round_up(n, bn)
    xp = _pad_to(x, (m_pad, k_pad))
    dyp = _pad_to(dy.astype(x.dtype), (m_pad, n_pad))
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, block_m=block_m),
        grid=(groups, k_pad // bk, n_pad // bn),
        in_specs=[_full_spec((groups,)), _full_spec((groups,)),
                  pl.BlockSpec((m_pad, bk), lambda g, i, j: (0, i)),
                  pl.BlockSpec((m_pad, bn), lambda g, i, j: (0, j))],
        out_specs=pl.BlockSpec((None, bk, bn), lambda g, i, j: (g, i, j)),
        out_shape=jax.ShapeDtypeStruct((groups, k_pad, n_pad), x.dtype),
        interpret=interpret,
        compiler_params=_TRITON,
        name="tgmm",
    )(starts, ends, xp, dyp)
    return out[:, :k, :n]


# ----------------------------------------------------------------------------
# custom_vjp wrapper and the public API.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm_diff(x, w, group_sizes, block_m, block_n, block_k, interpret):
    return _gmm_pallas(x, w, group_sizes, block_m=block_m, block_n=block_n,
                       block_k=block_k, interpret=interpret)


def _gmm_diff_fwd(x, w, group_sizes, block_m, block_n, block_k, interpret):
    out = _gmm_diff(x, w, group_sizes, block_m, block_n, block_k, interpret)
    return out, (x, w, group_sizes)


def _gmm_diff_bwd(block_m, block_n, block_k, interpret, residuals, dy):
    x, w, group_sizes = residuals
    dy = dy.astype(x.dtype)
    dx = _gmm_pallas(dy, w, group_sizes, block_m=block_m, block_n=block_k,
                     block_k=block_n, interpret=interpret, transpose_w=True)
    dw = _tgmm_pallas(x, dy, group_sizes, block_m=block_m, block_n=block_n,
                      block_k=block_k, interpret=interpret)
    return dx.astype(x.dtype), dw.astype(w.dtype), None


_gmm_diff.defvjp(_gmm_diff_fwd, _gmm_diff_bwd)


def _resolve(impl: str, interpret):
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {', '.join(_IMPLS)}; got {impl!r}")
    if impl == "auto":
        impl = "pallas" if _on_gpu() else "xla"
    if interpret is None:
        interpret = not _on_gpu()
    return impl, interpret


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, impl: str = "auto",
                   block_m: int = 64, block_n: int = 64, block_k: int = 32,
                   interpret: bool | None = None) -> jax.Array:
    """out[i] = x[i] @ w[group_of(i)] for rows sorted by group; zeros past sum(group_sizes).

    x: (tokens, k); w: (groups, k, n); group_sizes: (groups,) int32. Output dtype is
    x's, accumulation in float32. Differentiable in x and w.
    impl: `auto` (Pallas on GPU, XLA elsewhere), `xla` (`jax.lax.ragged_dot`) or
    `pallas` (interpreted unless on GPU, or as `interpret` says). Pallas blocks must be
    powers of two (`check_blocks`: a ValueError otherwise).
    """
    _check(x, w, group_sizes)
    impl, interpret = _resolve(impl, interpret)
    group_sizes = group_sizes.astype(jnp.int32)
    if impl == "xla":
        return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes,
                                  preferred_element_type=jnp.float32).astype(x.dtype)
    check_blocks(block_m, block_n, block_k)
    return _gmm_diff(x, w, group_sizes, block_m, block_n, block_k, interpret)


def tgmm(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, *, impl: str = "auto",
         block_m: int = 64, block_n: int = 64, block_k: int = 32,
         interpret: bool | None = None) -> jax.Array:
    """Transposed grouped matmul: out[g] = x[rows of g]^T @ dy[rows of g] -> (groups, k, n).

    This is the weight gradient of `grouped_matmul`. Not itself differentiable
    under impl=pallas.
    """
    impl, interpret = _resolve(impl, interpret)
    group_sizes = group_sizes.astype(jnp.int32)
    if impl == "xla":
        def forward(w):
            return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)
        zeros = jnp.zeros((group_sizes.shape[0], x.shape[1], dy.shape[1]), x.dtype)
        _, pullback = jax.vjp(forward, zeros)
        return pullback(dy.astype(jnp.float32))[0].astype(x.dtype)
    check_blocks(block_m, block_n, block_k)
    return _tgmm_pallas(x, dy, group_sizes, block_m=block_m, block_n=block_n,
                        block_k=block_k, interpret=interpret)
