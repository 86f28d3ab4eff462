"""Feed-forward blocks: `model.mlp.kind` (and each entry of `model.mlp.pattern`) -> class."""

from efflm.layers.mlp.swiglu import SwiGLU

MLP = {"swiglu": SwiGLU}
