"""The gated delta rule ("Gated Delta Networks: Improving Mamba2 with Delta Rule"), the
recurrence behind `model.attention.kind=gated_deltanet`:

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t

`gated_delta_rule_recurrent` runs it one token at a time (the reference);
`gated_delta_rule_chunked` is the chunked form below, in plain JAX (XLA). Both restart
the state at every packed segment, take an initial state and return the final one.

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

import jax
import jax.numpy as jnp

from efflm.pallas_kernels.linear_attention import (
    check_inputs as check_linear_inputs,
)
from efflm.pallas_kernels.linear_attention import (
    from_chunks,
    segment_chunks,
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
