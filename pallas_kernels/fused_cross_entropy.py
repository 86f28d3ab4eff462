"""Linear cross-entropy without the (tokens x vocab) logits, after "Cut Your Losses in
Large-Vocabulary Language Models" (Cut Cross-Entropy).

`linear_cross_entropy(h, w, targets, mask)` returns what
`efflm.train.loss.cross_entropy(h @ w, targets, mask)` returns — `(loss_sum, z_sum,
num_tokens)` in float32 — but streams over blocks of the vocabulary: an online
log-sum-exp in the forward pass and, in a `custom_vjp` backward pass, the logits of each
block recomputed and turned into that block's share of dh and dw. Neither pass holds
more than one (tokens x block_v) block of logits.

    impl="naive"   the reference: full logits, then `cross_entropy` (plain jax.numpy)
    impl="xla"     a `fori_loop` over vocab blocks, slicing w in place (the CPU path)
    impl="pallas"  Triton-style Pallas kernels: a grid over token blocks, a loop over
                   vocab blocks (forward and dh), a grid over vocab blocks and a loop
                   over token blocks (dw); interpreted off GPU
    impl="auto"    pallas on a GPU, xla elsewhere

Both fast paths share the split: a custom_vjp primitive gives, per token, the
log-sum-exp and the target's logit; the masked sums and the z-loss are plain jax.numpy
on those (T,) vectors, so their gradients come from ordinary autodiff.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from efflm.train.loss import cross_entropy

# Lower GPU calls through Triton (jax's default for GPU pallas_call is Mosaic GPU).
_TRITON = plgpu.CompilerParams(num_warps=4, num_stages=2)

IMPLS = ("auto", "naive", "xla", "pallas")


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _ceil_to(n: int, k: int) -> int:
    return -(-n // k) * k


def _dot_f32(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


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


def _kernel_logits(h, w_ref, j, vocab: int, block_v: int):
    w_block = w_ref[:, pl.ds(j * block_v, block_v)]
    logits = _dot_f32(h, w_block)
    cols = j * block_v + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    return jnp.where(cols < vocab, logits, -jnp.inf), cols, w_block


def _forward_kernel(h_ref, w_ref, t_ref, *refs, vocab, block_v):
    # refs: [the two aliased initial outputs], lse, target logit
    lse_ref, tl_ref = refs[-2:]
    h = h_ref[...]
    targets = t_ref[...]
    block_t = h.shape[0]

    def body(j, carry):
        m, s, target_logit = carry
        logits, cols, _ = _kernel_logits(h, w_ref, j, vocab, block_v)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
        hit = cols == targets[:, None]
        target_logit = target_logit + jnp.sum(jnp.where(hit, logits, 0.0), axis=1)
        return m_new, s, target_logit

    init = (jnp.full((block_t,), -jnp.inf, jnp.float32), jnp.zeros((block_t,), jnp.float32),
            jnp.zeros((block_t,), jnp.float32))
    m, s, target_logit = jax.lax.fori_loop(0, pl.cdiv(vocab, block_v), body, init)
    lse_ref[...] = m + jnp.log(s)
    tl_ref[...] = target_logit


def _dlogits(logits, cols, targets, lse, g_lse, g_target):
    hit = cols == targets[:, None]
    return (g_lse[:, None] * jnp.exp(logits - lse[:, None])
            + jnp.where(hit, g_target[:, None], 0.0))


def _dh_kernel(h_ref, w_ref, t_ref, lse_ref, gl_ref, gt_ref, *refs, vocab, block_v):
    dh_ref = refs[-1]  # after the aliased initial dh, if any
    h = h_ref[...]
    targets, lse, g_lse, g_target = t_ref[...], lse_ref[...], gl_ref[...], gt_ref[...]

    def body(j, dh):
        logits, cols, w_block = _kernel_logits(h, w_ref, j, vocab, block_v)
        dlogits = _dlogits(logits, cols, targets, lse, g_lse, g_target)
        return dh + jax.lax.dot_general(
            dlogits, w_block.astype(jnp.float32), (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32)

    dh = jax.lax.fori_loop(0, pl.cdiv(vocab, block_v), body,
                           jnp.zeros(h.shape, jnp.float32))
    dh_ref[...] = dh.astype(dh_ref.dtype)


def _dw_kernel(h_ref, w_ref, t_ref, lse_ref, gl_ref, gt_ref, *refs, vocab, block_v,
               block_t, num_token_blocks):
    dw_ref = refs[-1]  # after the aliased initial dw, if any
    j = pl.program_id(0)

    def body(i, dw):
        rows = pl.ds(i * block_t, block_t)
        h = h_ref[rows, :]
        logits, cols, _ = _kernel_logits(h, w_ref, j, vocab, block_v)
        dlogits = _dlogits(logits, cols, t_ref[rows], lse_ref[rows], gl_ref[rows],
                           gt_ref[rows])
        return dw + jax.lax.dot_general(
            h.astype(jnp.float32), dlogits, (((0,), (0,)), ((), ())),
            preferred_element_type=jnp.float32)

    dw = jax.lax.fori_loop(0, num_token_blocks, body, jnp.zeros(dw_ref.shape, jnp.float32))
    dw_ref[...] = dw.astype(dw_ref.dtype)


def _pad_operands(h, w, targets, block_t, block_v):
    """Pad tokens to block_t, vocab to block_v and d_model to a power of two (Triton)."""
    tokens, d = h.shape
    vocab = w.shape[1]
    tp, vp, dp = _ceil_to(tokens, block_t), _ceil_to(vocab, block_v), pl.next_power_of_2(d)
    h = jnp.pad(h, ((0, tp - tokens), (0, dp - d)))
    w = jnp.pad(w, ((0, dp - d), (0, vp - vocab)))
    targets = jnp.pad(targets.astype(jnp.int32), (0, tp - tokens))
    return h, w, targets


def _alias_initial_outputs(args, in_specs, out_specs, initial_outputs):
    """Append `initial_outputs` as inputs aliased to the outputs (for tests: filled with NaN,
    they show every element is written). None leaves the call as it is."""
    if initial_outputs is None:
        return args, in_specs, {}
    aliases = {len(args) + n: n for n in range(len(initial_outputs))}
    return [*args, *initial_outputs], [*in_specs, *out_specs], aliases


def _forward_call(hp, wp, tp, vocab, block_t, block_v, interpret, initial_outputs=None):
    """Padded operands in, padded (lse, target_logit) out.

    initial_outputs: optional (lse, target_logit) buffers the kernel writes into in place.
    """
    (t_pad, d_pad), v_pad = hp.shape, wp.shape[1]
    row = pl.BlockSpec((block_t,), lambda i: (i,))
    args, in_specs, aliases = _alias_initial_outputs(
        [hp, wp, tp],
        [pl.BlockSpec((block_t, d_pad), lambda i: (i, 0)),
         pl.BlockSpec((d_pad, v_pad), lambda i: (0, 0)), row],
        [row, row], initial_outputs)
    return pl.pallas_call(
        functools.partial(_forward_kernel, vocab=vocab, block_v=block_v),
        grid=(t_pad // block_t,),
        in_specs=in_specs,
        out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct((t_pad,), jnp.float32)] * 2,
        input_output_aliases=aliases,
        compiler_params=_TRITON, interpret=interpret, name="linear_cross_entropy_fwd",
    )(*args)


def _pallas_forward(h, w, targets, block_t, block_v, interpret):
    tokens, vocab = h.shape[0], w.shape[1]
    hp, wp, tp = _pad_operands(h, w, targets, block_t, block_v)
    lse, target_logit = _forward_call(hp, wp, tp, vocab, block_t, block_v, interpret)
    return lse[:tokens], target_logit[:tokens]


def _backward_calls(hp, wp, tp, vectors, vocab, block_t, block_v, interpret,
                    initial_outputs=None):
    """Padded operands and (lse, g_lse, g_target) in, padded (dh, dw) out.

    initial_outputs: optional (dh, dw) buffers the kernels write into in place.
    """
    (t_pad, d_pad), v_pad = hp.shape, wp.shape[1]
    initial_dh = initial_dw = None
    if initial_outputs is not None:
        initial_dh, initial_dw = initial_outputs[:1], initial_outputs[1:]
    row = pl.BlockSpec((block_t,), lambda i: (i,))
    dh_spec = pl.BlockSpec((block_t, d_pad), lambda i: (i, 0))
    args, in_specs, aliases = _alias_initial_outputs(
        [hp, wp, tp, *vectors],
        [pl.BlockSpec((block_t, d_pad), lambda i: (i, 0)),
         pl.BlockSpec((d_pad, v_pad), lambda i: (0, 0)), row, row, row, row],
        [dh_spec], initial_dh)
    dh = pl.pallas_call(
        functools.partial(_dh_kernel, vocab=vocab, block_v=block_v),
        grid=(t_pad // block_t,),
        in_specs=in_specs,
        out_specs=dh_spec,
        out_shape=jax.ShapeDtypeStruct((t_pad, d_pad), hp.dtype),
        input_output_aliases=aliases,
        compiler_params=_TRITON, interpret=interpret, name="linear_cross_entropy_dh",
    )(*args)
    whole = pl.BlockSpec((t_pad,), lambda j: (0,))
    dw_spec = pl.BlockSpec((d_pad, block_v), lambda j: (0, j))
    args, in_specs, aliases = _alias_initial_outputs(
        [hp, wp, tp, *vectors],
        [pl.BlockSpec((t_pad, d_pad), lambda j: (0, 0)),
         pl.BlockSpec((d_pad, v_pad), lambda j: (0, 0)), whole, whole, whole, whole],
        [dw_spec], initial_dw)
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, vocab=vocab, block_v=block_v, block_t=block_t,
                          num_token_blocks=t_pad // block_t),
        grid=(v_pad // block_v,),
        in_specs=in_specs,
        out_specs=dw_spec,
        out_shape=jax.ShapeDtypeStruct((d_pad, v_pad), wp.dtype),
        input_output_aliases=aliases,
        compiler_params=_TRITON, interpret=interpret, name="linear_cross_entropy_dw",
    )(*args)
    return dh, dw


def _pallas_backward(h, w, targets, lse, g_lse, g_target, block_t, block_v, interpret):
    (tokens, d), vocab = h.shape, w.shape[1]
    hp, wp, tp = _pad_operands(h, w, targets, block_t, block_v)
    t_pad = hp.shape[0]
    # Padded tokens get zero cotangents, so they add nothing to dh or dw.
    vectors = [jnp.pad(x.astype(jnp.float32), (0, t_pad - tokens))
               for x in (lse, g_lse, g_target)]
    dh, dw = _backward_calls(hp, wp, tp, vectors, vocab, block_t, block_v, interpret)
    return dh[:tokens, :d], dw[:d, :vocab]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _pallas_lse(h, w, targets, block_t, block_v, interpret):
    return _pallas_forward(h, w, targets, block_t, block_v, interpret)


def _pallas_lse_fwd(h, w, targets, block_t, block_v, interpret):
    out = _pallas_forward(h, w, targets, block_t, block_v, interpret)
    return out, (h, w, targets, out[0])


def _pallas_lse_bwd(block_t, block_v, interpret, res, g):
    h, w, targets, lse = res
    dh, dw = _pallas_backward(h, w, targets, lse, g[0], g[1], block_t, block_v, interpret)
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


def linear_cross_entropy(h, w, targets, mask, *, impl: str = "auto",
                         block_v: int | None = None, block_t: int = 64, z_loss: float = 0.0,
                         interpret: bool | None = None):
    """`cross_entropy(h @ w, targets, mask, z_loss)` without materialising `h @ w`.

    h: (tokens, d) or (batch, length, d); w: (d, vocab); targets and mask shaped like
    h without its last axis. Returns float32 `(loss_sum, z_sum, num_tokens)`.
    `block_v` vocab columns are live at a time (both fast paths; default 512 for xla,
    128 for pallas); `block_t` tokens per Pallas program (the xla path takes all tokens
    at once, so it holds (tokens x block_v) logits). Pallas block sizes must be powers
    of two (Triton). `interpret=None` interprets the Pallas kernels unless on a GPU.
    The Pallas kernels are not partitioned: under a multi-device mesh use xla.
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
        lse, target_logit = _pallas_lse(h2, w, targets, int(block_t), int(block_v or 128),
                                        bool(interpret))
    loss_sum = jnp.sum((lse - target_logit) * mask)
    z_sum = jnp.sum(jnp.square(lse) * mask) * z_loss
    return loss_sum, z_sum, jnp.sum(mask)
