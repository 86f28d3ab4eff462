"""`data.source=mixture`: training examples drawn from several sources in fixed
proportions (`data.mixture.sources=[pycode:0.3,tfds:0.7]`), each source reading its own
settings (`data.tfds.*`, `data.files.*`).

The weights apply to training examples (chunks of at most `data.seq_len` tokens, so
roughly to tokens): grain's deterministic mix interleaves the sources' example streams,
each shuffled with its own seed, and its position is checkpointed with the rest of the
pipeline. Validation reads every source's validation split: the combined numbers are
over all of them together, and each source is also evaluated on its own
(`eval_<source>_loss`, ...).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from efflm.data.base import DataSource
from efflm.errors import ConfigError


@dataclass
class MixtureSettings:
    # "source:weight" entries; weights are positive, relative (they need not sum to 1).
    sources: list[str] = field(default_factory=list)


def components(cfg) -> list[tuple[str, float, object]]:
    """(source name, weight, its data config) for each entry of data.mixture.sources;
    ConfigError for a malformed or repeated entry or a weight that is not a positive
    number (which names are sources `efflm.data.sources.mixture_parts` checks)."""
    key = "data.mixture.sources"
    out = []
    for entry in cfg.mixture.sources:
        name, _, weight = str(entry).partition(":")
        name = name.strip()
        try:
            value = float(weight)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{key} entry {entry!r}: write source:weight with a positive "
                              "weight, e.g. pycode:0.3")
        if name in (n for n, _, _ in out):
            raise ConfigError(f"{key} names {name} twice; each source appears once")
        out.append((name, value, dataclasses.replace(cfg, source=name)))
    if len(out) < 2:
        raise ConfigError(f"{key} needs two sources or more, e.g. [pycode:0.3,tfds:0.7]")
    return out


class ConcatSource:
    """Several random-access sources one after another."""

    def __init__(self, parts: list):
        self.parts = parts
        self.starts = [0]
        for p in parts:
            self.starts.append(self.starts[-1] + len(p))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int):
        for part, start, stop in zip(self.parts, self.starts, self.starts[1:]):
            if start <= index < stop:
                return part[index - start]
        raise IndexError(f"item {index} of {len(self)}")


class Mixture(DataSource):
    """`data.source=mixture`: several text sources in fixed proportions (its items are
    its sources' items, one after another: `efflm.data.sources.make_source`)."""

    settings = MixtureSettings

    @staticmethod
    def validate_config(cfg) -> None:
        components(cfg)

    @staticmethod
    def components(cfg):
        return components(cfg)
