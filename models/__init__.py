"""Language models assembled from `efflm.layers` by the config."""

from efflm.models.lm import LM, Block

__all__ = ["LM", "Block"]
