"""The gated delta rule ("Gated Delta Networks: Improving Mamba2 with Delta Rule"), the
recurrence behind `model.attention.kind=gated_deltanet`:

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t

`gated_delta_rule_recurrent` runs it one token at a time (the reference);
`gated_delta_rule_chunked` is the chunked form below, in plain JAX (XLA), and
`gated_delta_rule_pallas` the same form as Pallas (Triton) kernels, forward and backward
(further down). All restart the state at every packed segment, take an initial state and
return the final one.

The chunked form. Writing the update as S_t = alpha_t S_{t-1} + k_t u_t^T with
u_t = beta_t (v_t - alpha_t S_{t-1}^T k_t), and g the cumulative log decay inside a
chunk of C tokens entered with state S0, the u_t of a chunk solve one unit lower
triangular system (the UT transform with the decays folded in):

    (I + A) U = diag(beta) V - diag(beta exp(g)) K S0,
    A_ij = beta_i exp(g_i - g_j) k_i . k_j   for j < i (in the same segment), else 0

so U = U0 - W S0 with U0 = T V, W = T diag(exp(g)) K, T = (I + A)^-1 diag(beta): the WY
form of the chunk's product of (I - beta k k^T) factors. U0 and W need no state, so
every chunk's are computed at once (one forward substitution with dv + dk
right-hand sides); a scan over chunks then carries the state:

    U = U0 - W S,  O = diag(exp(g)) Q S + (Q K^T * exp(g_i - g_j))_{j <= i} U,
    S <- exp(g_C) S + (K * exp(g_C - g))^T U.

Every exponent is masked to j <= i before exp, so none is positive. A segment start
acts as alpha = 0: terms across a boundary are masked, the incoming state reaches
only its own segment's tokens, and a chunk with a boundary passes on only its last
segment's keys.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from efflm.pallas_kernels.common import mm
from efflm.pallas_kernels.linear_attention import (
    check_inputs as check_linear_inputs,
)
from efflm.pallas_kernels.linear_attention import (
    chunk_decays,
    compiled_chunk_problem,
    from_chunks,
    kernel_layout,
    kernel_segments,
    padded_head_dim,
    segment_chunks,
    segment_index,
    segment_starts,
    to_chunks,
)


def check_inputs(q, k, v, log_alpha, beta, initial_state):
    """Raise ValueError unless the shapes fit (see `gated_delta_rule_recurrent`)."""
    check_linear_inputs(q, k, v, None, initial_state)
    for name, a in (("log_alpha", log_alpha), ("beta", beta)):
        if a.shape != q.shape[:3]:
            raise ValueError(f"{name} must be (batch, length, heads) = {q.shape[:3]}; "
                             f"got {a.shape}")


def _initial(q, v, initial_state):
    if initial_state is None:
        return jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[-1]), jnp.float32)
    return initial_state.astype(jnp.float32)


def gated_delta_rule_recurrent(q, k, v, log_alpha, beta, *, initial_state=None,
                               segment_ids=None):
    """The obviously correct form: one state update per token, the state zeroed at each
    segment start. q, k (batch, length, heads, dk); v (..., dv); log_alpha (<= 0) and
    beta (batch, length, heads). Returns (out in v's dtype, final float32 state)."""
    check_inputs(q, k, v, log_alpha, beta, initial_state)
    state = _initial(q, v, initial_state)
    time_first = lambda a: jnp.moveaxis(a.astype(jnp.float32), 1, 0)  # noqa: E731
    starts = (jnp.zeros(q.shape[:2], bool) if segment_ids is None
              else segment_starts(segment_ids))

    def step(state, inputs):
        q_t, k_t, v_t, g_t, b_t, start = inputs  # (batch, heads, d); g_t, b_t (batch, heads)
        state = jnp.where(start[:, None, None, None], 0.0, state)
        read = jnp.einsum("bhk,bhkv->bhv", k_t, state)  # what S returns for k_t
        state = (jnp.exp(g_t)[..., None, None]
                 * (state - b_t[..., None, None] * k_t[..., :, None] * read[..., None, :])
                 + b_t[..., None, None] * k_t[..., :, None] * v_t[..., None, :])
        return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)

    state, out = jax.lax.scan(step, state, tuple(map(time_first, (q, k, v, log_alpha, beta)))
                              + (jnp.moveaxis(starts, 1, 0),))
    return jnp.moveaxis(out, 0, 1).astype(v.dtype), state


def _forward_substitution(a, b):
    """X with (I + a) X = b for a strictly lower triangular (..., m, m), b (..., m, n):
    one row at a time, each row against all m (the rows not yet solved are zero)."""

    def step(x, inputs):
        i, a_i, b_i = inputs
        x_i = b_i - jnp.einsum("...j,...jn->...n", a_i, x)
        return jax.lax.dynamic_update_index_in_dim(x, x_i, i, axis=x.ndim - 2), None

    rows = (jnp.arange(a.shape[-1]), jnp.moveaxis(a, -2, 0), jnp.moveaxis(b, -2, 0))
    return jax.lax.scan(step, jnp.zeros_like(b), rows)[0]


@jax.custom_vjp
def unit_lower_solve(a, b):
    """(I + a)^-1 b for a strictly lower triangular (..., m, m) and b (..., m, n), by
    forward substitution (XLA:CPU runs `jax.lax.linalg.triangular_solve` on many small
    systems far slower). The backward pass is one more substitution, with the transposed
    triangle in reversed order; a's gradient is kept to its strict lower triangle."""
    return _forward_substitution(a, b)


def _unit_lower_solve_fwd(a, b):
    x = _forward_substitution(a, b)
    return x, (a, x)


def _unit_lower_solve_bwd(residuals, dx):
    a, x = residuals
    flip = lambda m: jnp.flip(m, axis=(-2, -1))  # noqa: E731
    # (I + a)^-T is upper triangular: reversing rows and columns makes it lower.
    db = jnp.flip(_forward_substitution(flip(jnp.swapaxes(a, -1, -2)), jnp.flip(dx, -2)), -2)
    m = a.shape[-1]
    strict = jnp.arange(m)[:, None] > jnp.arange(m)[None, :]
    return jnp.where(strict, -jnp.einsum("...in,...jn->...ij", db, x), 0.0), db


unit_lower_solve.defvjp(_unit_lower_solve_fwd, _unit_lower_solve_bwd)


def gated_delta_rule_chunked(q, k, v, log_alpha, beta, *, chunk: int = 64,
                             initial_state=None, segment_ids=None):
    """The chunked form (module docstring): the same arguments and results as
    `gated_delta_rule_recurrent`, any length (zero-padded to whole chunks, which leaves
    the state unchanged: padded tokens have beta = 0 and log_alpha = 0)."""
    check_inputs(q, k, v, log_alpha, beta, initial_state)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens; got {chunk}")
    state = _initial(q, v, initial_state)
    batch, length = q.shape[:2]
    dv = v.shape[-1]
    qc, kc, vc = (to_chunks(a.astype(jnp.float32), chunk) for a in (q, k, v))
    g = jnp.cumsum(to_chunks(log_alpha.astype(jnp.float32), chunk), axis=-1)
    bc = to_chunks(beta.astype(jnp.float32), chunk)  # (chunks, batch, heads, chunk)
    seg, before = segment_chunks(segment_ids, batch, length, chunk)  # (n, b, 1, C|1)
    rows = jnp.arange(chunk)
    keep = (rows[:, None] >= rows[None, :]) & (seg[..., :, None] == seg[..., None, :])
    strict = keep & (rows[:, None] != rows[None, :])
    decay = jnp.exp(jnp.where(keep, g[..., :, None] - g[..., None, :], -jnp.inf))
    a = jnp.where(strict, bc[..., :, None] * jnp.einsum("nbhik,nbhjk->nbhij", kc, kc)
                  * decay, 0.0)
    carried = jnp.where(seg == before, jnp.exp(g), 0.0)  # the incoming state's decay
    rhs = jnp.concatenate([bc[..., None] * vc, (bc * carried)[..., None] * kc], axis=-1)
    solved = unit_lower_solve(a, rhs)  # (I + A)^-1 rhs
    u0, w = solved[..., :dv], solved[..., dv:]
    scores = jnp.where(keep, jnp.einsum("nbhik,nbhjk->nbhij", qc, kc) * decay, 0.0)
    q_carried = qc * carried[..., None]
    g_last, seg_last = g[..., -1:], seg[..., -1:]
    k_tail = kc * jnp.where(seg == seg_last, jnp.exp(g_last - g), 0.0)[..., None]
    kept = jnp.where(seg_last == before, jnp.exp(g_last), 0.0)  # (n, b, h, 1)

    def step(state, inputs):
        u0, w, scores, q_carried, k_tail, kept = inputs
        u = u0 - jnp.einsum("bhck,bhkv->bhcv", w, state)
        out = (jnp.einsum("bhck,bhkv->bhcv", q_carried, state)
               + jnp.einsum("bhij,bhjv->bhiv", scores, u))
        state = kept[..., None] * state + jnp.einsum("bhck,bhcv->bhkv", k_tail, u)
        return state, out

    state, out = jax.lax.scan(step, state, (u0, w, scores, q_carried, k_tail, kept))
    return from_chunks(out, length).astype(v.dtype), state


# ----------------------------------------------------------------------------
# Pallas: seven Triton kernels, each small enough to keep its tiles in registers
# (`efflm bench compile`: no spills at head dim 64, chunk 64). Two walk the chunks, one
# program per (batch row, head, 32 value columns) with a float32 state; the others take
# one chunk per program, whole C x C tiles. With the module docstring's notation (c:
# the incoming state's decay per token, tau: each key's decay to the chunk's end,
# kappa: the state's through the chunk, P the decayed causal scores), a chunk's
# U = T R, T = (I + A)^-1, R = diag(beta) (V - diag(c) K S):
#
#   tril       T, by blocks of `tril_block` (32) rows: forward substitution inside
#              the diagonal blocks (row by row, masked: Triton tiles cannot be
#              indexed), matmuls for the blocks below them;
#   states     (walk) U = T R, S <- kappa S + (diag(tau) K)^T U; saves U and the state
#              entering every chunk (the last entry: the final state);
#   fwd        O = diag(c) Q S + P U;
#   bwd_du     P^T dO, U's cotangent through O;
#   state_bwd  (walk, in reverse) carries dS', the cotangent of the state a chunk passes
#              on: dU = P^T dO + diag(tau) K dS', dR = T^T dU,
#              dS = kappa dS' + Q^T diag(c) dO - K^T diag(beta c) dR; saves dR and dS';
#   bwd_scores dq, and dk and d g through O (dP = dO U^T);
#   bwd_values dv, d beta, and dk and d g through R, A (dA = -dR U^T, strictly lower)
#              and the state passed on.
#
# Every decay exp(g_i - g_j) passes d g_i += e, d g_j -= e, with e its term times its
# cotangent. The wrapper adds the chunk's end decay's (<dS', S'> at its last row), sums
# the value-column programs' dq, dk, d beta and d g, and turns d g (g cumulative in a
# chunk) into d log_alpha. T, U and the states are the backward's residuals.

_DELTA_TRITON = plgpu.CompilerParams(num_warps=8, num_stages=1)


def delta_value_block(dk: int, dv: int) -> int:
    """Value columns per program: 32, or 16 past dk = 64 (the key tiles take more
    registers; `efflm bench compile`: no spills at dk 128, chunk 64), or all dv if
    fewer."""
    block = 32 if dk <= 64 else 16
    return block if dv > block and dv % block == 0 else dv


def _unit_lower_inverse(a):
    """(I + a)^-1 for a strictly lower triangular (n, n) tile: row i of the inverse is
    e_i - a_i X, X the rows above it (those below are still zero)."""
    n = a.shape[0]
    rows = jnp.arange(n)[:, None]
    eye = jnp.where(rows == jnp.arange(n)[None, :], 1.0, 0.0)

    def row(i, x):
        a_i = jnp.sum(jnp.where(rows == i, a, 0.0), axis=0)
        x_i = jnp.sum(a_i[:, None] * x, axis=0)
        return jnp.where(rows == i, eye - x_i[None, :], x)

    return jax.lax.fori_loop(0, n, row, jnp.zeros_like(a))


def _decay(g_ref, seg_ref, start, chunk, strict):
    """exp(g_i - g_j) over the chunk at `start` where token j reaches token i (same
    segment, j <= i; j < i if `strict`), else 0."""
    rows = pl.ds(start, chunk)
    g, seg = g_ref[rows], seg_ref[rows]
    within = jnp.arange(chunk)
    order = (within[:, None] > within[None, :]) if strict else (within[:, None] >= within[None, :])
    keep = (seg[:, None] == seg[None, :]) & order
    return jnp.exp(jnp.where(keep, g[:, None] - g[None, :], -jnp.inf))


def _scores(q, k, g_ref, seg_ref, start, chunk):
    """P: q_i . k_j exp(g_i - g_j) where token j reaches token i, else 0."""
    return _decay(g_ref, seg_ref, start, chunk, False) * mm(q, k, trans_b=True)


def tril_block(chunk: int) -> int:
    """Rows per block of the triangular solve: 32, or the whole chunk if not more or not
    a multiple (blocks of 16 spill registers on sm_90a, the whole chunk of 64 takes four
    times the substitution work)."""
    return 32 if chunk > 32 and chunk % 32 == 0 else chunk


def _tril_kernel(k_ref, g_ref, beta_ref, seg_ref, t_ref, *, chunk: int):
    """T = (I + A)^-1 for this program's chunk, A_ij = beta_i exp(g_i - g_j) k_i . k_j
    (j < i, same segment), by blocks of rows: the diagonal blocks' inverses by forward
    substitution, each block below them from the blocks above:
    T_rm = -T_rr sum_{m <= j < r} A_rj T_jm."""
    start = pl.program_id(2) * chunk
    block = tril_block(chunk)
    rows = lambda r: pl.ds(r * block, block)  # noqa: E731
    tokens = lambda r: pl.ds(start + r * block, block)  # noqa: E731
    t = {}
    for r in range(chunk // block):
        g, seg = g_ref[tokens(r)], seg_ref[tokens(r)]
        k = k_ref[rows(r), :]  # the input dtype: bf16 products are exact in float32
        a = {}
        for m in range(r + 1):
            keep = seg[:, None] == seg_ref[tokens(m)][None, :]
            if m == r:
                within = jnp.arange(block)
                keep = keep & (within[:, None] > within[None, :])
            decay = jnp.exp(jnp.where(keep, g[:, None] - g_ref[tokens(m)][None, :], -jnp.inf))
            a[m] = (beta_ref[tokens(r)][:, None] * decay
                    * mm(k, k_ref[rows(m), :], trans_b=True))
        t[r, r] = _unit_lower_inverse(a[r])
        for m in range(r):
            t[r, m] = -mm(t[r, r], sum(mm(a[j], t[j, m]) for j in range(m, r)))
        for m in range(chunk // block):
            t_ref[rows(r), rows(m)] = t[r, m] if m <= r else jnp.zeros((block, block))


def _states_kernel(k_ref, v_ref, g_ref, beta_ref, seg_ref, t_ref, s0_ref, u_ref,
                   states_ref, *, chunk: int, num_chunks: int):
    """The walk over the chunks: U = T R for each, and the state entering each (the
    last entry: the final state)."""
    def body(c, state):
        start = c * chunk
        rows = pl.ds(start, chunk)
        k, v = k_ref[rows, :].astype(jnp.float32), v_ref[rows, :].astype(jnp.float32)
        carried, tail, kappa = chunk_decays(g_ref, seg_ref, start, chunk)
        r = beta_ref[rows][:, None] * (v - carried[:, None] * mm(k, state))
        u = mm(t_ref[rows, :], r)
        states_ref[c] = state
        u_ref[rows, :] = u
        return kappa * state + mm(tail[:, None] * k, u, trans_a=True)

    states_ref[num_chunks] = jax.lax.fori_loop(0, num_chunks, body,
                                               s0_ref[...].astype(jnp.float32))


def _output_kernel(q_ref, k_ref, g_ref, seg_ref, state_ref, u_ref, out_ref, *, chunk: int):
    """O = diag(c) Q S + P U for one chunk, S the state entering it."""
    start = pl.program_id(2) * chunk
    q, k = q_ref[...].astype(jnp.float32), k_ref[...].astype(jnp.float32)
    carried, _, _ = chunk_decays(g_ref, seg_ref, start, chunk)
    scores = _scores(q, k, g_ref, seg_ref, start, chunk)
    out_ref[...] = (carried[:, None] * mm(q, state_ref[...])
                    + mm(scores, u_ref[...])).astype(out_ref.dtype)


def _state_backward_kernel(q_ref, k_ref, g_ref, beta_ref, seg_ref, t_ref, d_out_ref,
                           d_u_ref, d_final_ref, d_r_ref, d_states_ref, d_initial_ref, *,
                           chunk: int, num_chunks: int):
    """The walk back over the chunks carrying the state's cotangent: dR for each, and
    the cotangent of the state each passes on."""
    def body(i, d_state):
        c = num_chunks - 1 - i
        start = c * chunk
        rows = pl.ds(start, chunk)
        d_states_ref[c] = d_state
        q, k = (r[rows, :].astype(jnp.float32) for r in (q_ref, k_ref))
        d_out = d_out_ref[rows, :]
        carried, tail, kappa = chunk_decays(g_ref, seg_ref, start, chunk)
        d_u = d_u_ref[rows, :] + tail[:, None] * mm(k, d_state)
        d_r = mm(t_ref[rows, :], d_u, trans_a=True)
        d_r_ref[rows, :] = d_r
        return (kappa * d_state + mm(q, carried[:, None] * d_out, trans_a=True)
                - mm(k, (beta_ref[rows] * carried)[:, None] * d_r, trans_a=True))

    d_initial_ref[...] = jax.lax.fori_loop(0, num_chunks, body,
                                           d_final_ref[...].astype(jnp.float32))


def _scores_transposed_kernel(q_ref, k_ref, g_ref, seg_ref, d_out_ref, d_u_ref, *,
                              chunk: int):
    """P^T dO for one chunk: U's cotangent through O, before the state's share."""
    start = pl.program_id(2) * chunk
    q, k = q_ref[...].astype(jnp.float32), k_ref[...].astype(jnp.float32)
    scores = _scores(q, k, g_ref, seg_ref, start, chunk)
    d_u_ref[...] = mm(scores, d_out_ref[...], trans_a=True)


def _grads_scores_kernel(q_ref, k_ref, g_ref, seg_ref, state_ref, u_ref, d_out_ref,
                         dq_ref, dk_ref, dg_ref, *, chunk: int):
    """One chunk's gradients through O = diag(c) Q S + P U (the kernel comment above),
    with S the state entering it: dq, and this part of dk and d g."""
    start = pl.program_id(2) * chunk
    q, k = q_ref[...].astype(jnp.float32), k_ref[...].astype(jnp.float32)
    u, d_out, state = u_ref[...], d_out_ref[...], state_ref[...]
    carried, _, _ = chunk_decays(g_ref, seg_ref, start, chunk)
    scores = _scores(q, k, g_ref, seg_ref, start, chunk)
    d_scores = mm(d_out, u, trans_b=True)
    d_decay = d_scores * scores  # each decayed product's term times its cotangent
    dg_ref[...] = (jnp.sum(d_decay, axis=1) - jnp.sum(d_decay, axis=0)
                   + carried * jnp.sum(d_out * mm(q, state), axis=1))
    d_qk = d_scores * _decay(g_ref, seg_ref, start, chunk, False)  # again: fewer live tiles
    dq_ref[...] = carried[:, None] * mm(d_out, state, trans_b=True) + mm(d_qk, k)
    dk_ref[...] = mm(d_qk, q, trans_a=True)


def _grads_values_kernel(k_ref, v_ref, g_ref, beta_ref, seg_ref, state_ref, d_next_ref,
                         u_ref, d_r_ref, dk_ref, dv_ref, d_beta_ref, dg_ref, *, chunk: int):
    """One chunk's gradients through U = (I + A)^-1 R and the state it passes on: dv,
    d beta, and the rest of dk and d g (but the chunk's end decay's: the wrapper's).
    state: the state entering the chunk, d_next the cotangent of the one it passes on."""
    start = pl.program_id(2) * chunk
    k, v = k_ref[...].astype(jnp.float32), v_ref[...].astype(jnp.float32)
    u, d_r, state, d_next = u_ref[...], d_r_ref[...], state_ref[...], d_next_ref[...]
    beta = beta_ref[pl.ds(start, chunk)]
    carried, tail, _ = chunk_decays(g_ref, seg_ref, start, chunk)
    decay = _decay(g_ref, seg_ref, start, chunk, True)
    d_a = -mm(d_r, u, trans_b=True) * decay  # d A times the decay, strictly lower
    d_gram = d_a * mm(k, k, trans_b=True)  # d A * A / beta
    k_state = mm(k, state)
    d_beta_ref[...] = (jnp.sum(d_r * (v - carried[:, None] * k_state), axis=1)
                       + jnp.sum(d_gram, axis=1))
    d_decay = beta[:, None] * d_gram  # d A * A
    dg_ref[...] = (jnp.sum(d_decay, axis=1) - jnp.sum(d_decay, axis=0)
                   - carried * beta * jnp.sum(d_r * k_state, axis=1)
                   - tail * jnp.sum(mm(k, d_next) * u, axis=1))
    d_kk = beta[:, None] * d_a
    dk_ref[...] = (mm(d_kk + d_kk.T, k) + tail[:, None] * mm(u, d_next, trans_b=True)
                   - (beta * carried)[:, None] * mm(d_r, state, trans_b=True))
    dv_ref[...] = (beta[:, None] * d_r).astype(dv_ref.dtype)


def _spec(block, index):
    """A BlockSpec of `block` (None: a squeezed dim) over any grid: `index` maps
    (batch, head, third[, fourth]) grid indices to block indices."""
    return pl.BlockSpec(block, lambda *grid: index(*grid))


def _sequential_specs(padded, dk, chunk, block_dv):
    """Specs over the grid (batch, heads, value-column slices) of the kernels that walk
    the chunks: whole arrays, or this program's value columns."""
    whole = lambda *tail: _spec((None, None, *tail),  # noqa: E731
                                lambda i, j, s: (i, j) + (0,) * len(tail))
    sliced = lambda *tail: _spec((None, None, *tail),  # noqa: E731
                                 lambda i, j, s: (i, j) + (0,) * (len(tail) - 1) + (s,))
    return dict(keys=whole(padded, dk), values=sliced(padded, block_dv),
                per_token=whole(padded), seg=_spec((None, padded), lambda i, j, s: (i, 0)),
                tril=whole(padded, chunk), state=sliced(dk, block_dv),
                states=lambda n: sliced(n, dk, block_dv))


def _tril_call(kh, g, bh, seg, chunk, interpret):
    batch, heads, padded, dk = kh.shape
    whole = lambda *tail: _spec((None, None, *tail),  # noqa: E731
                                lambda i, j, c: (i, j) + (0,) * len(tail))
    return pl.pallas_call(
        functools.partial(_tril_kernel, chunk=chunk),
        grid=(batch, heads, padded // chunk),
        in_specs=[_spec((None, None, chunk, dk), lambda i, j, c: (i, j, c, 0)),
                  whole(padded), whole(padded), _spec((None, padded), lambda i, j, c: (i, 0))],
        out_specs=_spec((None, None, chunk, chunk), lambda i, j, c: (i, j, c, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, heads, padded, chunk), jnp.float32),
        interpret=interpret, compiler_params=_DELTA_TRITON, name="gated_delta_rule_tril",
    )(kh, g, bh, seg)


def _forward_calls(qh, kh, vh, g, bh, seg, tril, initial_state, chunk, block_dv,
                   interpret):
    """The forward kernels on heads-first arrays padded to whole chunks -> (out, the
    state entering each chunk and, last, the final one, U)."""
    batch, heads, padded, dk = qh.shape
    dv = vh.shape[-1]
    num_chunks = padded // chunk
    specs = _sequential_specs(padded, dk, chunk, block_dv)
    f32 = jnp.float32
    u, states = pl.pallas_call(
        functools.partial(_states_kernel, chunk=chunk, num_chunks=num_chunks),
        grid=(batch, heads, dv // block_dv),
        in_specs=[specs["keys"], specs["values"], specs["per_token"], specs["per_token"],
                  specs["seg"], specs["tril"], specs["state"]],
        out_specs=[specs["values"], specs["states"](num_chunks + 1)],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, padded, dv), f32),
                   jax.ShapeDtypeStruct((batch, heads, num_chunks + 1, dk, dv), f32)],
        interpret=interpret, compiler_params=_DELTA_TRITON, name="gated_delta_rule_states",
    )(kh, vh, g, bh, seg, tril, initial_state)
    specs = _parallel_specs(padded, dk, chunk, block_dv)
    out = pl.pallas_call(
        functools.partial(_output_kernel, chunk=chunk),
        grid=(batch, heads, num_chunks, dv // block_dv),
        in_specs=[specs["keys"], specs["keys"], specs["per_token"], specs["seg"],
                  specs["state"](0), specs["values"]],
        out_specs=specs["values"],
        out_shape=jax.ShapeDtypeStruct((batch, heads, padded, dv), vh.dtype),
        interpret=interpret, compiler_params=_DELTA_TRITON, name="gated_delta_rule_fwd",
    )(qh, kh, g, seg, states, u)
    return out, states, u


def _state_backward_call(qh, kh, g, bh, seg, tril, d_out, d_u, d_final, chunk, block_dv,
                         interpret):
    batch, heads, padded, dk = qh.shape
    dv = d_out.shape[-1]
    num_chunks = padded // chunk
    specs = _sequential_specs(padded, dk, chunk, block_dv)
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_state_backward_kernel, chunk=chunk, num_chunks=num_chunks),
        grid=(batch, heads, dv // block_dv),
        in_specs=[specs["keys"], specs["keys"], specs["per_token"], specs["per_token"],
                  specs["seg"], specs["tril"], specs["values"], specs["values"],
                  specs["state"]],
        out_specs=[specs["values"], specs["states"](num_chunks), specs["state"]],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, padded, dv), f32),
                   jax.ShapeDtypeStruct((batch, heads, num_chunks, dk, dv), f32),
                   jax.ShapeDtypeStruct((batch, heads, dk, dv), f32)],
        interpret=interpret, compiler_params=_DELTA_TRITON,
        name="gated_delta_rule_state_bwd",
    )(qh, kh, g, bh, seg, tril, d_out, d_u, d_final)


def _parallel_specs(padded, dk, chunk, block_dv):
    """Specs over the grid (batch, heads, chunks, value-column slices) of the gradient
    kernels: this program's chunk (and value columns), or whole per-token arrays."""
    state = lambda step: _spec((None, None, None, dk, block_dv),  # noqa: E731
                               lambda i, j, c, s: (i, j, c + step, 0, s))
    share = lambda *tail: _spec((None, None, None, chunk, *tail),  # noqa: E731
                                lambda i, j, c, s: (i, j, s, c) + (0,) * len(tail))
    return dict(keys=_spec((None, None, chunk, dk), lambda i, j, c, s: (i, j, c, 0)),
                values=_spec((None, None, chunk, block_dv), lambda i, j, c, s: (i, j, c, s)),
                per_token=_spec((None, None, padded), lambda i, j, c, s: (i, j, 0)),
                seg=_spec((None, padded), lambda i, j, c, s: (i, 0)),
                state=state, share=share)


def _scores_grads_call(qh, kh, g, seg, states, u, d_out, chunk, block_dv, interpret):
    """P^T dO, and the dq, dk and d g shares through O (one per value slice)."""
    batch, heads, padded, dk = qh.shape
    dv = u.shape[-1]
    slices = dv // block_dv
    specs = _parallel_specs(padded, dk, chunk, block_dv)
    shape = lambda *tail: jax.ShapeDtypeStruct(  # noqa: E731
        (batch, heads, *tail), jnp.float32)
    call = functools.partial(pl.pallas_call, grid=(batch, heads, padded // chunk, slices),
                             interpret=interpret)
    d_u = call(
        functools.partial(_scores_transposed_kernel, chunk=chunk),
        in_specs=[specs["keys"], specs["keys"], specs["per_token"], specs["seg"],
                  specs["values"]],
        out_specs=specs["values"], out_shape=shape(padded, dv),
        compiler_params=_DELTA_TRITON, name="gated_delta_rule_bwd_du",
    )(qh, kh, g, seg, d_out)
    return d_u, *call(
        functools.partial(_grads_scores_kernel, chunk=chunk),
        in_specs=[specs["keys"], specs["keys"], specs["per_token"], specs["seg"],
                  specs["state"](0), specs["values"], specs["values"]],
        out_specs=[specs["share"](dk), specs["share"](dk), specs["share"]()],
        out_shape=[shape(slices, padded, dk), shape(slices, padded, dk),
                   shape(slices, padded)],
        compiler_params=_DELTA_TRITON, name="gated_delta_rule_bwd_scores",
    )(qh, kh, g, seg, states, u, d_out)


def _values_grads_call(kh, vh, g, bh, seg, states, d_states, u, d_r, chunk, block_dv,
                       interpret):
    """dv, and the dk, d beta and d g shares through U and the state passed on."""
    batch, heads, padded, dk = kh.shape
    dv = vh.shape[-1]
    slices = dv // block_dv
    specs = _parallel_specs(padded, dk, chunk, block_dv)
    shape = lambda *tail: jax.ShapeDtypeStruct(  # noqa: E731
        (batch, heads, *tail), jnp.float32)
    return pl.pallas_call(
        functools.partial(_grads_values_kernel, chunk=chunk),
        grid=(batch, heads, padded // chunk, slices),
        in_specs=[specs["keys"], specs["values"], specs["per_token"], specs["per_token"],
                  specs["seg"], specs["state"](0), specs["state"](0), specs["values"],
                  specs["values"]],
        out_specs=[specs["share"](dk), specs["values"], specs["share"](), specs["share"]()],
        out_shape=[shape(slices, padded, dk), shape(padded, dv), shape(slices, padded),
                   shape(slices, padded)],
        interpret=interpret, compiler_params=_DELTA_TRITON,
        name="gated_delta_rule_bwd_values",
    )(kh, vh, g, bh, seg, states, d_states, u, d_r)


def _layout(q, k, v, log_alpha, beta, seg, chunk):
    """Heads first, zero-padded to whole chunks (padded tokens: beta 0, no decay), the
    log decay cumulative inside each chunk, segment indices edge-padded."""
    qh, kh, vh, g = kernel_layout(q, k, v, log_alpha, chunk)
    bh = jnp.moveaxis(jnp.pad(beta, [(0, 0), (0, qh.shape[2] - q.shape[1]), (0, 0)]), 2, 1)
    return qh, kh, vh, g, bh, kernel_segments(seg, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _delta_rule_pallas(q, k, v, log_alpha, beta, initial_state, seg, chunk, block_dv,
                       interpret):
    return _delta_rule_fwd(q, k, v, log_alpha, beta, initial_state, seg, chunk, block_dv,
                           interpret)[0]


def _delta_rule_fwd(q, k, v, log_alpha, beta, initial_state, seg, chunk, block_dv, interpret):
    qh, kh, vh, g, bh, seg_padded = _layout(q, k, v, log_alpha, beta, seg, chunk)
    tril = _tril_call(kh, g, bh, seg_padded, chunk, interpret)
    out, states, u = _forward_calls(qh, kh, vh, g, bh, seg_padded, tril, initial_state,
                                    chunk, block_dv, interpret)
    out = jnp.moveaxis(out, 1, 2)[:, :q.shape[1]]
    return (out, states[:, :, -1]), (q, k, v, log_alpha, beta, seg, states, u, tril)


def _delta_rule_bwd(chunk, block_dv, interpret, residuals, cotangents):
    q, k, v, log_alpha, beta, seg, states, u, tril = residuals
    d_out, d_final = cotangents
    qh, kh, vh, g, bh, seg = _layout(q, k, v, log_alpha, beta, seg, chunk)
    length, padded = q.shape[1], qh.shape[2]
    d_out = jnp.moveaxis(jnp.pad(d_out.astype(jnp.float32),
                                 [(0, 0), (0, padded - length), (0, 0), (0, 0)]), 2, 1)
    d_u, dq, dk_scores, dg_scores = _scores_grads_call(qh, kh, g, seg, states, u, d_out,
                                                       chunk, block_dv, interpret)
    d_r, d_states, d_initial = _state_backward_call(
        qh, kh, g, bh, seg, tril, d_out, d_u, d_final.astype(jnp.float32), chunk, block_dv,
        interpret)
    dk, dv, d_beta, dg = _values_grads_call(kh, vh, g, bh, seg, states, d_states, u, d_r,
                                            chunk, block_dv, interpret)
    dk, dg = dk + dk_scores, dg + dg_scores
    # Through the decay at each chunk's last row (kappa's and every tail's): <dS', S'>.
    end = jnp.einsum("bhnkv,bhnkv->bhn", d_states, states[:, :, 1:])
    dg = dg.at[:, :, 0, chunk - 1::chunk].add(end)
    # Back to (batch, length, heads, ...), summing the value-column programs' shares.
    # g is cumulative inside each chunk: d log_alpha sums d g from each token to its
    # chunk's end (padding included: the chunk's end decay lands on its last row).
    dg = dg.sum(axis=2).reshape(*dg.shape[:2], padded // chunk, chunk)
    dg = jnp.flip(jnp.cumsum(jnp.flip(dg, -1), axis=-1), -1).reshape(*dg.shape[:2], padded)
    tokens_first = lambda a: jnp.moveaxis(a, 2, 1)[:, :length]  # noqa: E731
    dq, dk, d_beta = (tokens_first(a.sum(axis=2)) for a in (dq, dk, d_beta))
    d_log_alpha = tokens_first(dg)
    return (dq.astype(q.dtype), dk.astype(k.dtype), tokens_first(dv).astype(v.dtype),
            d_log_alpha.astype(log_alpha.dtype), d_beta.astype(beta.dtype), d_initial, None)


_delta_rule_pallas.defvjp(_delta_rule_fwd, _delta_rule_bwd)


def gated_delta_rule_pallas(q, k, v, log_alpha, beta, *, chunk: int = 64,
                            initial_state=None, segment_ids=None,
                            interpret: bool | None = None, block_dv: int | None = None):
    """The chunked form as Pallas kernels, forward and backward (above): the same
    arguments and results as `gated_delta_rule_recurrent`, any length (padded to whole
    chunks). Head dims are zero-padded to `padded_head_dim` (exact: padded key dimensions
    are zero in q and k, padded value columns zero in v and the state). Interpreted
    unless on a GPU (or as `interpret` says); compiled, the chunk must be a power of two
    (a ValueError otherwise). block_dv: value columns per program,
    a divisor of the padded dv (None: `delta_value_block`)."""
    check_inputs(q, k, v, log_alpha, beta, initial_state)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    reason = compiled_chunk_problem(chunk) if chunk >= 1 else f"chunk={chunk}: not positive"
    if reason is not None and (chunk < 1 or not interpret):
        raise ValueError(f"{reason}; use one, or the XLA form")
    state = _initial(q, v, initial_state)
    dk, dv = q.shape[-1], v.shape[-1]
    dk_pad, dv_pad = padded_head_dim(dk) - dk, padded_head_dim(dv) - dv
    last = lambda a, n: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, n)])  # noqa: E731
    q, k, v = last(q, dk_pad), last(k, dk_pad), last(v, dv_pad)
    state = jnp.pad(state, [(0, 0), (0, 0), (0, dk_pad), (0, dv_pad)])
    block_dv = delta_value_block(q.shape[-1], v.shape[-1]) if block_dv is None else block_dv
    if v.shape[-1] % block_dv:
        raise ValueError(f"block_dv={block_dv} does not divide the padded dv={v.shape[-1]}")
    seg = (jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None
           else segment_index(segment_ids))
    out, state = _delta_rule_pallas(q, k, v, log_alpha.astype(jnp.float32),
                                    beta.astype(jnp.float32), state, seg, chunk, block_dv,
                                    interpret)
    return out[..., :dv], state[:, :, :dk, :dv]
