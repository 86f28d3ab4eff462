"""How the layer plan is run: `model.depth.kind` -> stack class."""

from efflm.layers.depth.plain import PlainStack

DEPTH = {"none": PlainStack}
