"""Sampling from a trained model with temperature and top-k."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from efflm.errors import ConfigError
from efflm.models import LM


def sample(model: LM, params, prompt_ids: np.ndarray, *, max_new_tokens: int,
           temperature: float, top_k: int, seed: int, stop_id: int | None = None) -> list[int]:
    """Extend `prompt_ids` by up to `max_new_tokens` sampled tokens.

    The sequence lives in a fixed buffer of `model.cfg.max_seq_len` so one compiled
    step serves every position; causal masking makes the unused tail irrelevant.
    """
    length = model.cfg.max_seq_len
    if len(prompt_ids) == 0:
        raise ConfigError("the prompt is empty; pass some text with --prompt")
    if len(prompt_ids) >= length:
        raise ConfigError(f"the prompt has {len(prompt_ids)} tokens but the model supports "
                          f"{length} (model.max_seq_len); shorten it")
    if temperature < 0 or top_k < 0:
        raise ConfigError("temperature and top-k must be >= 0")
    if top_k > model.cfg.vocab_size:
        raise ConfigError(f"top_k={top_k} is larger than the vocabulary "
                          f"({model.cfg.vocab_size})")
    buf = np.zeros((1, length), np.int32)
    buf[0, : len(prompt_ids)] = prompt_ids

    @jax.jit
    def next_token(params, tokens, pos, key):
        logits = model.apply({"params": params}, tokens)[0, pos].astype(jnp.float32)
        if temperature == 0:
            return jnp.argmax(logits)
        logits = logits / temperature
        if top_k:
            kth = jax.lax.top_k(logits, top_k)[0][-1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(key, logits)

    key = jax.random.key(seed)
    pos = len(prompt_ids)
    out = []
    while len(out) < max_new_tokens and pos < length:
        key, sub = jax.random.split(key)
        tok = int(next_token(params, buf, pos - 1, sub))
        if stop_id is not None and tok == stop_id:
            break
        buf[0, pos] = tok
        out.append(tok)
        pos += 1
    return out
