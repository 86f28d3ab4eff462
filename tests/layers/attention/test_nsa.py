"""Native Sparse Attention (`layers/attention/nsa.py`): each branch's XLA path against its
plain reference (packed documents, lengths off the block sizes), the selection rules
and Eq. 9, the preset, the statistics, bad settings. (Causality, decoding, FLOPs and the
whole layer against its reference: tests/test_kinds.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SPARSE_SEGMENTS, attention_against_reference, fast_jit, packed_batch_losses

from efflm.cli import main
from efflm.layers.attention.nsa import (
    NsaSettings,
    block_rows,
    compressed_attention,
    compressed_reference,
    compressed_visible,
    num_compressed,
    select,
    selected_attention,
    selected_reference,
    selection_scores,
)
from efflm.layers.attention.sparse import document_start

# Compressed blocks of 4 every 2 tokens, selection blocks of 4, 3 per query: over
# SPARSE_SEGMENTS' 37 tokens (documents of 15, 4 and 15 tokens, 3 of padding) blocks
# straddle documents and no length is a block multiple.
OWN = NsaSettings(compress_block=4, stride=2, select_block=4, select_blocks=3, window=6,
                  block_size=5)
T = SPARSE_SEGMENTS.shape[1]


def _compressed(k, v):
    """Compressed keys and values as the block means (the map's starting point)."""
    rows = block_rows(num_compressed(T, OWN.compress_block, OWN.stride), OWN.compress_block,
                      OWN.stride)
    return k[:, rows].mean(2), v[:, rows].mean(2), rows


def test_compressed_branch_equals_its_reference():
    def fast(q, k, v, seg):
        k_cmp, v_cmp, rows = _compressed(k, v)
        visible = compressed_visible(seg, rows[:, -1], seg[:, rows[:, 0]], seg[:, rows[:, -1]])
        return compressed_attention(q, k_cmp, v_cmp, visible)[0]

    def reference(q, k, v, seg):
        k_cmp, v_cmp, _ = _compressed(k, v)
        return compressed_reference(q, k_cmp, v_cmp, seg, OWN)

    attention_against_reference(fast, reference, jnp.float32, 2e-5)


def _random_selection(seg):
    """A selection by the rules from random importances, (index, valid)."""
    b, t = seg.shape
    importance = jax.random.uniform(jax.random.key(3), (b, 2, t, -(-t // OWN.select_block)))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    return select(importance, positions, document_start(seg), OWN)


def test_selected_branch_equals_its_reference_with_the_same_selection():
    """The scan over query blocks of 5 (gathering each query's blocks, rematerialised in
    the backward) against one masked softmax per K/V head."""
    def fast(q, k, v, seg):
        index, valid = _random_selection(seg)
        return selected_attention(q, k, v, seg, index, valid, OWN.select_block,
                                  OWN.block_size)

    def reference(q, k, v, seg):
        return selected_reference(q, k, v, *_random_selection(seg),
                                  select_block=OWN.select_block, segment_ids=seg)

    attention_against_reference(fast, reference, jnp.float32, 2e-5)


@pytest.mark.filterwarnings("ignore:.*runs in interpret mode")
def test_pallas_layer_equals_the_xla_layer(small_config):
    """impl=pallas (the selected branch by its kernel, the window by flash, in
    interpret mode) against impl=xla: a one-layer model's logits on packed documents,
    blocks of 16 over 48 tokens. (The kernels' gradients against the reference:
    tests/pallas_kernels/test_selected_attention.py.)"""
    from efflm.models import LM

    blocks = ["model.attention.nsa.compress_block=16", "model.attention.nsa.stride=8",
              "model.attention.nsa.select_block=16", "model.attention.nsa.select_blocks=2",
              "model.attention.nsa.window=16", "model.attention.nsa.block_size=16",
              "model.num_layers=1"]
    tokens = jax.random.randint(jax.random.key(0), (2, 48), 0, 256)
    seg = jnp.asarray([[1] * 20 + [2] * 28, [1] * 40 + [0] * 8])
    logits = {}
    for impl in ("xla", "pallas"):
        model = LM(small_config(*blocks, f"model.attention.impl={impl}",
                                preset="tiny_nsa").model)
        if impl == "xla":
            variables = fast_jit(model.init)(jax.random.key(1), tokens)
        logits[impl] = np.asarray(fast_jit(lambda v, x, s, m=model: m.apply(
            v, x, segment_ids=s))(variables, tokens, seg)) * np.asarray(seg > 0)[..., None]
    np.testing.assert_allclose(logits["pallas"], logits["xla"], rtol=1e-5,
                               atol=1e-5 * np.abs(logits["xla"]).max())


def test_selection_keeps_own_and_first_blocks_never_later_ones_and_pads_early_queries():
    seg = jnp.asarray(SPARSE_SEGMENTS)
    index, valid = (np.asarray(a) for a in _random_selection(seg))
    start = np.asarray(document_start(seg))
    for b in range(seg.shape[0]):
        for t in range(T):
            own, first = t // OWN.select_block, start[b, t] // OWN.select_block
            for kv in range(2):
                chosen = set(index[b, t, kv][valid[b, t, kv]].tolist())
                assert {own, first} <= chosen and max(chosen) == own
                assert min(chosen) >= first
                # Fewer blocks than n available: the rest are padding, not refused.
                assert len(chosen) == min(OWN.select_blocks, own - first + 1)


def test_selection_scores_follow_eq_9():
    """l = 2d, l' = 2d: selection block j holds strides 2j and 2j + 1, covered by
    compressed blocks 2j - 1, 2j (twice) and 2j + 1."""
    probs = jnp.eye(8)  # compressed block i alone
    scores = np.asarray(selection_scores(probs, 16, OWN))  # 4 selection blocks
    want = np.zeros((8, 4))
    for i in range(8):
        for j in range(4):
            want[i, j] = {2 * j - 1: 1, 2 * j: 2, 2 * j + 1: 1}.get(i, 0)
    np.testing.assert_array_equal(scores, want)


def test_preset_trains_and_logs_gates_and_agreement(small_config):
    """Five steps on one packed batch lower the loss; a forward pass logs each branch's
    mean gate (a sigmoid) and the heads' agreement with their group's blocks."""
    from efflm.layers.common import STATS
    from efflm.models import LM

    cfg = small_config("optimizer.warmup_steps=0", "model.attention.nsa.compress_block=8",
                       "model.attention.nsa.stride=4", "model.attention.nsa.select_block=8",
                       "model.attention.nsa.select_blocks=2", "model.attention.nsa.window=8",
                       preset="tiny_nsa")
    losses = packed_batch_losses(cfg)
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses
    model = LM(cfg.model)
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 256)
    variables = fast_jit(model.init)(jax.random.key(1), tokens)
    _, sown = fast_jit(lambda v, x: model.apply(v, x, mutable=[STATS]))(variables, tokens)
    stats = {jax.tree_util.keystr(p).split("'")[-2]: float(v)
             for p, v in jax.tree_util.tree_flatten_with_path(sown[STATS])[0]}
    for name in ("compressed", "selected", "window"):
        assert 0 < stats[f"mean:nsa_gate_{name}"] < 1
    assert 0 < stats["mean:nsa_group_agreement"] <= 1


@pytest.mark.parametrize("setting, key", [
    ("model.attention.nsa.select_blocks=65", "nsa.select_blocks"),  # 64 of 16 at 1024
    ("model.attention.nsa.stride=32", "nsa.stride"),
    ("model.attention.nsa.compress_block=20", "nsa.compress_block"),
    ("model.attention.nsa.select_block=12", "nsa.select_block"),
    ("model.attention.nsa.window=0", "nsa.window"),
    ("model.attention.impl=pallas model.attention.nsa.select_block=24", "select_block=24"),
    ("model.attention.impl=pallas model.attention.nsa.block_size=48", "block_size=48"),
])
def test_bad_settings_exit_2_naming_the_key(capsys, setting, key):
    assert main(["config", "show", "--config", "tiny_nsa", *setting.split()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0], err


def test_presets_hold_the_blocks_their_headers_state():
    from efflm.config import load_config

    short, long = (load_config(p).model for p in ("tiny_nsa", "tiny_nsa_long"))
    s, lng = short.attention.nsa, long.attention.nsa
    assert num_compressed(256, s.compress_block, s.stride) == 31
    assert s.select_blocks * s.select_block == 64 and s.window == 32
    assert long.max_seq_len == 2048 and lng.select_blocks * lng.select_block == 512
    assert (lng.compress_block, lng.stride, lng.window) == (32, 16, 256)
