"""Sampling from a trained model with temperature and top-k, through the decoding cache.

The prompt (after a BOS, as documents start in training) is prefilled once; each new
token is then one jitted step over the cache (`efflm.layers.attention`'s decoding
interface). `greedy_reference` recomputes the whole sequence for every token: the
obviously correct version the cached path is tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from efflm.errors import ConfigError
from efflm.layers.plan import not_causal, not_decoding, unbounded_decoding
from efflm.models import LM


def check_decodes(model: LM) -> None:
    """Refuse a model with a token mixer that has no decoding cache, or one whose
    outputs depend on later tokens (it cannot be sampled one token at a time)."""
    missing = not_decoding(model.cfg)
    if missing:
        raise ConfigError(f"model.attention.kind={missing[0]!r} has no decoding cache yet, "
                          "so efflm generate cannot sample from this model")
    reasons = not_causal(model.cfg, decoding=True)
    if reasons:
        raise ConfigError(f"efflm generate cannot sample from this model one token at a "
                          f"time: {'; '.join(reasons)}")


def init_cache(model: LM, variables, batch: int, max_len: int):
    """An empty cache for `batch` sequences of up to `max_len` tokens (no computation:
    its shapes come from tracing one call)."""
    dummy = jnp.zeros((batch, max_len), jnp.int32)
    shapes = jax.eval_shape(
        lambda v: model.apply(v, dummy, dummy, mutable=["cache"])[1].get("cache", {}), variables)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _choose(logits, key, temperature: float, top_k: int):
    """Next token from the last position's logits (batch, vocab)."""
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits)


class Decoder:
    """Jitted prefill and one-token step for `model`; reuse one Decoder to reuse its
    compilations (the step compiles once per batch and cache length)."""

    def __init__(self, model: LM, temperature: float, top_k: int):
        check_decodes(model)
        self.model = model

        def run(variables, cache, tokens, positions, key):
            logits, mutated = model.apply({**variables, "cache": cache}, tokens, positions,
                                          mutable=["cache"])
            return _choose(logits[:, -1], key, temperature, top_k), mutated.get("cache", {})

        # One jitted function: the prefill and the one-token step each compile once, for
        # their own shapes.
        self.run = jax.jit(run, donate_argnums=(1,))

    def generate(self, variables, ids: list[int], max_new_tokens: int, seed: int,
                 stop_id: int | None = None) -> list[int]:
        """Up to `max_new_tokens` tokens after `ids` (which fit the cache)."""
        length = self.model.cfg.max_seq_len
        cache = init_cache(self.model, variables, 1, length)
        # A cache of fixed size (every mixer's `bounded_cache`) has no last position.
        limit = length if unbounded_decoding(self.model.cfg) else None
        key = jax.random.key(seed)
        key, sub = jax.random.split(key)
        tokens = jnp.asarray([ids], jnp.int32)
        tok, cache = self.run(variables, cache, tokens, jnp.arange(len(ids))[None], sub)
        out, pos = [], len(ids)  # `tok` is the token for position `pos`
        while True:
            token = int(tok[0])
            if stop_id is not None and token == stop_id:
                break
            out.append(token)
            if len(out) == max_new_tokens or pos + 1 == limit:
                break
            key, sub = jax.random.split(key)
            tok, cache = self.run(variables, cache, jnp.full((1, 1), token, jnp.int32),
                                   jnp.full((1, 1), pos, jnp.int32), sub)
            pos += 1
        return out


def _with_bos(model: LM, prompt_ids, bos_id: int | None) -> list[int]:
    ids = ([] if bos_id is None else [bos_id]) + [int(i) for i in prompt_ids]
    length = model.cfg.max_seq_len
    if len(prompt_ids) == 0:
        raise ConfigError("the prompt is empty; pass some text with --prompt")
    if len(ids) >= length:
        raise ConfigError(f"the prompt has {len(ids)} tokens with its BOS but the model "
                          f"supports {length} (model.max_seq_len); shorten it")
    return ids


def sample(model: LM, variables, prompt_ids: np.ndarray, *, max_new_tokens: int,
           temperature: float, top_k: int, seed: int, stop_id: int | None = None,
           bos_id: int | None = None) -> list[int]:
    """Extend `prompt_ids` by up to `max_new_tokens` sampled tokens (stopping early at
    `stop_id` or at `model.max_seq_len`, unless every mixer's decoding cache has a fixed
    size); `bos_id` goes before the prompt."""
    if temperature < 0 or top_k < 0:
        raise ConfigError("temperature and top-k must be >= 0")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1 (how many tokens to sample), got "
                          f"{max_new_tokens}")
    if top_k > model.cfg.vocab_size:
        raise ConfigError(f"top_k={top_k} is larger than the vocabulary "
                          f"({model.cfg.vocab_size})")
    ids = _with_bos(model, prompt_ids, bos_id)
    return Decoder(model, temperature, top_k).generate(variables, ids, max_new_tokens,
                                                       seed, stop_id)


def greedy_reference(model: LM, variables, prompt_ids, max_new_tokens: int,
                     bos_id: int | None = None, forward=None) -> list[int]:
    """Greedy tokens from a full forward pass over the whole sequence for each token
    (`forward`: a jitted `model.apply` to reuse across calls)."""
    ids = _with_bos(model, prompt_ids, bos_id)
    length = model.cfg.max_seq_len
    buf = np.zeros((1, length), np.int32)
    buf[0, :len(ids)] = ids
    forward = forward or jax.jit(model.apply)
    out, pos = [], len(ids)
    while len(out) < max_new_tokens and pos < length:
        token = int(jnp.argmax(forward(variables, buf)[0, pos - 1]))
        out.append(token)
        buf[0, pos] = token
        pos += 1
    return out
