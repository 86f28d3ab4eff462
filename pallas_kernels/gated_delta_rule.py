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
    compiled_chunk_problem,
    from_chunks,
    kernel_layout,
    kernel_segments,
    padded_head_dim,
    segment_chunks,
    segment_index,
    segment_starts,
    sub_chunk,
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
# Pallas: one Triton-style program per (batch, head, slice of value columns) walks the
# chunks with the state in float32 registers. Inside a chunk the rows go in blocks of
# `sub_chunk(chunk)` (16): each block's U solves against the blocks before it (matmuls)
# and its own unit lower triangle, whose inverse comes from a forward substitution on
# the block (row by row, masked: Triton tiles cannot be indexed). The forward saves the
# state entering every chunk; the backward walks the chunks in reverse from those,
# recomputing each chunk's U and carrying the state's cotangent.
#
# Per chunk, with the module docstring's notation (c: the incoming state's decay per
# token, tau: each key's decay to the chunk's end, kappa: the state's), the gradients
# of U = (I + A)^-1 R, R = diag(beta) (V - diag(c) K S), are
#     dU = (Gamma o Q K^T)^T dO + diag(tau) K dS',  dR = (I + A)^-T dU,
#     dA = -dR U^T (strict lower),                   dS = kappa dS' + Q^T diag(c) dO
#                                                         - K^T diag(beta c) dR,
# and every decay exp(g_i - g_j) passes d g_i += e, d g_j -= e with e its own term
# times its cotangent; the wrapper turns d g (g cumulative) into d log_alpha.

_DELTA_TRITON = plgpu.CompilerParams(num_warps=8, num_stages=1)


def delta_value_block(dv: int) -> int:
    """Value columns per program: 32 (or all dv, if fewer). The chunk's U, dR and the
    state slice shrink with it, and the spills with them (`efflm bench compile`, sm_90a,
    head dim 64, chunk 64: the forward spills 16 bytes at 64 columns and 4 at 32; the
    backward 4.8 KB and 2.3 KB)."""
    return 32 if dv > 32 and dv % 32 == 0 else dv


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


class _Chunk:
    """One chunk's blocks of rows: q, k and v tiles loaded where used (so that few are
    live at once), and the per-token decays that do not pair blocks: `carried` (the
    incoming state's), `tail` (each key's to the chunk's end) and kappa (the state's
    through the chunk)."""

    def __init__(self, q_ref, k_ref, v_ref, g_ref, beta_ref, seg_ref, start, chunk, block):
        self.refs = dict(q=q_ref, k=k_ref, v=v_ref)
        before = seg_ref[jnp.maximum(start - 1, 0)]  # the incoming state's segment
        last = start + chunk - 1
        seg_last, g_last = seg_ref[last], g_ref[last]
        self.kappa = jnp.where(seg_last == before, jnp.exp(g_last), 0.0)
        self.blocks = []
        for r in range(chunk // block):
            rows = pl.ds(start + r * block, block)
            g, seg = g_ref[rows], seg_ref[rows]
            self.blocks.append(dict(
                g=g, seg=seg, beta=beta_ref[rows], rows=rows,
                carried=jnp.where(seg == before, jnp.exp(g), 0.0),
                tail=jnp.where(seg == seg_last, jnp.exp(g_last - g), 0.0)))

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, r):
        return self.blocks[r]

    def load(self, name, r):
        return self.refs[name][self.blocks[r]["rows"], :].astype(jnp.float32)

    def pair(self, r, m):
        """Block r's rows against block m's (m <= r): the decay exp(g_i - g_j) where
        token j reaches token i (same segment, j <= i), the strict lower Gram matrix
        k_i . k_j with the decay, A (beta_i times it) and the scores q_i . k_j with the
        decay."""
        t, s = self.blocks[r], self.blocks[m]
        keep = t["seg"][:, None] == s["seg"][None, :]
        strict = keep
        if m == r:
            within = jnp.arange(t["g"].shape[0])
            keep = keep & (within[:, None] >= within[None, :])
            strict = keep & (within[:, None] > within[None, :])
        decay = jnp.exp(jnp.where(keep, t["g"][:, None] - s["g"][None, :], -jnp.inf))
        k_m = self.load("k", m)
        gram = jnp.where(strict, decay * mm(self.load("k", r), k_m, trans_b=True), 0.0)
        scores = jnp.where(keep, decay * mm(self.load("q", r), k_m, trans_b=True), 0.0)
        return dict(strict=strict, decay=decay, gram=gram, a=t["beta"][:, None] * gram,
                    scores=scores, keep=keep)


def _chunk_values(chunk, state, visit=None):
    """U block by block (module docstring), with each diagonal block's inverse;
    `visit(r, pairs, us)` runs once block r's U is known (pairs: (r, m), m <= r)."""
    us, inverses = [], []
    for r, t in enumerate(chunk.blocks):
        pairs = [chunk.pair(r, m) for m in range(r + 1)]
        rhs = t["beta"][:, None] * (chunk.load("v", r)
                                    - t["carried"][:, None] * mm(chunk.load("k", r), state))
        for m in range(r):
            rhs = rhs - mm(pairs[m]["a"], us[m])
        inverses.append(_unit_lower_inverse(pairs[r]["a"]))
        us.append(mm(inverses[r], rhs))
        if visit is not None:
            visit(r, pairs, us)
    return us, inverses


def _delta_forward_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_ref, s0_ref, *refs,
                          chunk: int, block: int, num_chunks: int, save_states: bool):
    out_ref, state_ref = refs[:2]
    states_ref = refs[2] if save_states else None

    def body(c, state):
        if save_states:
            states_ref[c] = state
        blocks = _Chunk(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_ref, c * chunk, chunk,
                        block)

        def write_out(r, pairs, us):
            t = blocks[r]
            out = t["carried"][:, None] * mm(blocks.load("q", r), state)
            for m in range(r + 1):
                out = out + mm(pairs[m]["scores"], us[m])
            out_ref[t["rows"], :] = out.astype(out_ref.dtype)

        us, _ = _chunk_values(blocks, state, write_out)
        new_state = blocks.kappa * state
        for r, t in enumerate(blocks.blocks):
            new_state = new_state + mm(t["tail"][:, None] * blocks.load("k", r), us[r],
                                       trans_a=True)
        return new_state

    state = jax.lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(jnp.float32))
    state_ref[...] = state
    if save_states:
        states_ref[num_chunks] = state


def _delta_backward_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_ref, states_ref,
                           d_out_ref, d_final_ref, dq_ref, dk_ref, dv_ref, d_beta_ref,
                           dg_ref, d_initial_ref, *, chunk: int, block: int,
                           num_chunks: int):
    """The chunks in reverse, carrying the cotangent of the state each chunk passes on.
    dq, dk, d beta and d g are this program's share (its value columns): the wrapper
    sums the programs'. In a chunk, dq comes with U (block by block); then the blocks go
    last to first: block m's dR needs the later blocks', after which every gradient of
    block m's rows is complete (the pairs (r >= m, m) and (m, m' <= m))."""
    rowsum = lambda a: jnp.sum(a, axis=1)  # noqa: E731

    def body(i, d_state):
        c = num_chunks - 1 - i
        state = states_ref[c]
        blocks = _Chunk(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_ref, c * chunk, chunk,
                        block)
        d_out = lambda r: d_out_ref[blocks[r]["rows"], :].astype(jnp.float32)  # noqa: E731

        def write_dq(r, pairs, us):
            d_o = d_out(r)
            dq = blocks[r]["carried"][:, None] * mm(d_o, state, trans_b=True)
            for m in range(r + 1):
                d_qk = jnp.where(pairs[m]["keep"], mm(d_o, us[m], trans_b=True), 0.0)
                dq = dq + mm(d_qk * pairs[m]["decay"], blocks.load("k", m))
            dq_ref[blocks[r]["rows"], :] = dq

        us, inverses = _chunk_values(blocks, state, write_dq)
        n = len(blocks)
        # d g at the chunk's last row, through kappa and every tail: <dS', S'>.
        d_end = jnp.sum(d_state * states_ref[c + 1])
        d_initial = blocks.kappa * d_state
        d_rhs = [None] * n
        for m in reversed(range(n)):  # (I + A)^T dR = dU, last block first
            s = blocks[m]
            q_m, k_m, d_o = blocks.load("q", m), blocks.load("k", m), d_out(m)
            k_d_state = mm(k_m, d_state)
            k_state = mm(k_m, state)
            column = {r: blocks.pair(r, m) for r in range(m, n)}
            d_u = s["tail"][:, None] * k_d_state
            for r, p in column.items():
                d_u = d_u + mm(p["scores"], d_out(r), trans_a=True)
                if r > m:
                    d_u = d_u - mm(p["a"], d_rhs[r], trans_a=True)
            d_r = d_rhs[m] = mm(inverses[m], d_u, trans_a=True)
            beta_carried = (s["beta"] * s["carried"])[:, None]
            d_tail = s["tail"] * rowsum(k_d_state * us[m])
            dk = (s["tail"][:, None] * mm(us[m], d_state, trans_b=True)
                  - beta_carried * mm(d_r, state, trans_b=True))
            d_beta = rowsum(d_r * (blocks.load("v", m) - s["carried"][:, None] * k_state))
            dg = (s["carried"] * (rowsum(d_o * mm(q_m, state)) - s["beta"]
                                  * rowsum(d_r * k_state)) - d_tail)
            d_initial = (d_initial + mm(q_m, s["carried"][:, None] * d_o, trans_a=True)
                         - mm(k_m, beta_carried * d_r, trans_a=True))
            for r, p in column.items():  # block m's keys against later (and its own) rows
                d_scores = jnp.where(p["keep"], mm(d_out(r), us[m], trans_b=True), 0.0)
                d_a = jnp.where(p["strict"], -mm(d_rhs[r], us[m], trans_b=True), 0.0)
                d_gram = d_a * blocks[r]["beta"][:, None] * p["decay"]
                dk = (dk + mm(d_scores * p["decay"], blocks.load("q", r), trans_a=True)
                      + mm(d_gram, blocks.load("k", r), trans_a=True))
                dg = dg - jnp.sum(d_scores * p["scores"] + d_a * p["a"], axis=0)
            for m2 in range(m + 1):  # block m's rows against its own and earlier keys
                p = column[m] if m2 == m else blocks.pair(m, m2)
                d_scores = jnp.where(p["keep"], mm(d_o, us[m2], trans_b=True), 0.0)
                d_a = jnp.where(p["strict"], -mm(d_r, us[m2], trans_b=True), 0.0)
                d_beta = d_beta + rowsum(d_a * p["gram"])
                dk = dk + mm(d_a * s["beta"][:, None] * p["decay"], blocks.load("k", m2))
                dg = dg + rowsum(d_scores * p["scores"] + d_a * p["a"])
            if m == n - 1:
                dg = dg + jnp.where(jnp.arange(block) == block - 1, d_end, 0.0)
            rows = s["rows"]
            dk_ref[rows, :] = dk
            dv_ref[rows, :] = (s["beta"][:, None] * d_r).astype(dv_ref.dtype)
            d_beta_ref[rows] = d_beta
            dg_ref[rows] = dg
        return d_initial

    d_initial_ref[...] = jax.lax.fori_loop(0, num_chunks, body,
                                           d_final_ref[...].astype(jnp.float32))


def _specs(padded, dk, block_dv, num_chunks):
    """BlockSpecs over the grid (batch, heads, value-column slices)."""
    head = lambda *tail: pl.BlockSpec((None, None, *tail),  # noqa: E731
                                      lambda i, j, n: (i, j) + (0,) * len(tail))
    sliced = lambda *tail: pl.BlockSpec((None, None, *tail),  # noqa: E731
                                        lambda i, j, n: (i, j) + (0,) * (len(tail) - 1) + (n,))
    share = lambda *tail: pl.BlockSpec((None, None, None, *tail),  # noqa: E731
                                       lambda i, j, n: (i, j, n) + (0,) * len(tail))
    return dict(
        whole=head(padded, dk), sliced=sliced(padded, block_dv), per_token=head(padded),
        seg=pl.BlockSpec((None, padded), lambda i, j, n: (i, 0)),
        state=sliced(dk, block_dv), states=sliced(num_chunks + 1, dk, block_dv),
        share=share(padded, dk), share_per_token=share(padded))


def _forward_call(qh, kh, vh, g, bh, seg, initial_state, chunk, block_dv, interpret,
                  save_states):
    """The forward kernel on heads-first arrays padded to whole chunks -> (out, final
    state[, the state entering each chunk and, last, the final one])."""
    batch, heads, padded, dk = qh.shape
    dv = vh.shape[-1]
    num_chunks = padded // chunk
    specs = _specs(padded, dk, block_dv, num_chunks)
    out_shape = [jax.ShapeDtypeStruct((batch, heads, padded, dv), vh.dtype),
                 jax.ShapeDtypeStruct((batch, heads, dk, dv), jnp.float32)]
    out_specs = [specs["sliced"], specs["state"]]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, num_chunks + 1, dk, dv),
                                              jnp.float32))
        out_specs.append(specs["states"])
    return pl.pallas_call(
        functools.partial(_delta_forward_kernel, chunk=chunk, block=sub_chunk(chunk),
                          num_chunks=num_chunks, save_states=save_states),
        grid=(batch, heads, dv // block_dv),
        in_specs=[specs["whole"], specs["whole"], specs["sliced"], specs["per_token"],
                  specs["per_token"], specs["seg"], specs["state"]],
        out_specs=out_specs, out_shape=out_shape, interpret=interpret,
        compiler_params=_DELTA_TRITON, name="gated_delta_rule_fwd",
    )(qh, kh, vh, g, bh, seg, initial_state)


def _backward_call(qh, kh, vh, g, bh, seg, states, d_out, d_final, chunk, block_dv,
                   interpret):
    batch, heads, padded, dk = qh.shape
    dv = vh.shape[-1]
    num_chunks = padded // chunk
    slices = dv // block_dv
    specs = _specs(padded, dk, block_dv, num_chunks)
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_delta_backward_kernel, chunk=chunk, block=sub_chunk(chunk),
                          num_chunks=num_chunks),
        grid=(batch, heads, slices),
        in_specs=[specs["whole"], specs["whole"], specs["sliced"], specs["per_token"],
                  specs["per_token"], specs["seg"], specs["states"], specs["sliced"],
                  specs["state"]],
        out_specs=[specs["share"], specs["share"], specs["sliced"], specs["share_per_token"],
                   specs["share_per_token"], specs["state"]],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, slices, padded, dk), f32),
                   jax.ShapeDtypeStruct((batch, heads, slices, padded, dk), f32),
                   jax.ShapeDtypeStruct((batch, heads, padded, dv), f32),
                   jax.ShapeDtypeStruct((batch, heads, slices, padded), f32),
                   jax.ShapeDtypeStruct((batch, heads, slices, padded), f32),
                   jax.ShapeDtypeStruct((batch, heads, dk, dv), f32)],
        interpret=interpret, compiler_params=_DELTA_TRITON, name="gated_delta_rule_bwd",
    )(qh, kh, vh, g, bh, seg, states, d_out, d_final)


def _layout(q, k, v, log_alpha, beta, seg, chunk):
    """Heads first, zero-padded to whole chunks (padded tokens: beta 0, no decay), the
    log decay cumulative inside each chunk, segment indices edge-padded."""
    qh, kh, vh, g = kernel_layout(q, k, v, log_alpha, chunk)
    bh = jnp.moveaxis(jnp.pad(beta, [(0, 0), (0, qh.shape[2] - q.shape[1]), (0, 0)]), 2, 1)
    return qh, kh, vh, g, bh, kernel_segments(seg, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _delta_rule_pallas(q, k, v, log_alpha, beta, initial_state, seg, chunk, block_dv,
                       interpret):
    return _delta_rule_forward(q, k, v, log_alpha, beta, initial_state, seg, chunk,
                               block_dv, interpret, save_states=False)[:2]


def _delta_rule_forward(q, k, v, log_alpha, beta, initial_state, seg, chunk, block_dv,
                        interpret, save_states):
    layout = _layout(q, k, v, log_alpha, beta, seg, chunk)
    out, *states = _forward_call(*layout, initial_state, chunk, block_dv, interpret,
                                 save_states)
    return (jnp.moveaxis(out, 1, 2)[:, :q.shape[1]], *states)


def _delta_rule_fwd(q, k, v, log_alpha, beta, initial_state, seg, chunk, block_dv, interpret):
    out, final, states = _delta_rule_forward(q, k, v, log_alpha, beta, initial_state, seg,
                                             chunk, block_dv, interpret, save_states=True)
    return (out, final), (q, k, v, log_alpha, beta, seg, states)


def _delta_rule_bwd(chunk, block_dv, interpret, residuals, cotangents):
    q, k, v, log_alpha, beta, seg, states = residuals
    d_out, d_final = cotangents
    layout = _layout(q, k, v, log_alpha, beta, seg, chunk)
    length, padded = q.shape[1], layout[0].shape[2]
    d_out = jnp.moveaxis(jnp.pad(d_out.astype(jnp.float32),
                                 [(0, 0), (0, padded - length), (0, 0), (0, 0)]), 2, 1)
    dq, dk, dv, d_beta, dg, d_initial = _backward_call(
        *layout, states, d_out, d_final.astype(jnp.float32), chunk, block_dv, interpret)
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
    block_dv = delta_value_block(v.shape[-1]) if block_dv is None else block_dv
    if v.shape[-1] % block_dv:
        raise ValueError(f"block_dv={block_dv} does not divide the padded dv={v.shape[-1]}")
    seg = (jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None
           else segment_index(segment_ids))
    out, state = _delta_rule_pallas(q, k, v, log_alpha.astype(jnp.float32),
                                    beta.astype(jnp.float32), state, seg, chunk, block_dv,
                                    interpret)
    return out[..., :dv], state[:, :, :dk, :dv]
