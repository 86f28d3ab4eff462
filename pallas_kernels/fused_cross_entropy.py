"""Linear cross-entropy without the (tokens x vocab) logits, after "Cut Your Losses in
Large-Vocabulary Language Models" (Cut Cross-Entropy).

`linear_cross_entropy(h, w, targets, mask)` returns what the reference
`cross_entropy(h @ w, targets, mask)` below returns — `(loss_sum, z_sum, num_tokens)`
in float32 — but streams over blocks of the vocabulary: an online
log-sum-exp in the forward pass and, in a `custom_vjp` backward pass, the logits of each
block recomputed and turned into that block's share of dh and dw. Neither pass holds
more than one (tokens x block_v) block of logits.

    impl="naive"   the reference: full logits, then `cross_entropy` (plain jax.numpy)
    impl="xla"     a `fori_loop` over vocab blocks, slicing w in place (the CPU path)
    impl="pallas"  Triton-style Pallas kernels: a grid over token blocks, a loop over
                   vocab blocks (forward and dh), a grid over vocab blocks and a loop
                   over token blocks (dw); interpreted off GPU. The backward kernels'
                   float32 accumulators (a token block's dh, a vocab block's dw) are too
                   big for registers, so each sweep recomputes the dlogits of
                   `sweep_blocks` blocks (4; 2 in float32), keeps them in registers,
                   and adds all of them into each d_model slice of the accumulator in
                   one read-modify-write: a quarter (float32: a half) of the
                   accumulator traffic of one block per sweep, with no extra matmul
                   work
    impl="auto"    pallas on a GPU, xla elsewhere

Both fast paths share the split: a custom_vjp primitive gives, per token, the
log-sum-exp and the target's logit; the masked sums and the z-loss are plain jax.numpy
on those (T,) vectors, so their gradients come from ordinary autodiff.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from efflm.mesh import mesh_axes_of
from efflm.pallas_kernels.common import alias_initial_outputs

# Lower GPU calls through Triton (jax's default for GPU pallas_call is Mosaic GPU).
_TRITON = plgpu.CompilerParams(num_warps=4, num_stages=2)
# The backward kernels hold a sweep's dlogits beside the logits being recomputed.
_BACKWARD_TRITON = plgpu.CompilerParams(num_warps=8, num_stages=2)

IMPLS = ("auto", "naive", "xla", "pallas")


def sweep_blocks(dtype) -> int:
    """Blocks per sweep of the Pallas backward kernels (fewer when there are fewer
    blocks): 4 for 2-byte operands, 2 for float32, whose dlogits take twice the
    registers (more spill or exceed shared memory on sm_90, `efflm bench compile`)."""
    return 2 if jnp.dtype(dtype).itemsize >= 4 else 4


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _ceil_to(n: int, k: int) -> int:
    return -(-n // k) * k


def _dot_f32(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------
# The reference (impl="naive"): full logits, plain jax.numpy.


def cross_entropy(logits, targets, mask, z_loss: float = 0.0):
    """Summed token losses and their count.

    Returns `(loss_sum, z_sum, num_tokens)`, each a float32 scalar, so that gradient
    accumulation and data shards can add them before dividing.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    loss_sum = jnp.sum((lse - target_logit) * mask)
    z_sum = jnp.sum(jnp.square(lse) * mask) * z_loss
    return loss_sum, z_sum, jnp.sum(mask)


# ---------------------------------------------------------------------------------------
# impl="xla": a scan over vocab blocks.


def _vocab_blocks(vocab: int, block_v: int) -> tuple[int, int]:
    """(block width, number of blocks); a vocabulary smaller than a block is one block."""
    block_v = min(block_v, vocab)
    return block_v, -(-vocab // block_v)


def _block_logits(h, w, j, vocab: int, block_v: int):
    """Float32 logits of vocab block j, read in place from w (no padded copy).

    The last block is slid back to end at the vocabulary's end; its columns that the
    previous block already covered are masked (-inf), so every column counts once.
    Returns the logits, their column indices, the block's start and the weight slice.
    """
    start = jnp.minimum(j * block_v, vocab - block_v)
    w_block = jax.lax.dynamic_slice_in_dim(w, start, block_v, axis=1)
    logits = _dot_f32(h, w_block)
    cols = start + jnp.arange(block_v)
    fresh = cols >= j * block_v
    return jnp.where(fresh[None, :], logits, -jnp.inf), cols, start, w_block


def _xla_forward(h, w, targets, block_v: int):
    vocab = w.shape[1]
    block_v, num_blocks = _vocab_blocks(vocab, block_v)
    tokens = h.shape[0]

    def body(j, carry):
        m, s, target_logit = carry
        logits, cols, _, _ = _block_logits(h, w, j, vocab, block_v)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
        hit = (cols[None, :] == targets[:, None]) & (logits > -jnp.inf)
        target_logit = target_logit + jnp.sum(jnp.where(hit, logits, 0.0), axis=1)
        return m_new, s, target_logit

    init = (jnp.full((tokens,), -jnp.inf, jnp.float32), jnp.zeros((tokens,), jnp.float32),
            jnp.zeros((tokens,), jnp.float32))
    m, s, target_logit = jax.lax.fori_loop(0, num_blocks, body, init)
    return m + jnp.log(s), target_logit


def _xla_backward(h, w, targets, lse, g_lse, g_target, block_v: int):
    vocab = w.shape[1]
    block_v, num_blocks = _vocab_blocks(vocab, block_v)
    h32 = h.astype(jnp.float32)

    def body(j, carry):
        dh, dw = carry
        logits, cols, start, w_block = _block_logits(h, w, j, vocab, block_v)
        hit = (cols[None, :] == targets[:, None]) & (logits > -jnp.inf)
        dlogits = (g_lse[:, None] * jnp.exp(logits - lse[:, None])
                   + jnp.where(hit, g_target[:, None], 0.0))
        dh = dh + jax.lax.dot_general(dlogits, w_block.astype(jnp.float32),
                                      (((1,), (1,)), ((), ())))
        # Masked columns have zero dlogits, so adding onto the slid last block is exact.
        dw_block = jax.lax.dynamic_slice_in_dim(dw, start, block_v, axis=1)
        dw_block = dw_block + jax.lax.dot_general(h32, dlogits, (((0,), (0,)), ((), ())))
        return dh, jax.lax.dynamic_update_slice_in_dim(dw, dw_block, start, axis=1)

    init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32))
    dh, dw = jax.lax.fori_loop(0, num_blocks, body, init)
    return dh.astype(h.dtype), dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _xla_lse(h, w, targets, block_v):
    return _xla_forward(h, w, targets, block_v)


def _xla_lse_fwd(h, w, targets, block_v):
    lse, target_logit = _xla_forward(h, w, targets, block_v)
    return (lse, target_logit), (h, w, targets, lse)


def _xla_lse_bwd(block_v, res, g):
    h, w, targets, lse = res
    dh, dw = _xla_backward(h, w, targets, lse, g[0], g[1], block_v)
    return dh, dw, None


_xla_lse.defvjp(_xla_lse_fwd, _xla_lse_bwd)


# ---------------------------------------------------------------------------------------
# impl="pallas": Triton-style kernels over padded operands.


@dataclasses.dataclass(frozen=True)
class _Blocks:
    """Static sizes of the Pallas path (hashable: a custom_vjp non-diff argument)."""
    vocab: int
    block_t: int
    block_v: int
    block_d: int
    interpret: bool
    # Vocab blocks per dh sweep and token blocks per dw sweep: their dlogits stay in
    # registers (in the operands' dtype) while each d_model slice of the float32
    # accumulator is read, has all of them added, and is written back once.
    sweep_v: int = 1
    sweep_t: int = 1


def _tile_logits(h_ref, rows, w_ref, j, b: _Blocks):
    """(block_t, block_v) f32 logits of token rows `rows` and vocab block j, accumulated
    over d_model in block_d slices so no operand is held whole; padded columns -inf."""
    cols = pl.ds(pl.multiple_of(j * b.block_v, b.block_v), b.block_v)

    def body(c, acc):
        ds = pl.ds(pl.multiple_of(c * b.block_d, b.block_d), b.block_d)
        return acc + _dot_f32(h_ref[rows, ds], w_ref[ds, cols])

    logits = jax.lax.fori_loop(0, h_ref.shape[1] // b.block_d, body,
                               jnp.zeros((b.block_t, b.block_v), jnp.float32))
    ids = j * b.block_v + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    return jnp.where(ids < b.vocab, logits, -jnp.inf), ids


def _forward_kernel(h_ref, w_ref, t_ref, *refs, b: _Blocks):
    # refs: [the two aliased initial outputs], lse, target logit
    lse_ref, tl_ref = refs[-2:]
    targets = t_ref[...]
    rows = pl.ds(0, b.block_t)

    def body(j, carry):
        m, s, target_logit = carry
        logits, ids = _tile_logits(h_ref, rows, w_ref, j, b)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
        hit = ids == targets[:, None]
        target_logit = target_logit + jnp.sum(jnp.where(hit, logits, 0.0), axis=1)
        return m_new, s, target_logit

    init = (jnp.full((b.block_t,), -jnp.inf, jnp.float32),
            jnp.zeros((b.block_t,), jnp.float32), jnp.zeros((b.block_t,), jnp.float32))
    m, s, target_logit = jax.lax.fori_loop(0, pl.cdiv(b.vocab, b.block_v), body, init)
    lse_ref[...] = m + jnp.log(s)
    tl_ref[...] = target_logit


def _dlogits(logits, ids, targets, lse, g_lse, g_target, dtype):
    """d(loss)/d(logits) of one tile, in the operands' dtype for the next matmuls."""
    hit = ids == targets[:, None]
    grad = (g_lse[:, None] * jnp.exp(logits - lse[:, None])
            + jnp.where(hit, g_target[:, None], 0.0))
    return grad.astype(dtype)


def _accumulate(out_ref, index, update, first):
    """out_ref[index] (+)= update. Each program owns its output block, so read-modify-write
    needs no atomics; a barrier orders one sweep's stores before the next sweep's loads,
    which other threads of the block may make."""
    out_ref[index] = jnp.where(first, update, out_ref[index] + update)


def _sweep_barrier(b: _Blocks):
    if not b.interpret:
        plgpu.debug_barrier()


def _dh_kernel(h_ref, w_ref, t_ref, lse_ref, gl_ref, gt_ref, *refs, b: _Blocks):
    """One token block: per sweep of `sweep_v` vocab blocks, their dlogits (recomputed)
    times their w blocks^T, added into dh one d_model slice at a time."""
    dh_ref = refs[-1]  # after the aliased initial dh, if any
    targets, lse, g_lse, g_target = t_ref[...], lse_ref[...], gl_ref[...], gt_ref[...]
    rows = pl.ds(0, b.block_t)

    def body(sweep, carry):
        blocks = [sweep * b.sweep_v + n for n in range(b.sweep_v)]
        cols = [pl.ds(pl.multiple_of(j * b.block_v, b.block_v), b.block_v) for j in blocks]
        dls = []
        for j in blocks:
            logits, ids = _tile_logits(h_ref, rows, w_ref, j, b)
            dls.append(_dlogits(logits, ids, targets, lse, g_lse, g_target, w_ref.dtype))

        def chunk(c, carry):
            ds = pl.ds(pl.multiple_of(c * b.block_d, b.block_d), b.block_d)
            update = sum(jax.lax.dot_general(dl, w_ref[ds, col], (((1,), (1,)), ((), ())),
                                             preferred_element_type=jnp.float32)
                         for col, dl in zip(cols, dls))
            _accumulate(dh_ref, (rows, ds), update, sweep == 0)
            return carry

        jax.lax.fori_loop(0, h_ref.shape[1] // b.block_d, chunk, 0)
        _sweep_barrier(b)
        return carry

    jax.lax.fori_loop(0, w_ref.shape[1] // (b.block_v * b.sweep_v), body, 0)


def _dw_kernel(h_ref, w_ref, t_ref, lse_ref, gl_ref, gt_ref, *refs, b: _Blocks):
    """One vocab block: per sweep of `sweep_t` token blocks, their h blocks^T times their
    dlogits (recomputed), added into dw one d_model slice at a time."""
    dw_ref = refs[-1]  # after the aliased initial dw, if any
    j = pl.program_id(0)
    every = pl.ds(0, b.block_v)

    def body(sweep, carry):
        rows = [pl.ds(pl.multiple_of((sweep * b.sweep_t + n) * b.block_t, b.block_t),
                      b.block_t) for n in range(b.sweep_t)]
        dls = []
        for r in rows:
            logits, ids = _tile_logits(h_ref, r, w_ref, j, b)
            dls.append(_dlogits(logits, ids, t_ref[r], lse_ref[r], gl_ref[r], gt_ref[r],
                                h_ref.dtype))

        def chunk(c, carry):
            ds = pl.ds(pl.multiple_of(c * b.block_d, b.block_d), b.block_d)
            update = sum(jax.lax.dot_general(h_ref[r, ds], dl, (((0,), (0,)), ((), ())),
                                             preferred_element_type=jnp.float32)
                         for r, dl in zip(rows, dls))
            _accumulate(dw_ref, (ds, every), update, sweep == 0)
            return carry

        jax.lax.fori_loop(0, h_ref.shape[1] // b.block_d, chunk, 0)
        _sweep_barrier(b)
        return carry

    jax.lax.fori_loop(0, h_ref.shape[0] // (b.block_t * b.sweep_t), body, 0)


def _pad_operands(h, w, targets, b: _Blocks):
    """Pad tokens to whole sweeps of block_t, vocab to whole sweeps of block_v and
    d_model to block_d."""
    tokens, d = h.shape
    vocab = w.shape[1]
    tp, vp, dp = (_ceil_to(tokens, b.block_t * b.sweep_t),
                  _ceil_to(vocab, b.block_v * b.sweep_v), _ceil_to(d, b.block_d))
    h = jnp.pad(h, ((0, tp - tokens), (0, dp - d)))
    w = jnp.pad(w.astype(h.dtype), ((0, dp - d), (0, vp - vocab)))
    targets = jnp.pad(targets.astype(jnp.int32), (0, tp - tokens))
    return h, w, targets


def _forward_call(hp, wp, tp, b: _Blocks, initial_outputs=None):
    """Padded operands in, padded (lse, target_logit) out.

    initial_outputs: optional (lse, target_logit) buffers the kernel writes into in place.
    """
    (t_pad, d_pad), v_pad = hp.shape, wp.shape[1]
    row = pl.BlockSpec((b.block_t,), lambda i: (i,))
    args, in_specs, aliases = alias_initial_outputs(
        [hp, wp, tp],
        [pl.BlockSpec((b.block_t, d_pad), lambda i: (i, 0)),
         pl.BlockSpec((d_pad, v_pad), lambda i: (0, 0)), row],
        [row, row], initial_outputs)
    return pl.pallas_call(
        functools.partial(_forward_kernel, b=b),
        grid=(t_pad // b.block_t,),
        in_specs=in_specs,
        out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct((t_pad,), jnp.float32)] * 2,
        input_output_aliases=aliases,
        compiler_params=_TRITON, interpret=b.interpret, name="linear_cross_entropy_fwd",
    )(*args)


def _pallas_forward(h, w, targets, b: _Blocks):
    tokens = h.shape[0]
    hp, wp, tp = _pad_operands(h, w, targets, b)
    lse, target_logit = _forward_call(hp, wp, tp, b)
    return lse[:tokens], target_logit[:tokens]


def _backward_calls(hp, wp, tp, vectors, b: _Blocks, initial_outputs=None):
    """Padded operands and (lse, g_lse, g_target) in, padded float32 (dh, dw) out.

    initial_outputs: optional (dh, dw) buffers the kernels write into in place.
    """
    (t_pad, d_pad), v_pad = hp.shape, wp.shape[1]
    initial_dh = initial_dw = None
    if initial_outputs is not None:
        initial_dh, initial_dw = initial_outputs[:1], initial_outputs[1:]
    row = pl.BlockSpec((b.block_t,), lambda i: (i,))
    dh_spec = pl.BlockSpec((b.block_t, d_pad), lambda i: (i, 0))
    args, in_specs, aliases = alias_initial_outputs(
        [hp, wp, tp, *vectors],
        [dh_spec, pl.BlockSpec((d_pad, v_pad), lambda i: (0, 0)), row, row, row, row],
        [dh_spec], initial_dh)
    dh = pl.pallas_call(
        functools.partial(_dh_kernel, b=b),
        grid=(t_pad // b.block_t,),
        in_specs=in_specs,
        out_specs=dh_spec,
        out_shape=jax.ShapeDtypeStruct((t_pad, d_pad), jnp.float32),
        input_output_aliases=aliases,
        compiler_params=_BACKWARD_TRITON, interpret=b.interpret,
        name="linear_cross_entropy_dh",
    )(*args)
    whole = pl.BlockSpec((t_pad,), lambda j: (0,))
    dw_spec = pl.BlockSpec((d_pad, b.block_v), lambda j: (0, j))
    args, in_specs, aliases = alias_initial_outputs(
        [hp, wp, tp, *vectors],
        [pl.BlockSpec((t_pad, d_pad), lambda j: (0, 0)),
         pl.BlockSpec((d_pad, v_pad), lambda j: (0, 0)), whole, whole, whole, whole],
        [dw_spec], initial_dw)
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, b=b),
        grid=(v_pad // b.block_v,),
        in_specs=in_specs,
        out_specs=dw_spec,
        out_shape=jax.ShapeDtypeStruct((d_pad, v_pad), jnp.float32),
        input_output_aliases=aliases,
        compiler_params=_BACKWARD_TRITON, interpret=b.interpret,
        name="linear_cross_entropy_dw",
    )(*args)
    return dh, dw


def _pallas_backward(h, w, targets, lse, g_lse, g_target, b: _Blocks):
    (tokens, d), vocab = h.shape, w.shape[1]
    hp, wp, tp = _pad_operands(h, w, targets, b)
    t_pad = hp.shape[0]
    # Padded tokens get zero cotangents, so they add nothing to dh or dw.
    vectors = [jnp.pad(x.astype(jnp.float32), (0, t_pad - tokens))
               for x in (lse, g_lse, g_target)]
    dh, dw = _backward_calls(hp, wp, tp, vectors, b)
    return dh[:tokens, :d].astype(h.dtype), dw[:d, :vocab].astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _pallas_lse(h, w, targets, b: _Blocks):
    return _pallas_forward(h, w, targets, b)


def _pallas_lse_fwd(h, w, targets, b: _Blocks):
    out = _pallas_forward(h, w, targets, b)
    return out, (h, w, targets, out[0])


def _pallas_lse_bwd(b: _Blocks, res, g):
    h, w, targets, lse = res
    dh, dw = _pallas_backward(h, w, targets, lse, g[0], g[1], b)
    return dh, dw, None


_pallas_lse.defvjp(_pallas_lse_fwd, _pallas_lse_bwd)


# ---------------------------------------------------------------------------------------


def resolve_impl(impl: str) -> str:
    """`auto` -> pallas on a GPU, xla elsewhere; other names pass through (checked)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "pallas" if _on_gpu() else "xla"
    return impl


def check_blocks(block_t: int, block_v: int, block_d: int) -> None:
    """Triton's arrays have power-of-two sizes: a ValueError naming the Pallas block that
    is not one (blocks of 8 and up lower and compile for sm_90a, `efflm bench
    compile`)."""
    for name, block in (("block_t", block_t), ("block_v", block_v), ("block_d", block_d)):
        if block < 1 or int(block) & (int(block) - 1):
            raise ValueError(f"linear_cross_entropy: {name}={block} must be a power of two "
                             f"(e.g. 16, 32, 64, 128) for the Pallas (Triton) kernels")


def linear_cross_entropy(h, w, targets, mask, *, impl: str = "auto",
                         block_v: int | None = None, block_t: int = 64, block_d: int = 64,
                         z_loss: float = 0.0, interpret: bool | None = None):
    """`cross_entropy(h @ w, targets, mask, z_loss)` without materialising `h @ w`.

    h: (tokens, d) or (batch, length, d); w: (d, vocab); targets and mask shaped like
    h without its last axis. Returns float32 `(loss_sum, z_sum, num_tokens)`.
    `block_v` vocab columns are live at a time (both fast paths; default 512 for xla,
    128 for pallas); `block_t` tokens per Pallas program (the xla path takes all tokens
    at once, so it holds (tokens x block_v) logits); `block_d` the slice of d_model a
    Pallas matmul step reads. Pallas block sizes must be powers of two (Triton;
    `check_blocks`, a ValueError otherwise).
    `interpret=None` interprets the Pallas kernels unless on a GPU.
    Under a multi-device mesh, `partitioned_linear_cross_entropy` runs it per batch shard.
    """
    impl = resolve_impl(impl)
    if impl == "naive":
        logits = jnp.dot(h, w.astype(h.dtype))
        return cross_entropy(logits, targets, mask, z_loss)
    h2 = h.reshape(-1, h.shape[-1])
    targets = targets.reshape(-1).astype(jnp.int32)
    mask = mask.reshape(-1).astype(jnp.float32)
    if impl == "xla":
        lse, target_logit = _xla_lse(h2, w, targets, int(block_v or 512))
    else:
        if interpret is None:
            interpret = not _on_gpu()
        check_blocks(block_t, block_v or 128, block_d)
        d = h2.shape[1]
        block_v = int(block_v or 128)
        blocks = _Blocks(vocab=w.shape[1], block_t=int(block_t), block_v=block_v,
                         block_d=min(int(block_d), max(16, pl.next_power_of_2(d))),
                         interpret=bool(interpret),
                         sweep_v=min(sweep_blocks(h2.dtype), -(-w.shape[1] // block_v)),
                         sweep_t=min(sweep_blocks(h2.dtype), -(-h2.shape[0] // int(block_t))))
        lse, target_logit = _pallas_lse(h2, w, targets, blocks)
    loss_sum = jnp.sum((lse - target_logit) * mask)
    z_sum = jnp.sum(jnp.square(lse) * mask) * z_loss
    return loss_sum, z_sum, jnp.sum(mask)


def partitioned_linear_cross_entropy(h, w, targets, mask, **kwargs):
    """`linear_cross_entropy` under the active mesh: the kernels run once per batch shard.

    h: (batch, length, d), targets and mask (batch, length), split over the mesh axes of
    the logical `batch` axis; w is whole on every device (gathered if it was split).
    Each shard's sums are added across shards, and the gradient of w with them. Without
    a mesh of more than one device this is `linear_cross_entropy`.
    """
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.get_abstract_mesh()
    batch = () if mesh.empty else mesh_axes_of(mesh, "batch", h.shape[0])
    if not batch:
        return linear_cross_entropy(h, w, targets, mask, **kwargs)
    spec = P(batch if len(batch) > 1 else batch[0])

    def shard(h, w, targets, mask):
        terms = linear_cross_entropy(h, w, targets, mask, **kwargs)
        return tuple(jax.lax.psum(x, batch) for x in terms)

    return jax.shard_map(shard, mesh=mesh, in_specs=(spec, P(), spec, spec),
                         out_specs=(P(), P(), P()), check_vma=False)(h, w, targets, mask)
