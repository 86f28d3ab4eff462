"""BlockFFN's ReLU router (`model.moe.router=relu`), "BlockFFN: Towards End-Side
Acceleration-Friendly Mixture-of-Experts with Chunk-Level Activation Sparsity".

The gates are `RMSNorm(ReLU(x W_r))`, the norm taken over the expert axis (a learned
scale per expert, initialised to 1): differentiable, and a token uses every expert whose
ReLU is positive, any number from 0 to num_experts.

Static work: each sequence of `length` tokens computes
`rows = min(num_experts * length, ceil(model.moe.relu.rows_per_token * length))`
(token, expert) rows. They are granted under the causal budget of
`efflm.layers.moe.capacity`: up to position p of a document, at most
`ceil(rows_per_token * (p + 1))` rows in all, taken in token order and within a token by
decreasing gate, so a token may spend what earlier tokens left, and drops spread over
the positions (packed documents also share their row's rows, as that module says).
Active pairs beyond the budget are dropped and counted (`relu_overflow_fraction`).
Which of a token's experts run depends only on its document up to it, and decoding
reproduces it from a counter in the `cache` (a decoded token may use up to every
expert, as its budget allows). Rows left over have gate 0 (computed, adding nothing).
Padding (segment id 0) activates no expert and is in no loss or statistic.

Losses, each at its weight under `model.moe.relu` (0 turns one off):

- `locality` (activation locality, BlockFFN's `transfer_lambda`): the binary cross
  entropy between neighbours' soft activation patterns. For each pair of consecutive real
  tokens of one document and each expert, the logit `a * z_{t-1}` against the target
  `sigmoid(a * z_t)`, z the router logits `x W_r` and a = `sharpness` (a sigmoid this
  steep is nearly the 0/1 activity of the ReLU, yet has a gradient); mean over the pairs
  and experts. Both tokens of a pair receive gradient.
- `chunk` (chunk sparsification): with p_{t,e} the token's gates normalised to sum 1 over
  the experts (0 at padding), the probability that some token of a chunk of
  `chunk_len` consecutive positions activates expert e is 1 - prod_t (1 - p_{t,e});
  the loss is its mean over experts and the chunks that hold a real token (whole chunks
  only; a shorter sequence is one chunk), with the product as exp(sum log(1 - p + 1e-5)).
- `l1`: the mean over tokens of the L1 norm of the RMS-normalised ReLU vector (before
  the learned scale, so shrinking the router's output cannot lower it).

The locality and chunk defaults (2e-3; 0.05 over 64-token chunks; a = 100) and the L1
default (0) are the published recipe's (thunlp/BlockFFN); its adaptive raising of the
chunk weight after 1000 steps is not implemented.

Logged: token-level sparsity (fraction of (token, expert) gates that are zero), 8-token
chunk-level sparsity (fraction of experts that none of a chunk's 8 consecutive tokens
uses; whole chunks only, a shorter sequence is one chunk), the mean active experts per
token and `relu_active_load_cv`, the coefficient of variation over the experts of their
active pairs before the row bound (`expert_load_cv` is over the kept pairs).

Balance: `model.moe.relu.balance` weighs `E * sum_i f_i P_i`, f_i expert i's share of the
kept (computed) pairs and P_i its mean normalised gate p_{t,i} over the real tokens (the
published code's form, there over every active pair since it bounds no rows; its
recipe sets the weight to 0). `model.moe.balance_loss` (top-k's) does not apply. The
default 0.1 is efflm's: on `tiny_moe` the published recipe without it crowds the kept
rows onto a few experts within 60 steps (load CV 1.37), and with it the load CV is 0.26
after 300 steps (bench/results/moe_quality_cpu.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efflm.errors import ConfigError, check_positive
from efflm.layers.common import decoding, sow_loss, sow_stat
from efflm.layers.contract import Router, Routing
from efflm.layers.moe.capacity import causal_pairs, causal_picks, counters_init, documents
from efflm.layers.moe.topk import token_mean

if TYPE_CHECKING:
    from efflm.config import ModelConfig

CHUNK = 8  # tokens per chunk of the chunk-level sparsity statistic


def rows_per_sequence(cfg: ModelConfig, length: int) -> int:
    """The static number of (token, expert) rows a sequence of `length` tokens computes."""
    moe = cfg.moe
    return min(moe.num_experts * length, math.ceil(moe.relu.rows_per_token * length))


def relu_gates(x, kernel, scale, eps: float):
    """(gates, logits, normalised): `scale * RMSNorm(ReLU(x W_r))` over the experts, the
    logits `x W_r` and the ReLU output RMS-normalised without the scale; float32."""
    logits = x.astype(jnp.float32) @ kernel
    relu = jax.nn.relu(logits)
    normalised = relu * jax.lax.rsqrt(jnp.mean(relu * relu, axis=-1, keepdims=True) + eps)
    return normalised * scale, logits, normalised


def sparsity(active, valid):
    """(token-level, chunk-level) sparsity of an activity mask (batch, length, experts)
    over the real tokens (`valid`, (batch, length)); chunks that hold padding are left
    out of the chunk level."""
    batch, length, experts = active.shape
    chunk = min(CHUNK, length)
    chunks = length // chunk
    used = jnp.any(active[:, :chunks * chunk].reshape(batch, chunks, chunk, experts), axis=2)
    whole = jnp.all(valid[:, :chunks * chunk].reshape(batch, chunks, chunk), axis=2)
    token = 1.0 - jnp.sum(active) / jnp.maximum(jnp.sum(valid) * experts, 1)
    chunk_level = 1.0 - jnp.sum(used * whole[..., None]) / jnp.maximum(
        jnp.sum(whole) * experts, 1)
    return token, chunk_level


def locality_loss(logits, pairs, sharpness: float):
    """Activation locality: mean over the (pair, expert) entries of the binary cross
    entropy of the logit `sharpness * z_t` against `sigmoid(sharpness * z_{t+1})`.
    `logits` (batch, length, experts); `pairs` (batch, length - 1): tokens t and t + 1
    are real and of one document."""
    x = sharpness * logits[:, :-1]
    target = jax.nn.sigmoid(sharpness * logits[:, 1:])
    bce = jax.nn.softplus(x) - x * target
    weights = pairs[..., None].astype(jnp.float32)
    return jnp.sum(bce * weights) / jnp.maximum(jnp.sum(weights) * logits.shape[-1], 1.0)


def shares(normalised, valid):
    """Each token's gates normalised to sum 1 over the experts (0 at padding and for a
    token with no active expert)."""
    return normalised / (jnp.sum(normalised, axis=-1, keepdims=True) + 1e-5) * valid[..., None]


def chunk_loss(normalised, valid, chunk_len: int):
    """Chunk sparsification: 1 - the mean over (chunk, expert) of prod_t (1 - p_{t,e}),
    p the gates normalised to sum 1 per token (0 at padding), over whole chunks of
    `min(chunk_len, length)` positions that hold a real token."""
    batch, length, experts = normalised.shape
    chunk = min(chunk_len, length)
    chunks = length // chunk
    p = shares(normalised, valid)[:, :chunks * chunk].reshape(batch, chunks, chunk, experts)
    none = jnp.exp(jnp.sum(jnp.log(1.0 - p + 1e-5), axis=2))  # no token uses the expert
    real = jnp.any(valid[:, :chunks * chunk].reshape(batch, chunks, chunk), axis=2)
    weights = real[..., None].astype(jnp.float32)
    return 1.0 - jnp.sum(none * weights) / jnp.maximum(jnp.sum(weights) * experts, 1.0)


def select_rows(gates, active, bound: int, rate: float, segment_ids, counters=None):
    """Pack each sequence's active (token, expert) pairs into `bound` rows under the causal
    budget (`efflm.layers.moe.capacity.causal_pairs` at `rate` rows per token; a token's
    largest gates first). Returns (positions, experts, row_gates), each (batch, bound),
    the kept pairs per expert (num_experts,), the number of active pairs dropped and the
    budget's counters after the chunk."""
    batch, length, num_experts = gates.shape
    _, order = jax.lax.top_k(jnp.where(active, gates, -jnp.inf), num_experts)
    asking = jnp.take_along_axis(active, order, axis=-1)
    keep, rank, counters = causal_pairs(jnp.zeros_like(order), asking, rate, segment_ids, 1,
                                        counters)
    dest = jnp.where(keep, rank, bound).reshape(batch, -1)  # out of range: dropped
    flat_gates = jnp.take_along_axis(gates, order, axis=-1).reshape(batch, -1)
    flat_positions = jnp.broadcast_to(jnp.repeat(jnp.arange(length, dtype=jnp.int32),
                                                 num_experts), dest.shape)
    b = jnp.arange(batch)[:, None]
    positions = jnp.zeros((batch, bound), jnp.int32).at[b, dest].set(flat_positions,
                                                                     mode="drop")
    spare = jnp.broadcast_to(jnp.arange(bound, dtype=jnp.int32) % num_experts, (batch, bound))
    experts = spare.at[b, dest].set(order.reshape(batch, -1).astype(jnp.int32), mode="drop")
    row_gates = jnp.zeros((batch, bound), gates.dtype).at[b, dest].set(flat_gates,
                                                                       mode="drop")
    load = jnp.zeros((num_experts,), jnp.float32).at[order.reshape(-1)].add(
        keep.reshape(-1).astype(jnp.float32))
    return positions, experts, row_gates, load, jnp.sum(asking) - jnp.sum(keep), counters


@dataclass
class ReluSettings:
    # Each sequence computes at most ceil(rows_per_token * length) (token, expert) rows,
    # filled in token order (a token's largest gates first); active pairs beyond that
    # are dropped and counted.
    rows_per_token: float = 2.0
    locality: float = 2e-3  # weight of the activation-locality loss
    sharpness: float = 100.0  # its sigmoid's steepness
    chunk: float = 0.05  # weight of the chunk-sparsification loss
    chunk_len: int = 64  # its chunk, in positions
    l1: float = 0.0  # weight of the L1 loss on the RMS-normalised ReLU gates
    balance: float = 0.1  # weight of E * sum_i f_i P_i over the kept pairs


class ReluRouter(Router):
    """ReLU + RMSNorm gates; a variable number of experts per token under a static bound
    on the rows of each sequence (`Routing.rows`)."""

    settings = ReluSettings
    report_statistics = (("token sparsity", "relu_token_sparsity"),
                         ("8-token chunk sparsity", "relu_chunk_sparsity"))

    @staticmethod
    def no_decay(cfg: ModelConfig) -> tuple[str, ...]:
        return ("norm_scale",)  # the logits' RMSNorm gain

    @nn.compact
    def __call__(self, x, carry: dict, segment_ids=None) -> tuple[Routing, dict]:
        cfg, moe = self.cfg, self.cfg.moe
        batch, length, d = x.shape
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.init_std), ("embed", None)),
            (d, moe.num_experts), jnp.float32)
        scale = self.param("norm_scale", nn.with_logical_partitioning(
            nn.initializers.ones, (None,)), (moe.num_experts,), jnp.float32)
        own = moe.relu
        gates, logits, normalised = relu_gates(x, kernel, scale, cfg.norm_eps)
        counters = None
        if decoding(self):  # the budget's counters, carried from token to token
            counters = self.variable("cache", "budget", counters_init, batch, 1)
        valid, starts = documents(segment_ids, batch, length)[:2]
        active = (logits > 0) & valid[..., None]
        if own.l1:
            sow_loss(self, "relu_l1", own.l1 * token_mean(
                jnp.sum(normalised, axis=-1).reshape(-1), valid.reshape(-1)))
        if own.locality and length > 1:
            pairs = valid[:, 1:] & valid[:, :-1] & ~starts[:, 1:]
            sow_loss(self, "relu_locality",
                     own.locality * locality_loss(logits, pairs, own.sharpness))
        if own.chunk:
            sow_loss(self, "relu_chunk", own.chunk * chunk_loss(normalised, valid,
                                                                own.chunk_len))
        # Decoding: a token may take every expert its budget allows, up to all of them.
        bound = (moe.num_experts * length if counters is not None
                 else rows_per_sequence(cfg, length))
        positions, experts, row_gates, load, dropped, after = select_rows(
            gates, active, bound, own.rows_per_token, segment_ids,
            None if counters is None else counters.value)
        if counters is not None:
            counters.value = after
        activity = jnp.sum(active, axis=(0, 1)).astype(jnp.float32)
        sow_stat(self, "relu_active_load_cv",
                 jnp.std(activity) / jnp.maximum(jnp.mean(activity), 1e-9))
        if own.balance:  # E * sum_i f_i P_i over the kept pairs and the real tokens
            share = token_mean(shares(normalised, valid).reshape(-1, moe.num_experts),
                               valid.reshape(-1))
            sow_loss(self, "balance", own.balance * moe.num_experts * jnp.sum(
                load / jnp.maximum(jnp.sum(load), 1.0) * share))
        token_sparsity, chunk_sparsity = sparsity(active, valid)
        sow_stat(self, "relu_token_sparsity", token_sparsity)
        sow_stat(self, "relu_chunk_sparsity", chunk_sparsity)
        sow_stat(self, "relu_active_per_token", token_mean(
            jnp.sum(active, axis=-1).reshape(-1), valid.reshape(-1)))
        sow_stat(self, "relu_overflow_fraction", dropped / jnp.maximum(jnp.sum(active), 1))
        total = jnp.sum(gates, axis=-1, keepdims=True)
        probs = jnp.where(total > 0, gates / jnp.where(total > 0, total, 1.0), 0.0)
        return Routing(experts, row_gates, probs.reshape(-1, moe.num_experts),
                       logits.reshape(-1, moe.num_experts),
                       rows=positions), carry

    @staticmethod
    def flops_per_token(cfg: ModelConfig) -> float:
        return 2 * cfg.d_model * cfg.moe.num_experts

    @staticmethod
    def rows_per_token(cfg: ModelConfig, seq_len: int = 0) -> float:
        """Expert rows computed per token, whether or not their pairs are active."""
        if not seq_len:
            return min(cfg.moe.num_experts, cfg.moe.relu.rows_per_token)
        return rows_per_sequence(cfg, seq_len) / seq_len

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        moe = cfg.moe
        check_positive("model.moe.relu.rows_per_token", moe.relu.rows_per_token)
        for key in ("l1", "locality", "chunk", "balance"):
            check_positive(f"model.moe.relu.{key}", getattr(moe.relu, key), allow_zero=True)
        check_positive("model.moe.relu.sharpness", moe.relu.sharpness)
        check_positive("model.moe.relu.chunk_len", moe.relu.chunk_len)
        if moe.relu.rows_per_token > moe.num_experts:
            raise ConfigError(f"model.moe.relu.rows_per_token={moe.relu.rows_per_token} is "
                              f"more than model.moe.num_experts={moe.num_experts} (every "
                              "pair of every token); lower it")
        if moe.dispatch != "dropless":
            raise ConfigError(f"model.moe.router=relu needs model.moe.dispatch=dropless (it "
                              f"bounds its rows itself, model.moe.relu.rows_per_token), got "
                              f"{moe.dispatch!r}")


def relu_picks(gates, active, rate: float, segment_ids=None):
    """(kept, dropped): by `causal_picks` over each token's active experts in decreasing
    gate order, the (b, t, e) pairs kept at `rate` rows per token, and the number of
    active pairs that were not (concrete inputs)."""
    g, a = np.asarray(gates), np.asarray(active)
    order = np.argsort(-np.where(a, g, -np.inf), axis=-1, kind="stable")
    asking = np.take_along_axis(a, order, axis=-1)
    keep = causal_picks(np.zeros_like(order), asking, rate, segment_ids)
    kept = {(b, t, int(order[b, t, j])) for b, t, j in zip(*np.nonzero(keep))}
    return kept, int(a.sum()) - len(kept)


def relu_reference(x, kernel, scale, weights, kept, eps: float):
    """Every expert on every token, kept for the pairs in `kept` (`relu_picks`, fixed so
    that gradients can be taken), weighted by the gate computed per token as
    `scale * relu / sqrt(mean(relu^2) + eps)`, `relu = max(x_t W_r, 0)`; summed per
    token. `x` (batch, length, d)."""
    gate_w, up_w, out_w = weights
    relu = jnp.maximum(x.astype(jnp.float32) @ kernel, 0.0)
    gates = scale * relu / jnp.sqrt(jnp.mean(relu ** 2, axis=-1, keepdims=True) + eps)
    mask = np.zeros(gates.shape, np.float32)
    for b, t, e in kept:
        mask[b, t, e] = 1.0
    h = jax.nn.silu(jnp.einsum("bld,edf->blef", x, gate_w)) * jnp.einsum(
        "bld,edf->blef", x, up_w)
    every = jnp.einsum("blef,efd->bled", h, out_w)
    return jnp.einsum("bled,ble->bld", every, gates * mask)
