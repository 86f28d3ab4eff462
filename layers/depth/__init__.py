"""How the layer plan is run: `model.depth.kind` -> stack class."""

from efflm.layers.depth.mod import ModStack
from efflm.layers.depth.mor import MorStack
from efflm.layers.depth.plain import PlainStack
from efflm.layers.depth.recursive import RecursiveStack

DEPTH = {"none": PlainStack, "recursive": RecursiveStack, "mod": ModStack, "mor": MorStack}
