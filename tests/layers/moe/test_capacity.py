"""Causal capacity (`layers/moe/capacity.py`): the parallel form against the plain loop,
and a sequence decided in chunks (as decoding does) equal to one pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflm.layers.moe.capacity import causal_pairs, causal_picks, row_capacity

B, L, K, N = 3, 23, 3, 5
# Row 0 one document; row 1 three, the last cut by padding; row 2 many short ones.
SEGMENTS = np.asarray([[1] * L, [1] * 9 + [2] * 6 + [3] * 5 + [0] * 3,
                       [1, 1, 2, 3, 3, 3, 4, 5, 5, 6, 6, 6, 6, 7, 8, 8, 9, 9, 9, 9, 10, 0, 0]])


def _inputs(seed):
    """Choices of K distinct targets per token (their order the choice order), some not
    asking."""
    rng = np.random.default_rng(seed)
    targets = np.argsort(rng.random((B, L, N)), axis=-1)[..., :K]
    return targets.astype(np.int32), rng.random((B, L, K)) < 0.8


run = jax.jit(causal_pairs, static_argnums=(2, 4))


@pytest.mark.parametrize("rate", [0.25, 0.45, 0.6])
def test_parallel_rule_equals_the_loop(rate):
    """Kept pairs equal the loop's for packed documents and padding; ranks are distinct
    per (row, target), and no row keeps more per target than its real tokens' share (so
    the static `row_capacity` slots hold them)."""
    targets, asking = _inputs(int(rate * 10))
    keep, rank, _ = run(targets, asking, rate, SEGMENTS, N)
    want = causal_picks(targets, asking, rate, SEGMENTS)
    np.testing.assert_array_equal(keep, want)
    assert 0 < want.sum() < (asking & (SEGMENTS > 0)[..., None]).sum()  # some dropped
    keep, rank = np.asarray(keep), np.asarray(rank)
    for b in range(B):
        for g in range(N):
            ranks = rank[b][keep[b] & (targets[b] == g)]
            assert sorted(ranks.tolist()) == list(range(len(ranks)))
    assert rank[keep].max() < row_capacity(rate, L)
    real = (SEGMENTS > 0).sum(1)
    for b in range(B):
        per_target = np.bincount(targets[b][keep[b]], minlength=N)
        assert per_target.max() <= row_capacity(rate, int(real[b]))


def test_chunks_with_counters_equal_one_pass():
    """One document per row decided in chunks of 7, 1, 1 and the rest, the counters of
    each chunk passed to the next, keeps what one pass keeps."""
    targets, asking = _inputs(3)
    whole, _, _ = run(targets, asking, 0.6, None, N)
    counters, parts = None, []
    for lo, hi in ((0, 7), (7, 8), (8, 9), (9, L)):
        keep, _, counters = run(targets[:, lo:hi], asking[:, lo:hi], 0.6, None, N, counters)
        parts.append(keep)
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)
    assert 0 < int(jnp.sum(whole)) < asking.sum()
