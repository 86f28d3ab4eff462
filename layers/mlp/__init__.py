"""Feed-forward blocks: `model.mlp.kind` (and each entry of `model.mlp.pattern`) -> class."""

from efflm.layers.mlp.swiglu import SwiGLU
from efflm.layers.moe.experts import MoE

MLP = {"swiglu": SwiGLU, "moe": MoE}
