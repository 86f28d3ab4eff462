"""PowerAttention (`layers/attention/power.py`): the gathered-blocks XLA path and the
block-sparse Pallas path (interpret mode) against the full masked softmax of the
token-level mask, the block table, FLOPs that grow as the log of the length, the
presets, bad settings."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import attention_against_reference, packed_batch_losses

from efflm.cli import main
from efflm.config import load_config
from efflm.layers.attention.power import (
    PowerAttention,
    block_table,
    covered,
    power_attention,
    power_pallas,
    power_reference,
    visible_slots,
)


def _check(path, dtype, tol, block, sinks):
    attention_against_reference(
        lambda q, k, v, seg: path(q, k, v, seg, block, sinks),
        lambda q, k, v, seg: power_reference(q, k, v, seg, block, sinks), dtype, tol)


@pytest.mark.parametrize("dtype, tol, block, sinks", [
    (jnp.float32, 2e-5, 4, 2),  # 10 blocks: 1, 2, 4 and 8 behind; sinks
    (jnp.float32, 2e-5, 5, 0),
    (jnp.bfloat16, 3e-2, 4, 2)])
def test_gathered_blocks_equal_the_masked_reference(dtype, tol, block, sinks):
    _check(power_attention, dtype, tol, block, sinks)


@pytest.mark.filterwarnings("ignore:.*runs in interpret mode")
def test_pallas_path_in_interpret_mode_equals_the_masked_reference():
    """The block-sparse kernel on the same table, merged with the sinks by log-sum-exp."""
    _check(power_pallas, jnp.float32, 2e-5, 16, 2)


def test_each_block_reads_itself_and_the_power_of_two_distances_behind():
    table = block_table(10)
    assert table.shape == (10, 1 + 4)  # 9 blocks back at most: 1, 2, 4, 8
    assert table[9].tolist() == [9, 8, 7, 5, 1] and table[3].tolist() == [3, 2, 1, -1, -1]


@pytest.mark.parametrize("block, sinks, length", [(4, 2, 40), (5, 0, 37), (4, 6, 64)])
def test_decoding_reads_each_visible_slot_once_and_no_other(block, sinks, length):
    """The slots a decoding query reads are exactly those the pattern and its sinks show
    it at or before its position, each once, in a span far below the cache length."""
    positions = jnp.arange(length)[None]
    slots, shown = (np.asarray(a)[0] for a in visible_slots(positions, block, sinks, length))
    assert slots.shape[1] < length
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    want = (j <= i) & (np.asarray(covered(block)(i, j)) | (j < sinks))
    for p in range(length):
        seen = slots[p][shown[p]]
        assert len(set(seen.tolist())) == len(seen), p
        assert sorted(seen.tolist()) == np.flatnonzero(want[p]).tolist(), p


def test_flops_grow_as_the_log_of_the_length():
    """Per token, the attention pairs of 8K tokens are a few times those of 512, not 16x
    as softmax's are."""
    cfg = load_config("tiny_power").model
    mix = [PowerAttention.flops_per_token(cfg, n) - PowerAttention.flops_per_token(cfg, 64)
           for n in (512, 8192)]
    assert 1 < mix[1] / mix[0] < 3


@pytest.mark.parametrize("preset", ["tiny_power"])
def test_preset_trains(small_config, preset):
    """A few steps on one packed batch lower the loss (blocks of 4: the test's length is
    32)."""
    cfg = small_config("optimizer.warmup_steps=0", "model.num_layers=2",
                       "model.attention.power.block_size=4", preset=preset)
    losses = packed_batch_losses(cfg)
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("setting, key", [
    ("block_size=0", "block_size"), ("sinks=-2", "sinks"),
    ("block_size=2048", "block_size=2048 is larger than model.max_seq_len"),
    ("block_size=24 model.attention.impl=pallas", "block_size=24: the Pallas")])
def test_bad_settings_exit_2_naming_the_key(capsys, setting, key):
    assert main(["config", "show", "--config", "tiny_power",
                 *f"model.attention.power.{setting}".split()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"model.attention.power.{key}" in err[0], err
