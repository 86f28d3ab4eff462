"""Softmax attention (`model.attention.kind=softmax`): the module, its plain-JAX paths
(full masked and query-blocked), its FLOPs and its decoding cache.

Every mixer takes `(x, positions, segment_ids, mask)`: `x` (batch, length, d_model),
`positions` and `segment_ids` (batch, length) int32 (segment 0 is padding), and
`mask` (batch or 1, 1, length, length) bool from `attention_mask`, computed once per
forward pass by the model and shared by all layers.

Decoding: while the `cache` collection is mutable (outside `init`), a mixer that sets
`decodes = True` keeps what later tokens need there: the cache is created at the batch
and length of the first such call (`efflm.train.generate.init_cache` makes it without
computing anything), each call writes its tokens at `positions`, and a `valid` mask
records the written slots.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflm.errors import ConfigError, check_positive
from efflm.layers.attention.context_parallel import (
    context_parallel_attention,
    strategy,
    ulysses_heads,
)
from efflm.layers.common import MASKED, resolve_impl, warn_once
from efflm.layers.contract import Mixer, SharedKV
from efflm.layers.dense import Dense, quant_kw
from efflm.layers.rotary import apply_rotary
from efflm.pallas_kernels.flash_attention import (
    flash_attention,
    partitioned_flash_attention,
    unsupported_reason,
)
from efflm.shapes import head_dim, num_kv_heads

if TYPE_CHECKING:
    from efflm.config import ModelConfig

def attention_mask(segment_ids, length: int, q_start: int = 0, q_len: int | None = None,
                   kv_len: int | None = None):
    """Causal mask that also keeps attention inside each packed segment.

    Shape (batch or 1, 1, q_len, kv_len) for queries q_start .. q_start + q_len and keys
    0 .. kv_len (default: all `length` positions).
    """
    q_len = length if q_len is None else q_len
    kv_len = length if kv_len is None else kv_len
    q_idx = jnp.arange(q_start, q_start + q_len)
    causal = q_idx[:, None] >= jnp.arange(kv_len)[None, :]
    if segment_ids is None:
        return causal[None, None]
    q_seg = segment_ids[:, q_start:q_start + q_len]
    same = q_seg[:, :, None] == segment_ids[:, None, :kv_len]
    return (same & causal[None])[:, None]


def dot_product_attention(q, k, v, mask):
    """Plain softmax attention with grouped-query heads, softmax in float32.

    q: (batch, length, heads, dim); k, v: (batch, kv_length, kv_heads, dim);
    mask: bool, broadcastable to (batch, 1, length, kv_length). K/V heads are
    shared by `heads // kv_heads` query heads without being repeated in memory.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    # Heads-major layout: each (batch, head) pair is one plain matmul for XLA.
    q = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, t, kv, h // kv, d)
    q = q.transpose(0, 2, 3, 1, 4)  # (b, kv, group, t, d)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (b, kv, s, d)
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        scores = jnp.where(mask[:, :, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def blocked_causal_attention(q, k, v, segment_ids, block: int):
    """Causal attention one query block at a time, over the key blocks up to its own.

    Equal to `dot_product_attention` with `attention_mask`, but skips the key blocks
    that causality masks entirely: about (n + 1) / 2n of the work for n blocks.
    """
    t = q.shape[1]
    outs = []
    for start in range(0, t, block):
        stop = min(start + block, t)
        mask = attention_mask(segment_ids, t, start, stop - start, stop)
        outs.append(dot_product_attention(q[:, start:stop], k[:, :stop], v[:, :stop], mask))
    return jnp.concatenate(outs, axis=1)


def softmax_attention(q, k, v, segment_ids, impl: str, block: int, mask=None):
    """One device's causal softmax attention: the flash kernel (impl=pallas), query blocks
    of `block` (when shorter than the length), or one masked softmax (`mask`: the
    model's, else built here)."""
    t = q.shape[1]
    if impl == "pallas":
        return flash_attention(q, k, v, segment_ids=segment_ids, causal=True)
    if block and t > block:
        return blocked_causal_attention(q, k, v, segment_ids, block)
    return dot_product_attention(q, k, v, attention_mask(segment_ids, t) if mask is None
                                 else mask)


def softmax_impl(impl: str, head_dim: int, dtype) -> str:
    """`resolve_impl` for softmax attention, falling back to XLA where the kernel can't go.

    Under `auto` an unsupported head_dim or dtype falls back to XLA with a one-time
    warning; under `impl=pallas` it is a ConfigError.
    """
    chosen = resolve_impl(impl, ("xla", "pallas"), "softmax attention")
    if chosen != "pallas":
        return chosen
    reason = unsupported_reason(head_dim, dtype)
    if reason is None:
        return chosen
    if impl == "pallas":
        raise ConfigError(f"model.attention.impl=pallas: {reason}; set "
                          "model.attention.impl=xla (or auto), or change "
                          "model.attention.head_dim / model.dtype")
    warn_once(f"softmax attention: {reason}; using impl=xla")
    return "xla"


def projection_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of the q, k, v and output projections."""
    heads, kv_heads = cfg.attention.num_heads, num_kv_heads(cfg)
    return 2 * cfg.d_model * head_dim(cfg) * (2 * heads + 2 * kv_heads)


def causal_mix_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the scores and the weighted values over the half of the
    length x length pairs that causality keeps (as FlashAttention reports): work on
    masked pairs never raises MFU."""
    return 2 * 2 * (seq_len / 2) * cfg.attention.num_heads * head_dim(cfg)


def cached_attention(module: nn.Module, q, k, v, positions, segment_ids=None):
    """Write `k`, `v` into the module's cache at `positions` (batch, length), then attend
    from `q` to every valid cached key at or before each query's position. Tokens whose
    `segment_ids` is 0 (a layer they skip) are written as not valid. Returns the output
    and the whole cache as a `SharedKV` (a valid slot is document 1)."""
    b = k.shape[0]
    cached_k = module.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_v = module.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    valid = module.variable("cache", "valid", jnp.zeros, k.shape[:2], jnp.bool_)
    rows = jnp.arange(b)[:, None]
    cached_k.value = cached_k.value.at[rows, positions].set(k)
    cached_v.value = cached_v.value.at[rows, positions].set(v)
    written = True if segment_ids is None else segment_ids > 0
    valid.value = valid.value.at[rows, positions].set(written)
    slots = jnp.arange(valid.value.shape[1])
    mask = valid.value[:, None, :] & (slots[None, None, :] <= positions[:, :, None])
    out = dot_product_attention(q, cached_k.value, cached_v.value, mask[:, None])
    return out, SharedKV(cached_k.value, cached_v.value,
                         jnp.broadcast_to(slots, valid.value.shape).astype(jnp.int32),
                         valid.value.astype(jnp.int32))


def shared_kv_attention(q, kv: SharedKV, positions, segment_ids):
    """Queries at `positions` (documents `segment_ids`, None: one) over the keys and
    values of `kv`: those of the query's document at or before its position, one full
    masked softmax (the queries and keys are different token sets, so no causal tiles
    are skipped)."""
    q_seg = jnp.ones(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    seg = kv.segment_ids[:, None, :]
    mask = ((seg == q_seg[:, :, None]) & (seg > 0)
            & (kv.positions[:, None, :] <= positions[:, :, None]))
    return dot_product_attention(q, kv.k, kv.v, mask[:, None])


@dataclass
class SoftmaxSettings:
    # impl=xla: queries in blocks of this many, each over the keys up to its own block
    # (skips what causality masks); 0: one full masked softmax.
    block_size: int = 128


class SoftmaxAttention(Mixer):
    """Causal multi-head attention with rotary positions and grouped-query K/V heads.

    Decodes through a KV cache (keys and values at their positions, K/V heads as
    grouped), always on the XLA path. Under `mesh.sequence` > 1 the length stays split
    (`context_parallel.py`: zig-zag or plain ring, Ulysses, all-gather; under
    impl=pallas each ring step is one flash-kernel call).
    """

    decodes = True
    decode_skips_tokens = True
    shares_kv = True

    @staticmethod
    def quant_targets(cfg: ModelConfig) -> tuple[str, ...]:
        return ("attention",)  # its projections go through the quantised-matmul hook
    context_parallel = ("zigzag", "ring", "ulysses", "allgather")
    settings = SoftmaxSettings
    resumable = ("block_size",)

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        check_positive("model.attention.softmax.block_size", cfg.attention.softmax.block_size,
                       allow_zero=True)

    @staticmethod
    def check_mesh(cfg: ModelConfig, mesh_shape: dict) -> None:
        n, tensor = mesh_shape.get("sequence", 1), mesh_shape.get("tensor", 1)
        if n == 1 or cfg.attention.context_parallel != "ulysses":
            return
        heads, kv_heads = cfg.attention.num_heads, num_kv_heads(cfg)
        if kv_heads % tensor == 0:  # heads split over tensor only when K/V heads are
            heads, kv_heads = heads // tensor, kv_heads // tensor
        if reason := ulysses_heads(heads, kv_heads, n):
            raise ConfigError(f"model.attention.context_parallel=ulysses: {reason} "
                              "(model.attention.num_heads / num_kv_heads)")

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
        return projection_flops(cfg) + causal_mix_flops(cfg, seq_len)

    @staticmethod
    def kv_flops_per_token(cfg: ModelConfig) -> float:
        return 2 * cfg.d_model * head_dim(cfg) * 2 * num_kv_heads(cfg)

    @nn.compact
    def __call__(self, x, positions, segment_ids, mask, kv=None, emit_kv=False):
        cfg = self.cfg
        heads, kv_heads, dim = cfg.attention.num_heads, num_kv_heads(cfg), head_dim(cfg)
        impl = softmax_impl(cfg.attention.impl, dim, cfg.dtype)
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=cfg.init_std,
                  **quant_kw(cfg, "attention"))
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5

        def project(out):
            out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
            return Dense((cfg.d_model,), ("heads", "head_dim", "embed"), in_dims=2,
                         dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=out_std,
                         name="out", **quant_kw(cfg, "attention"))(out)

        q = Dense((heads, dim), ("embed", "heads", "head_dim"), name="query", **kw)(x)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        theta = cfg.attention.rope_theta
        q = apply_rotary(q, positions, theta)
        if kv is not None:  # another call's keys and values
            out = shared_kv_attention(q, kv, positions, segment_ids)
            return project(out)
        k = Dense((kv_heads, dim), ("embed", "kv_heads", "head_dim"), name="key", **kw)(x)
        v = Dense((kv_heads, dim), ("embed", "kv_heads", "head_dim"), name="value", **kw)(x)
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        k = apply_rotary(k, positions, theta)
        block, cached = cfg.attention.softmax.block_size, None
        if self.is_mutable_collection("cache") and not self.is_initializing():
            out, cached = cached_attention(self, q, k, v, positions, segment_ids)
        elif cp := strategy(cfg, self.context_parallel, q.shape[1]):
            local = functools.partial(softmax_attention, impl=impl, block=block)
            out = context_parallel_attention(q, k, v, segment_ids, cp, block, impl,
                                             attend=local)
        elif impl == "pallas":
            out = partitioned_flash_attention(q, k, v, segment_ids, causal=True)
        else:
            out = softmax_attention(q, k, v, segment_ids, impl, block, mask)
        if not emit_kv:
            return project(out)
        if cached is None:  # this call's keys and values
            seg = jnp.ones(x.shape[:2], jnp.int32) if segment_ids is None else segment_ids
            cached = SharedKV(k, v, positions.astype(jnp.int32), seg)
        return project(out), cached
