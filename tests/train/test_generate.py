import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cached_and_full_logits, fast_jit

from efflm import layers
from efflm.errors import ConfigError
from efflm.layers.contract import Mixer
from efflm.models import LM
from efflm.train.generate import Decoder, greedy_reference, sample

# Larger weights than training's init, so greedy choices are clear-cut.
DECODE = ("model.init_std=0.1", "model.attention.num_kv_heads=2")


def _model(small_config, *overrides):
    cfg = small_config(*DECODE, *overrides)
    model = LM(cfg.model)
    tokens = jnp.zeros((1, 8), jnp.int32)
    return model, {"params": nn.unbox(fast_jit(model.init)(jax.random.key(0), tokens))["params"]}


@pytest.mark.parametrize("overrides", [
    [], ["model.scan_layers=true", "model.num_layers=3"],
    ["model.depth.kind=recursive", "model.depth.recursive.sharing=middle_cycle",
     "model.depth.recursive.unique_layers=3", "model.num_layers=4"]])
def test_prefill_and_steps_give_the_full_forward_logits(small_config, overrides):
    """Logits through the cache (a prefill of 11 tokens, then one token at a time, rows
    at different positions) equal one forward pass over the whole sequence."""
    model, variables = _model(small_config, *overrides)
    cached, full = cached_and_full_logits(model, variables)
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)


def test_cached_greedy_generation_equals_uncached(small_config):
    """Token for token, up to the end of the context (model.max_seq_len=64)."""
    model, variables = _model(small_config)
    prompt = [ord(c) for c in "def main():"]
    cached = sample(model, variables, np.array(prompt), max_new_tokens=100, temperature=0,
                    top_k=0, seed=0, bos_id=257)
    reference = greedy_reference(model, variables, prompt, 100, bos_id=257)
    assert len(reference) == 64 - 1 - len(prompt)
    assert cached == reference
    assert sample(model, variables, np.array(prompt), max_new_tokens=5, temperature=0,
                  top_k=0, seed=0, bos_id=257) == reference[:5]


def test_a_mixer_without_a_cache_is_refused(small_config, monkeypatch):
    class NoCache(Mixer):
        @nn.compact
        def __call__(self, x, positions, segment_ids, mask):
            return x

    monkeypatch.setitem(layers.ATTENTION, "no_cache", NoCache)
    model, _ = _model(small_config, "model.attention.pattern=softmax,no_cache")
    with pytest.raises(ConfigError, match="'no_cache' has no decoding cache"):
        Decoder(model, 0.0, 0)
