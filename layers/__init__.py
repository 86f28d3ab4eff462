"""Flax linen building blocks, each choice registered under its config value."""

from efflm.layers.attention import SoftmaxAttention, attention_mask, dot_product_attention
from efflm.layers.depth import PlainStack
from efflm.layers.mlp import SwiGLU
from efflm.layers.norms import RMSNorm

# model.attention.kind -> token mixer
ATTENTION = {"softmax": SoftmaxAttention}
# model.mlp.kind -> feed-forward block
MLP = {"swiglu": SwiGLU}
# model.depth.kind -> how blocks are stacked and routed
DEPTH = {"none": PlainStack}

__all__ = ["ATTENTION", "DEPTH", "MLP", "PlainStack", "RMSNorm", "SoftmaxAttention",
           "SwiGLU", "attention_mask", "dot_product_attention"]
