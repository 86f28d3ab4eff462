"""Multi-query associative recall (`data.source=mqar`), the recall probe of "Zoology:
Measuring and Improving Recall in Efficient Language Models" and of Based ("Simple
linear attention language models balance the recall-throughput tradeoff").

An example of `data.seq_len + 1` token ids holds `pairs` key-value pairs at its start
(k1 v1 k2 v2 ...), then each key once more, in a random order, at a random later
two-token slot whose second token is its value; everything else is filler. Only the
values after the queried keys are trained and scored (the other targets are IGNORE).

Token ids: 0 is never generated (padding); keys come from [1, 1 + (vocab - 1) // 2),
values from the rest of [0, vocab). Like Zoology's generator, the slots of the queries
are drawn with probability proportional to slot ** (POWER_A - 1) (most queries come soon
after the context), keys and values are drawn without replacement per example. Where
this deviates: Zoology draws the filler from the whole vocabulary, so a filler token may
be a key (a false query); here the filler comes from the values' part only, so a key
appears exactly twice (stored, then queried).

Examples are generated on the fly from (data.mqar.seed, split, index): random access,
the same on every process and after a resume, no files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from efflm.data.base import IGNORE, DataSource
from efflm.data.tokenizer import TokenIds
from efflm.errors import ConfigError, check_positive

# Zoology's power law for where the queries fall (its `power_a`).
POWER_A = 0.01
_STREAMS = {"train": 0, "val": 1}


@dataclass
class MqarSettings:
    vocab: int = 256  # token ids 0..vocab-1 (0 unused: padding), keys, then values
    pairs: int = 8  # key-value pairs per example, each queried once
    train_examples: int = 100_000  # distinct training examples (then they repeat)
    val_examples: int = 1_000
    seed: int = 0  # the examples' seed (train.seed orders them)


def key_ids(vocab: int) -> np.ndarray:
    return np.arange(1, 1 + (vocab - 1) // 2)


def value_ids(vocab: int) -> np.ndarray:
    return np.arange(1 + (vocab - 1) // 2, vocab)


def example(own: MqarSettings, seq_len: int, split: str, index: int) -> dict:
    """Example `index` of `split`: inputs and targets (int32, seq_len), the targets
    IGNORE except where an input is a queried key (there: its value)."""
    rng = np.random.default_rng([own.seed, _STREAMS[split], index])
    keys = rng.choice(key_ids(own.vocab), own.pairs, replace=False)
    values_part = value_ids(own.vocab)
    values = rng.choice(values_part, own.pairs, replace=False)
    n, context = seq_len + 1, 2 * own.pairs
    tokens = np.empty(n, np.int32)
    tokens[:context:2], tokens[1:context:2] = keys, values
    tokens[context:] = rng.choice(values_part, n - context)
    space = (n - context) // 2  # two-token query slots after the context
    weight = np.arange(1, space + 1, dtype=np.float64) ** (POWER_A - 1)
    slots = rng.choice(space, own.pairs, replace=False, p=weight / weight.sum())
    at = context + 2 * slots  # where each key is queried (in random order of keys)
    tokens[at], tokens[at + 1] = keys, values
    targets = np.full(seq_len, IGNORE, np.int32)
    targets[at] = values
    return {"inputs": tokens[:-1], "targets": targets,
            "segment_ids": np.ones(seq_len, np.int32),
            "positions": np.arange(seq_len, dtype=np.int32)}


class MqarExamples:
    """The examples of one split, a random-access source for grain."""

    def __init__(self, own: MqarSettings, seq_len: int, split: str):
        self.own, self.seq_len, self.split = own, seq_len, split
        self.count = own.train_examples if split == "train" else own.val_examples

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.count:
            raise IndexError(f"example {index} of {self.count}")
        return example(self.own, self.seq_len, self.split, int(index))


class Mqar(DataSource):
    """`data.source=mqar`: multi-query associative recall, token ids generated from a
    seed (`data.mqar.*`; see the module)."""

    settings = MqarSettings
    accuracy = "recall"

    @staticmethod
    def validate_config(cfg) -> None:
        own = cfg.mqar
        for name in ("vocab", "pairs", "train_examples", "val_examples"):
            check_positive(f"data.mqar.{name}", getattr(own, name))
        check_positive("data.mqar.seed", own.seed, allow_zero=True)
        if min(len(key_ids(own.vocab)), len(value_ids(own.vocab))) < own.pairs:
            raise ConfigError(f"data.mqar.vocab={own.vocab} is too small for "
                              f"data.mqar.pairs={own.pairs}: keys and values each take "
                              f"about half of the ids after 0; use vocab >= "
                              f"{2 * own.pairs + 1}")
        if (cfg.seq_len + 1 - 2 * own.pairs) // 2 < own.pairs:
            raise ConfigError(f"data.mqar.pairs={own.pairs} does not fit data.seq_len="
                              f"{cfg.seq_len}: the pairs take {2 * own.pairs} tokens and "
                              f"their queries as many again; use data.seq_len >= "
                              f"{4 * own.pairs - 1} or fewer pairs")

    @staticmethod
    def tokenizer(cfg):
        return TokenIds(cfg.mqar.vocab)

    @staticmethod
    def open(cfg, split: str):
        return (MqarExamples(cfg.mqar, cfg.seq_len, split),
                f"data.mqar with {split}_examples")
