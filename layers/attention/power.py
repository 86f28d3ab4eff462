"""PowerAttention (`model.attention.kind=power`), "PowerAttention: Exponentially Scaling
of Receptive Fields for Effective Sparse Attention".

The row is cut into blocks of `block_size` tokens. A query sees, causally and inside its
document, the keys of its own block and of the blocks 1, 2, 4, 8, ... blocks behind
it, so the receptive field doubles with each layer while a query reads
`O(log(length / block_size))` blocks; optionally also its document's first `sinks`
tokens (those the pattern does not already show). The blocks are the row's, as the
kernel's static table is: in a packed row, a document's pattern depends on where it
starts (decoding, which starts every document at position 0, matches a document at the
start of its row).

XLA path: each query block gathers only its visible key blocks (its own and up to
`floor(log2(blocks - 1)) + 1` behind it, padded to that many) and the sink keys, in one
softmax. Pallas path: the block-sparse kernel on the same block table, merged by
log-sum-exp with the XLA sink branch. Decoding keeps a KV cache of `max_seq_len` and
reads, per query, only the slots of its visible blocks and sinks.

FLOPs count the query-key pairs the pattern keeps (over a sequence of one document), as
softmax counts its causal half; the masked pairs of the computed tiles are not credited.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efflm.errors import ConfigError, check_positive
from efflm.layers.attention.softmax import softmax_impl
from efflm.layers.attention.sparse import (
    gathered_softmax,
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
from efflm.pallas_kernels.block_sparse_attention import block_sparse_attention, power_block_mask
from efflm.pallas_kernels.flash_attention import partitioned
from efflm.shapes import head_dim

if TYPE_CHECKING:
    from efflm.config import ModelConfig


def covered(block: int):
    """`covered(query, key)`: whether the pattern shows the key (indices, elementwise)."""
    def show(i, j):
        d = i // block - j // block
        return (d == 0) | ((d > 0) & ((d & (d - 1)) == 0))
    return show


def block_table(blocks: int) -> np.ndarray:
    """(blocks, 1 + behind) key blocks per query block: its own, then 1, 2, 4, ... behind
    (-1 past the start)."""
    behind = max(1, blocks - 1).bit_length() if blocks > 1 else 0
    table = np.full((blocks, 1 + behind), -1, np.int32)
    for n in range(blocks):
        table[n, 0] = n
        for m in range(behind):
            if n - (1 << m) >= 0:
                table[n, 1 + m] = n - (1 << m)
    return table


def power_attention(q, k, v, segment_ids, block: int, sinks: int):
    """The XLA path (see the module): q (batch, length, heads, dim); k, v (batch, length,
    kv_heads, dim); segment_ids (batch, length) or None."""
    t = q.shape[1]
    q, k, v, seg, n = pad_to_blocks(q, k, v, segment_ids, block)
    b = q.shape[0]
    table = block_table(n)
    width = table.shape[1] * block
    gather = np.maximum(table, 0)

    def visible(a):  # (batch, n, width, ...): each query block's key blocks
        blocks = a.reshape(b, n, block, *a.shape[2:])
        return blocks[:, gather].reshape(b, n, width, *a.shape[2:])

    keys, values, key_seg = visible(k), visible(v), visible(seg)
    i = np.arange(n * block).reshape(n, block, 1)
    key_block = np.repeat(table, block, axis=1)[:, None, :]
    j = key_block * block + np.tile(np.arange(block), table.shape[1])[None, None, :]
    ok = (key_block >= 0) & (j <= i)  # (n, block, width)
    same = seg.reshape(b, n, block)[..., None] == key_seg[:, :, None, :]
    out = tiled_softmax(q, k, v, seg, keys, values, same & ok[None], covered(block), sinks,
                        block)
    return out[:, :t]


def power_reference(q, k, v, segment_ids, block: int, sinks: int):
    """Full masked softmax with the token-level mask of the pattern."""
    return masked_reference(q, k, v, segment_ids, covered(block), sinks)


def kept_pairs_per_token(block: int, sinks: int, seq_len: int) -> float:
    """Query-key pairs a token keeps, averaged over a document of `seq_len` tokens."""
    i = np.arange(seq_len)
    behind = np.array([int(n).bit_length() for n in i // block])  # blocks 1, 2, 4 ... back
    kept = (i % block + 1) + behind * block
    for j in range(min(sinks, seq_len)):  # a sink counts where the blocks do not show it
        kept += (j <= i) & ~np.asarray(covered(block)(i, j))
    return float(kept.sum()) / seq_len


@dataclass
class PowerSettings:
    block_size: int = 64  # tokens per block of the pattern (and of the kernel's tiles)
    sinks: int = 0  # first tokens of each document every query also sees (0: none)


class PowerAttention(Mixer):
    """Causal PowerAttention (see the module)."""

    decodes = True
    decode_skips_tokens = True
    @staticmethod
    def quant_targets(cfg: ModelConfig) -> tuple[str, ...]:
        return ("attention",)  # its projections go through the quantised-matmul hook
    settings = PowerSettings

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        own = cfg.attention.power
        check_positive("model.attention.power.block_size", own.block_size)
        check_positive("model.attention.power.sinks", own.sinks, allow_zero=True)
        block = own.block_size
        if block > cfg.max_seq_len:
            raise ConfigError(f"model.attention.power.block_size={block} is larger than "
                              f"model.max_seq_len={cfg.max_seq_len}: one block would hold "
                              "the whole sequence (softmax attention); lower it")
        if cfg.attention.impl == "pallas" and (block & (block - 1) or block < 16):
            raise ConfigError(f"model.attention.power.block_size={block}: the Pallas "
                              "kernel's blocks must be a power of two >= 16 (the XLA path "
                              "takes any)")

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
        own = cfg.attention.power
        return pattern_flops(cfg, kept_pairs_per_token(own.block_size, own.sinks, seq_len))

    @staticmethod
    def uncredited_pairs_per_token(cfg: ModelConfig, seq_len: int) -> float:
        """The XLA path scores whole tiles of its blocks."""
        own = cfg.attention.power
        n = -(-seq_len // own.block_size)
        width = block_table(n).shape[1] * own.block_size
        computed = n * own.block_size * (width + own.sinks) / seq_len
        return computed - kept_pairs_per_token(own.block_size, own.sinks, seq_len)

    @nn.compact
    def __call__(self, x, positions, segment_ids, mask):
        cfg, own = self.cfg, self.cfg.attention.power
        q, k, v = project_qkv(self, x, positions)
        if decoding(self):
            out = self._decode(q, k, v, positions, segment_ids)
        elif softmax_impl(cfg.attention.impl, head_dim(cfg), cfg.dtype) == "pallas":
            out = partitioned(lambda q, k, v, seg: power_pallas(
                q, k, v, seg, own.block_size, own.sinks), q, k, v, segment_ids)
        else:
            out = power_attention(q, k, v, segment_ids, own.block_size, own.sinks)
        return project_out(self, out)

    def _decode(self, q, k, v, positions, segment_ids):
        """Write the chunk into a KV cache at its positions (tokens with segment id 0
        not valid), then attend from each query to the cache slots `visible_slots` gives
        it: its pattern's blocks and sinks, not the whole cache."""
        own = self.cfg.attention.power
        b = k.shape[0]
        length = self.cfg.max_seq_len
        cached_k = self.variable("cache", "cached_key", jnp.zeros, (b, length, *k.shape[2:]),
                                 k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros,
                                 (b, length, *v.shape[2:]), v.dtype)
        valid = self.variable("cache", "valid", jnp.zeros, (b, length), jnp.bool_)
        rows = jnp.arange(b)[:, None]
        cached_k.value = cached_k.value.at[rows, positions].set(k)
        cached_v.value = cached_v.value.at[rows, positions].set(v)
        written = True if segment_ids is None else segment_ids > 0
        valid.value = valid.value.at[rows, positions].set(written)
        slots, shown = visible_slots(positions, own.block_size, own.sinks, length)
        take = jax.vmap(lambda a, i: a[i])  # per batch row: (chunk, span, ...)
        shown = shown & take(valid.value, slots)
        out, _ = gathered_softmax(q, take(cached_k.value, slots), take(cached_v.value, slots),
                                  shown)
        return out


def visible_slots(positions, block: int, sinks: int, length: int):
    """(slots, shown), each (batch, chunk, span): the cache slots a query at each position
    reads (its own block, the blocks 1, 2, 4, ... behind, then the sink slots) and which
    of them it sees (causal, inside the cache, each slot once: a sink only where no
    block shows it). `span` is fixed by the cache length, not by the position."""
    behind = max(1, -(-length // block) - 1).bit_length()
    p = positions[..., None]
    back = jnp.asarray([0] + [1 << m for m in range(behind)])
    starts = (p // block - back) * block  # (batch, chunk, 1 + behind)
    blocks = (starts[..., None] + jnp.arange(block)).reshape(*p.shape[:-1], -1)
    ok = (blocks >= 0) & (blocks <= p) & (starts >= 0).repeat(block, axis=-1)
    sink = jnp.broadcast_to(jnp.arange(sinks), (*p.shape[:-1], sinks))
    sink_ok = (sink <= p) & ~covered(block)(p, sink)
    slots = jnp.clip(jnp.concatenate([blocks, sink], axis=-1), 0, length - 1)
    return slots, jnp.concatenate([ok, sink_ok], axis=-1)


def power_pallas(q, k, v, segment_ids, block: int, sinks: int):
    """The Pallas path: the block-sparse kernel on PowerAttention's block table, merged by
    log-sum-exp with the sink branch (XLA)."""
    t = q.shape[1]
    table = power_block_mask(t, block_q=block, block_k=block)
    out, lse = block_sparse_attention(q, k, v, table, block_q=block, block_k=block,
                                      segment_ids=segment_ids, return_lse=True)
    if not sinks:
        return out
    return with_sinks(out, lse, q, k, v, segment_ids, covered(block), sinks)
