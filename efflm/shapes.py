"""Sizes derived from the model config that the layers, the sharding rules and the FLOP
counts share. A leaf module: it imports nothing from efflm, so any part may use it."""


def head_dim(cfg) -> int:
    """Width of one attention head: `model.attention.head_dim`, or d_model / num_heads."""
    return cfg.attention.head_dim or cfg.d_model // cfg.attention.num_heads


def num_kv_heads(cfg) -> int:
    """Key/value heads: `model.attention.num_kv_heads`, or as many as the query heads."""
    return cfg.attention.num_kv_heads or cfg.attention.num_heads
