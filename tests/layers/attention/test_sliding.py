"""Sliding-window attention with sinks (`layers/attention/sliding.py`): the blocked XLA
path against the full masked softmax of the token-level mask, a window as long as the
sequence against softmax attention, the preset, bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SPARSE_SEGMENTS, attention_against_reference, fast_jit, packed_batch_losses

from efflm.cli import main
from efflm.layers.attention.sliding import (
    sliding_attention,
    sliding_pallas,
    sliding_reference,
)
from efflm.layers.attention.softmax import attention_mask, dot_product_attention


def _against_reference(path, dtype, tol, window, sinks, block):
    attention_against_reference(
        lambda q, k, v, seg: path(q, k, v, seg, window, sinks, block),
        lambda q, k, v, seg: sliding_reference(q, k, v, seg, window, sinks), dtype, tol)


@pytest.mark.parametrize("dtype, tol, window, sinks, block", [
    (jnp.float32, 2e-5, 5, 2, 4),  # the window over two key blocks, sinks
    (jnp.float32, 2e-5, 16, 0, 5),  # over four, no sinks
    (jnp.bfloat16, 3e-2, 5, 2, 4)])
def test_blocked_path_equals_the_masked_reference(dtype, tol, window, sinks, block):
    _against_reference(sliding_attention, dtype, tol, window, sinks, block)


@pytest.mark.filterwarnings("ignore:.*runs in interpret mode")
def test_pallas_path_in_interpret_mode_equals_the_masked_reference():
    """The flash kernel's window merged with the sink branch by log-sum-exp."""
    _against_reference(sliding_pallas, jnp.float32, 2e-5, 5, 2, 16)


def test_a_window_as_long_as_the_sequence_is_softmax():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 37, 4, 8)), jnp.float32) for _ in "qkv")
    seg = jnp.asarray(SPARSE_SEGMENTS)
    full = fast_jit(dot_product_attention)(q, k, v, attention_mask(seg, 37))
    sliding = fast_jit(sliding_attention, static_argnums=(4, 5, 6))
    np.testing.assert_allclose(sliding(q, k, v, seg, 37, 4, 8), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny_sliding", "tiny_sliding_hybrid"])
def test_preset_trains(small_config, preset):
    """A few steps on one packed batch lower the loss (window 16: the test's length is
    32); the hybrid at its 4 layers, one of them softmax."""
    layers = 4 if preset == "tiny_sliding_hybrid" else 2
    cfg = small_config("optimizer.warmup_steps=0", f"model.num_layers={layers}",
                       "model.attention.sliding.window=16", preset=preset)
    losses = packed_batch_losses(cfg)
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("setting", ["window=0", "sinks=-1", "block_size=0",
                                     "block_size=48 model.attention.impl=pallas"])
def test_bad_settings_exit_2_naming_the_key(capsys, setting):
    assert main(["config", "show", "--config", "tiny_sliding",
                 *f"model.attention.sliding.{setting}".split()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"model.attention.sliding.{setting.split('=')[0]}" in err[0]


def test_generation_goes_past_max_seq_len_as_a_longer_model_would(small_config):
    """Sliding layers only: the ring buffer lets greedy generation run past
    model.max_seq_len (16), token for token as the full forward pass of the same weights
    under max_seq_len 64 (rotary positions are computed, so the weights do not change)."""
    import flax.linen as nn

    from efflm.models import LM
    from efflm.train.generate import greedy_reference, sample

    common = ("model.init_std=0.1", "model.attention.sliding.window=5",
              "model.attention.sliding.sinks=2", "model.attention.sliding.block_size=4")
    short = LM(small_config(*common, "model.max_seq_len=16", "data.seq_len=16",
                            preset="tiny_sliding").model)
    long = LM(small_config(*common, "model.max_seq_len=64", preset="tiny_sliding").model)
    params = nn.unbox(fast_jit(short.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    prompt = np.array([ord(c) for c in "def f"])
    cached = sample(short, params, prompt, max_new_tokens=30, temperature=0, top_k=0,
                    seed=0, bos_id=257)
    assert len(cached) == 30  # 36 positions, past 16
    assert cached == greedy_reference(long, params, prompt, 30, bos_id=257)
