"""Native Sparse Attention (`model.attention.kind=nsa`; "Native Sparse Attention:
Hardware-Aligned and Natively Trainable Sparse Attention"): three branches over the same
queries, mixed per head by learned sigmoid gates of the token.

- compressed: attention over block summaries. A block of `compress_block` (l) keys
  starts every `stride` (d) tokens; a learned map (an intra-block position embedding
  added, then a linear map of the flattened block, initialised to the block mean)
  turns each block of keys, and of values, into one key and one value. A query sees a
  block that ends at or before it and lies inside its document; a query before the
  first such block gets zero from this branch.
- selected: attention over the tokens of the top-`select_blocks` (n) key blocks of
  `select_block` (l') tokens, ranked by the compressed branch's probabilities summed
  over the query heads of a GQA group (the group shares its blocks) and mapped to the
  selection blocks by the paper's Eq. 9: each compressed block counts once for every
  stride of it that the selection block holds (blocks indexed by their first token).
  The query's own block and its document's first block are always taken; blocks after
  the query's are never; with fewer than n blocks available the rest are left empty.
- window: causal sliding-window attention over the last `window` tokens (the `sliding`
  kind's code, without sinks).

The rule on block sizes: `stride` divides `compress_block` and `select_block`.

XLA path: the compressed scores as one (length x compressed blocks) matrix; the
selected branch in a scan over query blocks of `block_size`, each gathering its
queries' selected keys and values (per K/V head), rematerialised in the backward so no
gathered block outlives its step; the window as `sliding`. Work per token is
O((length / stride + n l' + window) head_dim).

`model.attention.impl=pallas`: the selected branch by the Pallas kernel that reads
only the selected blocks (`pallas_kernels/selected_attention.py`; queries in blocks
of `block_size`), the window by the flash kernel; the compressed branch stays XLA (its
probabilities rank the blocks). Both kernels need `select_block` and `block_size`
powers of two >= 16. `auto` stays on XLA.

Decoding keeps the keys and values and the compressed blocks (each computed once, when
its last token is written), and reads only the selected blocks and the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from efflm.errors import ConfigError, check_positive
from efflm.layers.attention.sliding import (
    computed_pairs_per_token,
    sliding_attention,
    sliding_pallas,
    sliding_reference,
)
from efflm.layers.attention.softmax import dot_product_attention, softmax_impl
from efflm.layers.attention.sparse import (
    document_start,
    gathered_softmax,
    pattern_flops,
    project_out,
    project_qkv,
    segments,
)
from efflm.layers.common import MASKED, decoding, resolve_impl, sow_stat
from efflm.layers.contract import Mixer
from efflm.layers.dense import Dense
from efflm.pallas_kernels.flash_attention import partitioned
from efflm.pallas_kernels.selected_attention import selected_attention as selected_pallas
from efflm.pallas_kernels.selected_attention import selected_reference
from efflm.shapes import head_dim, num_kv_heads

if TYPE_CHECKING:
    from efflm.config import ModelConfig

BRANCHES = ("compressed", "selected", "window")


@dataclass
class NsaSettings:
    compress_block: int = 16  # l: keys summarised by one compressed block
    stride: int = 8  # d: a compressed block starts every `stride` tokens
    select_block: int = 16  # l': tokens per selection block
    select_blocks: int = 4  # n: selection blocks per query (own and document's first included)
    window: int = 32  # keys of the sliding-window branch, the query included
    block_size: int = 64  # query block of the XLA paths (selected, window)


def num_compressed(length: int, compress_block: int, stride: int) -> int:
    """Compressed blocks of a sequence: those that fit whole."""
    return 0 if length < compress_block else (length - compress_block) // stride + 1


class BlockCompressor(nn.Module):
    """One vector per block: (batch, blocks, l, kv_heads, dim) -> (batch, blocks, kv_heads,
    dim), a learned position embedding added to each of the l rows, then a linear map of
    the flattened block (starting as the mean of the rows)."""

    dtype: str = "float32"

    @nn.compact
    def __call__(self, blocks):
        rows, dim = blocks.shape[2], blocks.shape[4]
        position = self.param("position", nn.with_logical_partitioning(
            nn.initializers.zeros, (None, "head_dim")), (rows, dim), jnp.float32)
        kernel = self.param("kernel", nn.with_logical_partitioning(
            lambda key, shape, dtype: jnp.broadcast_to(jnp.eye(dim, dtype=dtype) / rows,
                                                       shape),
            (None, "head_dim", None)), (rows, dim, dim), jnp.float32)
        blocks = blocks.astype(self.dtype) + position[:, None].astype(self.dtype)
        return jnp.einsum("bnlkd,lde->bnke", blocks, kernel.astype(self.dtype),
                          preferred_element_type=jnp.float32).astype(self.dtype)


def block_rows(num_blocks: int, compress_block: int, stride: int):
    """(num_blocks, l) token index of each row of each compressed block."""
    return jnp.arange(num_blocks)[:, None] * stride + jnp.arange(compress_block)[None, :]


def compressed_visible(seg, ends, starts_seg, ends_seg):
    """(batch, length, blocks) bool: the block ends at or before the query and starts and
    ends in the query's document. `ends` (blocks,) token index of each block's last row;
    `starts_seg`, `ends_seg` (batch, blocks) the segment ids of its first and last rows."""
    own = seg[:, :, None]
    return ((ends[None, None, :] <= jnp.arange(seg.shape[1])[None, :, None])
            & (starts_seg[:, None, :] == own) & (ends_seg[:, None, :] == own))


def compressed_attention(q, k_cmp, v_cmp, visible):
    """(out float32 (b, t, h, d), probabilities (b, h, t, blocks) float32): softmax
    attention of each query over the compressed blocks it sees; 0 where it sees none."""
    b, t, h, d = q.shape
    kv = k_cmp.shape[2]
    qg = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bnkd->bkgtn", qg, k_cmp, preferred_element_type=jnp.float32)
    mask = visible[:, None, None]
    scores = jnp.where(mask, scores, MASKED)
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)
    out = jnp.einsum("bkgtn,bnkd->btkgd", probs.astype(v_cmp.dtype), v_cmp,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d), probs.reshape(b, h, t, -1)


def selection_scores(probs, length: int, own: NsaSettings):
    """Eq. 9: (…, compressed blocks) probabilities -> (…, selection blocks) importance of
    the blocks of `select_block` tokens of a `length`-token sequence, each compressed
    block counted once for every stride it shares with the selection block."""
    per_cmp, per_sel = own.compress_block // own.stride, own.select_block // own.stride
    num_sel = -(-length // own.select_block)
    units = num_sel * per_sel  # strides covered by the selection blocks
    nc = probs.shape[-1]
    lead = probs.shape[:-1]
    padded = jnp.zeros((*lead, units + per_cmp), probs.dtype)
    padded = padded.at[..., per_cmp:per_cmp + min(nc, units)].set(probs[..., :units])
    # Unit u is covered by compressed blocks u - per_cmp + 1 .. u.
    covered = sum(padded[..., per_cmp - n:per_cmp - n + units] for n in range(per_cmp))
    return covered.reshape(*lead, num_sel, per_sel).sum(-1)


def select(importance, positions, doc_start, own: NsaSettings):
    """Top-n selection blocks per (batch, kv head, query) from `importance` (batch,
    kv_heads, length, selection blocks): (indices int32, valid bool), both (batch,
    length, kv_heads, n). The query's own block and its document's first are forced;
    blocks after the query's or before its document's first are not available."""
    num_sel = importance.shape[-1]
    blocks = jnp.arange(num_sel)
    mine = (positions // own.select_block)[:, None, :, None]
    first = (doc_start // own.select_block)[:, None, :, None]
    available = (blocks <= mine) & (blocks >= first)
    forced = (blocks == mine) | (blocks == first)
    scores = jnp.where(forced, jnp.inf, jnp.where(available, importance, -jnp.inf))
    top, index = lax.top_k(lax.stop_gradient(scores), min(own.select_blocks, num_sel))
    valid = top > -jnp.inf
    return index.transpose(0, 2, 1, 3).astype(jnp.int32), valid.transpose(0, 2, 1, 3)


def gather_selected(k, v, seg_k, valid_k, index, valid, q_pos, q_seg, select_block: int):
    """The selected tokens of each query: keys and values (batch, queries, n l', kv_heads,
    dim) and which it sees (batch, queries, kv_heads, n l'). k, v (batch, keys, kv_heads,
    dim); seg_k (batch, keys) the keys' segments, valid_k which keys exist; index, valid
    (batch, queries, kv_heads, n); q_pos, q_seg (batch, queries)."""
    b, s, kv, dim = k.shape
    tq, n = index.shape[1], index.shape[3]
    num_sel = -(-s // select_block)
    tok = (index[..., None] * select_block + jnp.arange(select_block)).reshape(b, tq, kv, -1)
    shown = (jnp.repeat(valid, select_block, axis=-1) & (tok <= q_pos[:, :, None, None])
             & (tok < s))
    tok = jnp.minimum(tok, s - 1)
    flat = index.transpose(0, 2, 1, 3).reshape(b, kv, tq * n, 1)

    def take(a):  # whole blocks: (b, s, kv, dim) -> (b, tq, n l', kv, dim)
        a = jnp.pad(a, ((0, 0), (0, num_sel * select_block - s), (0, 0), (0, 0)))
        rows = a.reshape(b, num_sel, select_block, kv, dim).transpose(0, 3, 1, 2, 4)
        got = jnp.take_along_axis(rows.reshape(b, kv, num_sel, select_block * dim), flat,
                                  axis=2)
        return got.reshape(b, kv, tq, n * select_block, dim).transpose(0, 2, 3, 1, 4)

    rows = jnp.arange(b)[:, None, None, None]
    shown = shown & (seg_k[rows, tok] == q_seg[:, :, None, None]) & valid_k[rows, tok]
    return take(k), take(v), shown


def selected_attention(q, k, v, seg, index, valid, select_block: int, block: int):
    """The selected branch (XLA): queries in blocks of `block`, each gathering its
    queries' selected tokens inside a scan whose steps are rematerialised in the
    backward. Returns float32 (b, t, h, d)."""
    b, t, h, d = q.shape
    block = min(block, t)
    nq = -(-t // block)
    pad = nq * block - t
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    padded = lambda a, fill=0: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2),
                                       constant_values=fill)
    per_block = lambda a: jnp.moveaxis(a.reshape(b, nq, block, *a.shape[2:]), 1, 0)
    xs = tuple(per_block(padded(a)) for a in (q, index, valid, positions, seg))
    every = jnp.ones(seg.shape, bool)

    @jax.checkpoint
    def one(args):
        q_b, index_b, valid_b, pos_b, seg_b = args
        keys, values, shown = gather_selected(k, v, seg, every, index_b, valid_b, pos_b,
                                              seg_b, select_block)
        return gathered_softmax(q_b, keys, values, shown)[0].astype(jnp.float32)

    out = lax.map(one, xs)
    return jnp.moveaxis(out, 0, 1).reshape(b, nq * block, h, d)[:, :t]


def compressed_reference(q, k_cmp, v_cmp, seg, own: NsaSettings):
    """The compressed branch pair by pair: block i (tokens i d .. i d + l - 1) shown to
    query p when it ends at or before p and all its tokens are in p's document; a query
    shown none gives 0."""
    b, t = seg.shape
    rows = []
    for p in range(t):
        cols = []
        for i in range(k_cmp.shape[1]):
            first, last = i * own.stride, i * own.stride + own.compress_block - 1
            cols.append((last <= p) & jnp.all(seg[:, first:last + 1] == seg[:, p:p + 1], axis=1))
        rows.append(jnp.stack(cols, axis=-1) if cols else jnp.zeros((b, 0), bool))
    mask = jnp.stack(rows, axis=1)  # (b, t, blocks)
    out = dot_product_attention(q, k_cmp, v_cmp, mask[:, None]).astype(jnp.float32)
    return jnp.where(jnp.any(mask, -1)[..., None, None], out, 0.0)


def kept_pairs_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Query-key pairs a token keeps over the three branches, averaged over a sequence of
    one document of `seq_len` tokens."""
    own = cfg.attention.nsa
    nc = num_compressed(seq_len, own.compress_block, own.stride)
    total = 0
    for p in range(seq_len):
        seen = 0 if p < own.compress_block - 1 else (p - own.compress_block + 1) // own.stride + 1
        mine = p // own.select_block
        selected = (min(own.select_blocks, mine + 1) - 1) * own.select_block
        total += min(seen, nc) + selected + p - mine * own.select_block + 1 + min(p + 1,
                                                                                 own.window)
    return total / seq_len


class NativeSparseAttention(Mixer):
    """Native Sparse Attention (see the module)."""

    reference: bool = False  # the branches as full masked softmaxes (tests)

    decodes = True
    settings = NsaSettings
    resumable = ("block_size",)

    @staticmethod
    def quant_targets(cfg: ModelConfig) -> tuple[str, ...]:
        return ("attention",)  # its q/k/v/out projections go through the hook

    @staticmethod
    def validate_config(cfg: ModelConfig) -> None:
        own = cfg.attention.nsa
        for field in ("compress_block", "stride", "select_block", "select_blocks", "window",
                      "block_size"):
            check_positive(f"model.attention.nsa.{field}", getattr(own, field))
        if own.stride > own.compress_block:
            raise ConfigError(f"model.attention.nsa.stride={own.stride} is larger than "
                              f"model.attention.nsa.compress_block={own.compress_block}: "
                              "tokens between blocks would never be summarised")
        for field in ("compress_block", "select_block"):
            if getattr(own, field) % own.stride:
                raise ConfigError(f"model.attention.nsa.{field}={getattr(own, field)} must "
                                  f"be a multiple of model.attention.nsa.stride={own.stride}")
        available = -(-cfg.max_seq_len // own.select_block)
        if own.select_blocks > available:
            raise ConfigError(f"model.attention.nsa.select_blocks={own.select_blocks} is "
                              f"more than the {available} selection blocks of "
                              f"{own.select_block} tokens at model.max_seq_len="
                              f"{cfg.max_seq_len}")
        resolve_impl(cfg.attention.impl, ("xla", "pallas"), "nsa attention")
        if cfg.attention.impl == "pallas":
            for field in ("select_block", "block_size"):
                block = getattr(own, field)
                if block < 16 or block & (block - 1):
                    raise ConfigError(f"model.attention.nsa.{field}={block}: the Pallas "
                                      "kernels' blocks must be a power of two >= 16 (the "
                                      "XLA path takes any)")
            softmax_impl("pallas", head_dim(cfg), cfg.dtype)  # head_dim and dtype

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
        own = cfg.attention.nsa
        dim, heads = head_dim(cfg), cfg.attention.num_heads
        compress = (num_compressed(seq_len, own.compress_block, own.stride) / seq_len
                    * 2 * 2 * own.compress_block * dim * dim * num_kv_heads(cfg))
        gates = 2 * cfg.d_model * heads * len(BRANCHES)
        return pattern_flops(cfg, kept_pairs_per_token(cfg, seq_len)) + compress + gates

    @staticmethod
    def uncredited_pairs_per_token(cfg: ModelConfig, seq_len: int) -> float:
        """The XLA path scores every compressed block, n l' gathered tokens per (padded)
        query and the window's whole tiles."""
        own = cfg.attention.nsa
        block = min(own.block_size, seq_len)
        padded = -(-seq_len // block) * block
        computed = (num_compressed(seq_len, own.compress_block, own.stride)
                    + padded * own.select_blocks * own.select_block / seq_len
                    + computed_pairs_per_token(own.window, 0, own.block_size, seq_len))
        return computed - kept_pairs_per_token(cfg, seq_len)

    @nn.compact
    def __call__(self, x, positions, segment_ids, mask):
        cfg = self.cfg
        q, k, v = project_qkv(self, x, positions)
        gates = Dense((cfg.attention.num_heads, len(BRANCHES)), ("embed", "heads", None),
                      dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=cfg.init_std,
                      name="gates")(x)
        gates = jax.nn.sigmoid(gates.astype(jnp.float32))
        compress_k = BlockCompressor(cfg.dtype, name="compress_key")
        compress_v = BlockCompressor(cfg.dtype, name="compress_value")
        if decoding(self):
            outs, agreement = self._decode(q, k, v, positions, compress_k, compress_v)
        else:
            outs, agreement = self._full(q, k, v, segment_ids, compress_k, compress_v)
        out = sum(gates[..., i, None] * o for i, o in enumerate(outs))
        for i, name in enumerate(BRANCHES):
            sow_stat(self, f"nsa_gate_{name}", jnp.mean(gates[..., i]))
        sow_stat(self, "nsa_group_agreement", agreement)
        return project_out(self, out.astype(cfg.dtype))

    def _full(self, q, k, v, segment_ids, compress_k, compress_v):
        own = self.cfg.attention.nsa
        b, t = q.shape[:2]
        seg = segments(segment_ids, b, t)
        nc = num_compressed(t, own.compress_block, own.stride)
        rows = block_rows(nc, own.compress_block, own.stride)
        k_cmp, v_cmp = compress_k(k[:, rows]), compress_v(v[:, rows])
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        visible = compressed_visible(seg, rows[:, -1], seg[:, rows[:, 0]], seg[:, rows[:, -1]])
        out_c, probs = compressed_attention(q, k_cmp, v_cmp, visible)  # probs rank blocks
        index, valid, agreement = self._select(probs, positions, document_start(seg), t)
        if self.reference:
            out_c = compressed_reference(q, k_cmp, v_cmp, seg, own)
            out_s = selected_reference(q, k, v, index, valid, select_block=own.select_block,
                                       segment_ids=seg)
            out_w = sliding_reference(q, k, v, seg, own.window, 0)
        elif self.cfg.attention.impl == "pallas":
            out_s = partitioned(
                lambda q, k, v, ids, index, valid: selected_pallas(
                    q, k, v, index, valid, select_block=own.select_block, segment_ids=ids,
                    block_q=own.block_size), q, k, v, segment_ids, extra=(index, valid))
            out_w = partitioned(lambda q, k, v, ids: sliding_pallas(
                q, k, v, ids, own.window, 0, own.block_size), q, k, v, segment_ids)
        else:
            out_s = selected_attention(q, k, v, seg, index, valid, own.select_block,
                                       own.block_size)
            out_w = sliding_attention(q, k, v, seg, own.window, 0, own.block_size)
        return (out_c, out_s.astype(jnp.float32), out_w.astype(jnp.float32)), agreement

    def _select(self, probs, positions, doc_start, length: int):
        """(index, valid, agreement): the group's selection, and the mean share of each
        head's own top-n blocks that the group's selection holds."""
        own, kv = self.cfg.attention.nsa, num_kv_heads(self.cfg)
        b, h = probs.shape[:2]
        per_head = selection_scores(lax.stop_gradient(probs), length, own)
        group = per_head.reshape(b, kv, h // kv, *per_head.shape[2:]).sum(2)
        index, valid = select(group, positions, doc_start, own)
        alone, alone_valid = select(per_head, positions, doc_start, own)  # (b, t, h, n)
        shared = jnp.repeat(index, h // kv, axis=2)
        shared_valid = jnp.repeat(valid, h // kv, axis=2)
        hits = jnp.any((alone[..., :, None] == shared[..., None, :]) & shared_valid[..., None, :],
                       axis=-1) & alone_valid
        agreement = jnp.sum(hits) / jnp.maximum(jnp.sum(alone_valid), 1)
        return index, valid, agreement

    def _decode(self, q, k, v, positions, compress_k, compress_v):
        """Write the chunk's keys and values, compute the compressed blocks it completes,
        then attend from each query over the cache: compressed blocks, its selected
        blocks and its window (one document: generation's)."""
        own = self.cfg.attention.nsa
        b, n, kv, dim = k.shape
        cache_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cache_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        written = self.variable("cache", "valid", jnp.zeros, k.shape[:2], jnp.bool_)
        s = cache_k.value.shape[1]
        nc = num_compressed(s, own.compress_block, own.stride)
        cmp_k = self.variable("cache", "compressed_key", jnp.zeros, (b, nc, kv, dim), k.dtype)
        cmp_v = self.variable("cache", "compressed_value", jnp.zeros, (b, nc, kv, dim),
                              v.dtype)
        rows = jnp.arange(b)[:, None]
        cache_k.value = cache_k.value.at[rows, positions].set(k)
        cache_v.value = cache_v.value.at[rows, positions].set(v)
        written.value = written.value.at[rows, positions].set(True)
        # The blocks whose last token is in this chunk: at most n // stride + 1 of them.
        first_end = positions[:, :1] - (own.compress_block - 1)
        lo = jnp.maximum(-(-first_end // own.stride), 0)
        cand = lo + jnp.arange(n // own.stride + 1)  # (b, m)
        ends = cand * own.stride + own.compress_block - 1
        done = (ends <= positions[:, -1:]) & (cand < nc)
        toks = jnp.minimum(cand[..., None] * own.stride + jnp.arange(own.compress_block), s - 1)
        new_k = compress_k(cache_k.value[rows[..., None], toks])
        new_v = compress_v(cache_v.value[rows[..., None], toks])
        slot = jnp.where(done, cand, nc)
        cmp_k.value = cmp_k.value.at[rows, slot].set(new_k, mode="drop")
        cmp_v.value = cmp_v.value.at[rows, slot].set(new_v, mode="drop")

        all_ends = jnp.arange(nc) * own.stride + own.compress_block - 1
        done_all = all_ends[None, None, :] <= positions[:, :, None]  # (b, n, nc)
        out_c, probs = compressed_attention(q, cmp_k.value, cmp_v.value, done_all)
        index, valid, agreement = self._select(probs, positions, jnp.zeros_like(positions), s)
        seg_k = jnp.ones((b, s), jnp.int32)
        keys, values, shown = gather_selected(cache_k.value, cache_v.value, seg_k,
                                              written.value, index, valid, positions,
                                              jnp.ones_like(positions), own.select_block)
        out_s = gathered_softmax(q, keys, values, shown)[0].astype(jnp.float32)
        tok = positions[..., None] - jnp.arange(own.window)
        seen = (tok >= 0) & written.value[rows[..., None], jnp.maximum(tok, 0)]
        tok = jnp.maximum(tok, 0)
        win_k = cache_k.value[rows[..., None], tok]
        win_v = cache_v.value[rows[..., None], tok]
        out_w = gathered_softmax(q, win_k, win_v, seen)[0].astype(jnp.float32)
        return (out_c, out_s, out_w), agreement
