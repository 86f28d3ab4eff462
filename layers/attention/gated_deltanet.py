"""Gated DeltaNet (`model.attention.kind=gated_deltanet`), from "Gated Delta Networks:
Improving Mamba2 with Delta Rule": the delta rule writes to the state by correcting
what the state already returns for the key, under a data-dependent decay per head.

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t
    S: (dk, dv), float32; k_t and q_t L2-normalised, q_t then scaled by dk^-1/2
    beta_t = sigmoid(w_beta . x_t),  log alpha_t = -exp(c) softplus(w_alpha . x_t + b)
    y_t = W_o (RMSNorm(o_t) * swish(W_g x_t))     (per-head norm; the gate is a setting)

with, per head, exp(c) initialised uniform in [1, 16] and softplus(b) log-uniform in
[0.001, 0.1] (Mamba2's decay rate and time step; parameters `decay_log_scale`, `decay_bias`).

Before the mix, q, k and v each pass a causal depthwise convolution of
`model.attention.conv_width` taps and SiLU (`model.attention.short_conv`; SiLU alone
without it). The convolution and the state both restart at every packed segment.
Queries, keys and values have `model.attention.num_heads` heads of head_dim each
(`num_kv_heads` is not used by this kind, as by the other linear kinds).

Training runs the chunked form (`gated_delta_rule_chunked`); `gated_delta_rule_recurrent`,
one state update per token, is its reference. Decoding keeps S and each convolution's
last conv_width - 1 inputs in the cache.

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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efflm.config import ModelConfig, check_positive, head_dim
from efflm.errors import ConfigError
from efflm.layers.attention.gla import HeadRMSNorm
from efflm.layers.attention.linear import decoding, padded_length
from efflm.layers.common import Dense
from efflm.pallas_kernels.linear_attention import _check as check_linear_inputs
from efflm.pallas_kernels.linear_attention import (
    _from_chunks,
    _segment_chunks,
    _to_chunks,
    segment_index,
    segment_starts,
)


def _check(q, k, v, log_alpha, beta, initial_state):
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
    _check(q, k, v, log_alpha, beta, initial_state)
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
    _check(q, k, v, log_alpha, beta, initial_state)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens; got {chunk}")
    state = _initial(q, v, initial_state)
    batch, length = q.shape[:2]
    dv = v.shape[-1]
    qc, kc, vc = (_to_chunks(a.astype(jnp.float32), chunk) for a in (q, k, v))
    g = jnp.cumsum(_to_chunks(log_alpha.astype(jnp.float32), chunk), axis=-1)
    bc = _to_chunks(beta.astype(jnp.float32), chunk)  # (chunks, batch, heads, chunk)
    seg, before = _segment_chunks(segment_ids, batch, length, chunk)  # (n, b, 1, C|1)
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
    return _from_chunks(out, length).astype(v.dtype), state


def delta_rule_flops(cfg: ModelConfig, seq_len: int, heads: int, dk: int, dv: int) -> float:
    """Forward matmul FLOPs per token of `gated_delta_rule_chunked` over the padded
    length: per chunk of C tokens, k k^T, q k^T and (scores) U over the whole C x C block
    (2C (2 dk + dv) per token), the forward substitution against dv + dk columns (each
    row against all C: 2C (dk + dv)), and W S, q S and the state update (2 dk dv each)."""
    chunk = cfg.attention.chunk_size
    per_token = 2 * chunk * (2 * dk + dv) + 2 * chunk * (dk + dv) + 6 * dk * dv
    return heads * per_token * padded_length(cfg, seq_len) / seq_len


class ShortConvolution(nn.Module):
    """Causal depthwise convolution over the length of (batch, length, heads, head_dim),
    `width` taps (tap j reads the input j tokens back), within packed segments. While
    decoding, the last width - 1 inputs are kept in the cache."""

    width: int

    @nn.compact
    def __call__(self, x, segment_ids):
        b, t, h, d = x.shape
        w = self.width
        bound = w ** -0.5  # torch.nn.Conv1d's default range for a depthwise kernel
        kernel = self.param("kernel", nn.with_logical_partitioning(
            lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
            (None, "heads", "head_dim")), (w, h, d), jnp.float32)
        same = None
        if decoding(self):
            if w > 1:
                past = self.variable("cache", "inputs", jnp.zeros, (b, w - 1, h, d), x.dtype)
                padded = jnp.concatenate([past.value, x], axis=1)
                past.value = padded[:, -(w - 1):]
            else:
                padded = x
        else:
            padded = jnp.pad(x, [(0, 0), (w - 1, 0), (0, 0), (0, 0)])
            if segment_ids is not None:
                seg = jnp.pad(segment_index(segment_ids), [(0, 0), (w - 1, 0)],
                              constant_values=-1)
                same = [seg[:, w - 1 - j:w - 1 - j + t] == seg[:, w - 1:] for j in range(w)]
        out = jnp.zeros((b, t, h, d), jnp.float32)
        for j in range(w):
            tap = padded[:, w - 1 - j:w - 1 - j + t].astype(jnp.float32) * kernel[j]
            if same is not None:
                tap = jnp.where(same[j][..., None, None], tap, 0.0)
            out = out + tap
        return out.astype(x.dtype)


def l2_normalize(x, eps: float = 1e-6):
    """x / |x| over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _time_step_bias_init(key, shape, dtype):
    """softplus(bias) log-uniform in [0.001, 0.1] (Mamba2's time-step range)."""
    dt = jnp.exp(jax.random.uniform(key, shape, dtype, np.log(1e-3), np.log(1e-1)))
    return dt + jnp.log(-jnp.expm1(-dt))  # softplus^-1


def _log_scale_init(key, shape, dtype):
    """log of a decay rate uniform in [1, 16]."""
    return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet: short convolutions, L2-normalised q and k, per-head beta and decay,
    the gated delta rule, per-head RMSNorm and output gate (see the module docstring)."""

    cfg: ModelConfig
    reference: bool = False  # the token scan instead of the chunked form (tests)
    decodes = True

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        a = cfg.attention
        check_positive("model.attention.conv_width", a.conv_width)
        if a.chunk_size > cfg.max_seq_len:
            raise ConfigError(f"model.attention.chunk_size={a.chunk_size} is larger than "
                              f"model.max_seq_len={cfg.max_seq_len}: gated_deltanet's chunk "
                              "must fit in a sequence; lower it")
        if a.impl == "pallas":
            raise ConfigError("model.attention.impl=pallas: gated_deltanet has no Pallas "
                              "kernel; set model.attention.impl=auto or xla")

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
        """Matmuls only: the short convolutions (elementwise) are not counted."""
        a = cfg.attention
        h, d = a.num_heads, head_dim(cfg)
        projections = 2 * cfg.d_model * h * d * (5 if a.output_gate else 4)
        projections += 2 * cfg.d_model * h * 2  # beta and the decay
        return projections + delta_rule_flops(cfg, seq_len, h, d, d)

    @nn.compact
    def __call__(self, x, positions, segment_ids, mask):
        cfg = self.cfg
        a = cfg.attention
        h, d = a.num_heads, head_dim(cfg)
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=cfg.init_std)
        axes = ("embed", "heads", "head_dim")
        q, k, v = (Dense((h, d), axes, name=name, **kw)(x) for name in ("query", "key", "value"))
        if a.short_conv:
            q, k, v = (ShortConvolution(a.conv_width, name=f"{name}_conv")(y, segment_ids)
                       for name, y in (("query", q), ("key", k), ("value", v)))
        q, k = (l2_normalize(jax.nn.silu(y.astype(jnp.float32))) for y in (q, k))
        q = (q * d ** -0.5).astype(cfg.dtype)
        k = k.astype(cfg.dtype)
        v = jax.nn.silu(v.astype(jnp.float32)).astype(cfg.dtype)
        beta = jax.nn.sigmoid(Dense((h,), ("embed", "heads"), name="beta", **kw)(x)
                              .astype(jnp.float32))
        log_scale = self.param("decay_log_scale", nn.with_logical_partitioning(
            _log_scale_init, ("heads",)), (h,), jnp.float32)
        bias = self.param("decay_bias", nn.with_logical_partitioning(
            _time_step_bias_init, ("heads",)), (h,), jnp.float32)
        step = Dense((h,), ("embed", "heads"), name="decay", **kw)(x).astype(jnp.float32)
        log_alpha = -jnp.exp(log_scale) * jax.nn.softplus(step + bias)
        out = self._mix(q, k, v, log_alpha, beta, segment_ids)
        out = HeadRMSNorm(name="norm")(out)
        if a.output_gate:
            gate = Dense((h, d), axes, name="output_gate", **kw)(x)
            out = jax.nn.silu(gate.astype(jnp.float32)) * out
        out = nn.with_logical_constraint(out.astype(cfg.dtype),
                                         ("batch", "length", "heads", "head_dim"))
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        return Dense((cfg.d_model,), ("heads", "head_dim", "embed"), in_dims=2,
                     dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=out_std,
                     name="out")(out)

    def _mix(self, q, k, v, log_alpha, beta, segment_ids):
        """The gated delta rule: chunked (or the token scan for `reference`); while
        decoding, continuing the state in the cache (segments are not used)."""
        b, t, h, dk = q.shape
        chunk = self.cfg.attention.chunk_size
        if decoding(self):
            state = self.variable("cache", "state", jnp.zeros, (b, h, dk, v.shape[-1]),
                                  jnp.float32)
            if t == 1:
                out, state.value = gated_delta_rule_recurrent(
                    q, k, v, log_alpha, beta, initial_state=state.value)
            else:
                out, state.value = gated_delta_rule_chunked(
                    q, k, v, log_alpha, beta, chunk=chunk, initial_state=state.value)
            return out
        if self.reference:
            return gated_delta_rule_recurrent(q, k, v, log_alpha, beta,
                                              segment_ids=segment_ids)[0]
        return gated_delta_rule_chunked(q, k, v, log_alpha, beta, chunk=chunk,
                                        segment_ids=segment_ids)[0]
