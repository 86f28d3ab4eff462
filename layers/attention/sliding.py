"""Sliding-window attention with attention sinks (`model.attention.kind=sliding`).

A query at position p of its document attends to the keys of its document at positions
`p - window + 1 .. p` (token-exact), and to the document's first `sinks` tokens
("Efficient Streaming Language Models with Attention Sinks"; 0: none), each key once.
GQA and rotary positions as softmax attention; a window at least as long as the
sequence is softmax attention.

XLA path: queries in blocks of `block_size`; each block scores its own key block and the
`ceil((window - 1) / block_size)` blocks before it, plus each query's sink keys
(gathered from its document's start), in one softmax. The work per token is
`O(window + block_size + sinks)`, whatever the length.

Decoding keeps a ring buffer of the last `window` keys and values and the sink slots, so
the cache does not grow with the generated length, and a model of sliding layers only
may generate past `model.max_seq_len` (rotary positions are computed, not tabled: they
extrapolate beyond the trained lengths).

FLOPs count the query-key pairs the pattern keeps (each query's window and sinks, over a
sequence of one document), as softmax counts its causal half: the masked pairs of the
computed tiles are not credited.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import flax.linen as nn
import jax.numpy as jnp

from efflm.errors import ConfigError, check_positive
from efflm.layers.attention.context_parallel import context_parallel_attention, strategy
from efflm.layers.attention.softmax import dot_product_attention, softmax_impl
from efflm.layers.attention.sparse import (
    masked_reference,
    pad_to_blocks,
    pattern_flops,
    project_out,
    project_qkv,
    tiled_softmax,
    with_sinks,
)
from efflm.layers.common import decoding
from efflm.layers.contract import Mixer
from efflm.pallas_kernels.flash_attention import flash_attention, partitioned
from efflm.shapes import head_dim

if TYPE_CHECKING:
    from efflm.config import ModelConfig


def in_window(window: int):
    """`covered(query, key)` of a window: whether the window holds the key (indices)."""
    return lambda i, j: i - j < window


def sliding_pallas(q, k, v, segment_ids, window: int, sinks: int, block: int):
    """The Pallas path: the flash kernel's token-exact window, merged by log-sum-exp with
    the sink branch (XLA)."""
    out, lse = flash_attention(q, k, v, segment_ids=segment_ids, causal=True, window=window,
                               block_q=block, block_k=block, return_lse=True)
    if not sinks:
        return out
    return with_sinks(out, lse, q, k, v, segment_ids, in_window(window), sinks)


def sliding_attention(q, k, v, segment_ids, window: int, sinks: int, block: int):
    """The XLA path (see the module): q (batch, length, heads, dim); k, v (batch, length,
    kv_heads, dim); segment_ids (batch, length) or None."""
    t = q.shape[1]
    block = min(block, t)
    q, k, v, seg, n = pad_to_blocks(q, k, v, segment_ids, block)
    b = q.shape[0]
    back = min(-(-(window - 1) // block), n - 1)  # key blocks before the query's own
    span = (back + 1) * block

    def with_previous(a, fill):  # (batch, n, span, ...): each block's keys
        blocks = a.reshape(b, n, block, *a.shape[2:])
        padded = jnp.concatenate([jnp.full((b, back) + blocks.shape[2:], fill, a.dtype),
                                  blocks], axis=1)
        return jnp.concatenate([padded[:, i:i + n] for i in range(back + 1)], axis=2)

    keys, values, key_seg = with_previous(k, 0), with_previous(v, 0), with_previous(seg, -1)
    i = (jnp.arange(n) * block)[:, None, None] + jnp.arange(block)[None, :, None]
    j = ((jnp.arange(n) - back) * block)[:, None, None] + jnp.arange(span)[None, None, :]
    same = seg.reshape(b, n, block)[..., None] == key_seg[:, :, None, :]
    near = (j <= i) & (i - j < window)  # (n, block, span); j < 0 never matches
    out = tiled_softmax(q, k, v, seg, keys, values, same & near[None], in_window(window),
                        sinks, block)
    return out[:, :t]


def sliding_reference(q, k, v, segment_ids, window: int, sinks: int):
    """Full masked softmax with the token-level mask of the pattern."""
    return masked_reference(q, k, v, segment_ids, in_window(window), sinks)


def kept_pairs_per_token(window: int, sinks: int, seq_len: int) -> float:
    """Query-key pairs a token keeps, averaged over a document of `seq_len` tokens."""
    inside = sum(min(i + 1, window) for i in range(seq_len))
    sink = sum(min(sinks, max(0, i - window + 1)) for i in range(seq_len))
    return (inside + sink) / seq_len


def computed_pairs_per_token(window: int, sinks: int, block: int, seq_len: int) -> float:
    """Query-key pairs the XLA path scores per token: whole tiles of its blocks."""
    block = min(block, seq_len)
    n = -(-seq_len // block)
    back = min(math.ceil((window - 1) / block), n - 1)
    return n * block * ((back + 1) * block + sinks) / seq_len


@dataclass
class SlidingSettings:
    window: int = 128  # keys a query sees, itself included (token-exact)
    sinks: int = 4  # first tokens of each document every query also sees (0: none)
    block_size: int = 64  # query block of the XLA path


class SlidingAttention(Mixer):
    """Causal sliding-window attention with sinks (see the module)."""

    decodes = True
    decode_skips_tokens = True
    bounded_cache = True  # the ring of `window` keys and the sink slots
    @staticmethod
    def quant_targets(cfg: ModelConfig) -> tuple[str, ...]:
        return ("attention",)  # its projections go through the quantised-matmul hook
    settings = SlidingSettings
    resumable = ("block_size",)
    # Under mesh.sequence: only the window's halo travels (sinks = 0; with sinks, `auto`
    # leaves the split to XLA).
    context_parallel = ("halo",)

    @staticmethod
    def check_mesh(cfg: ModelConfig, mesh_shape: dict) -> None:
        sinks = cfg.attention.sliding.sinks
        n = mesh_shape.get("sequence", 1)
        if n > 1 and cfg.attention.context_parallel == "halo" and sinks:
            raise ConfigError(f"model.attention.sliding.sinks={sinks} under mesh.sequence={n}"
                              ": the halo strategy carries no sinks (a document's first "
                              "tokens may sit on any earlier device); set sinks=0, or "
                              "model.attention.context_parallel=auto to let XLA gather keys")

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        own = cfg.attention.sliding
        check_positive("model.attention.sliding.window", own.window)
        check_positive("model.attention.sliding.sinks", own.sinks, allow_zero=True)
        check_positive("model.attention.sliding.block_size", own.block_size)
        block = own.block_size
        if cfg.attention.impl == "pallas" and block & (block - 1):
            raise ConfigError(f"model.attention.sliding.block_size={block}: the Pallas "
                              "kernel's blocks must be a power of two (the XLA path takes "
                              "any)")

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
        own = cfg.attention.sliding
        return pattern_flops(cfg, kept_pairs_per_token(own.window, own.sinks, seq_len))

    @staticmethod
    def uncredited_pairs_per_token(cfg: ModelConfig, seq_len: int) -> float:
        own = cfg.attention.sliding
        return (computed_pairs_per_token(own.window, own.sinks, own.block_size, seq_len)
                - kept_pairs_per_token(own.window, own.sinks, seq_len))

    @nn.compact
    def __call__(self, x, positions, segment_ids, mask):
        cfg, own = self.cfg, self.cfg.attention.sliding
        q, k, v = project_qkv(self, x, positions)
        pallas = softmax_impl(cfg.attention.impl, head_dim(cfg), cfg.dtype) == "pallas"
        local = functools.partial(sliding_pallas if pallas else sliding_attention,
                                  window=own.window, sinks=own.sinks, block=own.block_size)
        if decoding(self):
            out = self._decode(q, k, v, positions, segment_ids)
        elif strategy(cfg, () if own.sinks else self.context_parallel, q.shape[1]):
            out = context_parallel_attention(q, k, v, segment_ids, "halo", attend=local,
                                             halo=own.window - 1)
        elif pallas:
            out = partitioned(local, q, k, v, segment_ids)
        else:
            out = local(q, k, v, segment_ids)
        return project_out(self, out)

    def _decode(self, q, k, v, positions, segment_ids):
        """Attend from the chunk to the sink slots, the ring of the last `window` keys and
        the chunk itself, then write the chunk into the ring and the sink slots. Tokens
        whose segment id is 0 (a layer they skip) are not written."""
        own = self.cfg.attention.sliding
        window, sinks = own.window, own.sinks
        b, n, kv, d = k.shape
        slots = sinks + window
        cache_k = self.variable("cache", "cached_key", jnp.zeros, (b, slots, kv, d), k.dtype)
        cache_v = self.variable("cache", "cached_value", jnp.zeros, (b, slots, kv, d), v.dtype)
        # Position + 1 of each slot's token; 0: empty (an empty cache is all zeros).
        cache_pos = self.variable("cache", "cached_position", jnp.zeros, (b, slots), jnp.int32)
        written = positions if segment_ids is None else jnp.where(segment_ids > 0,
                                                                   positions, -1)
        keys = jnp.concatenate([cache_k.value, k], axis=1)
        values = jnp.concatenate([cache_v.value, v], axis=1)
        key_pos = jnp.concatenate([cache_pos.value - 1, written], axis=1)[:, None, :]
        q_pos = positions[:, :, None]
        seen = (key_pos >= 0) & (key_pos <= q_pos)
        sink_slot = (jnp.arange(slots + n) < sinks)[None, None, :]
        chunk = (jnp.arange(slots + n) >= slots)[None, None, :]
        in_window = q_pos - key_pos < window
        # Sink slots count outside the window (inside it the ring holds the same token);
        # the chunk's own sink tokens count either way.
        mask = seen & jnp.where(sink_slot, ~in_window,
                                in_window | (chunk & (key_pos < sinks)))
        out = dot_product_attention(q, keys, values, mask[:, None])
        # Write: positions < sinks into their sink slot, the chunk's last `window` tokens
        # into the ring (slot sinks + position % window); anything else out of range.
        last = jnp.max(written, axis=1, keepdims=True)
        ring = jnp.where((written >= 0) & (written > last - window),
                         sinks + written % window, slots)
        sink = jnp.where((written >= 0) & (written < sinks), written, slots)
        rows = jnp.arange(b)[:, None]
        for slot in (ring, sink) if sinks else (ring,):
            cache_k.value = cache_k.value.at[rows, slot].set(k, mode="drop")
            cache_v.value = cache_v.value.at[rows, slot].set(v, mode="drop")
            cache_pos.value = cache_pos.value.at[rows, slot].set(written + 1, mode="drop")
        return out
