"""Token mixers: `model.attention.kind` (and each entry of `model.attention.pattern`) ->
class. Each kind's file holds the module, its reference, its FLOPs per token and, where
it can decode, its cache."""

from efflm.layers.attention.based import BasedAttention
from efflm.layers.attention.gated_deltanet import GatedDeltaNet
from efflm.layers.attention.gla import GatedLinearAttention
from efflm.layers.attention.linear import LinearAttention
from efflm.layers.attention.nsa import NativeSparseAttention
from efflm.layers.attention.power import PowerAttention
from efflm.layers.attention.sliding import SlidingAttention
from efflm.layers.attention.softmax import SoftmaxAttention

ATTENTION = {"softmax": SoftmaxAttention, "linear": LinearAttention,
             "gla": GatedLinearAttention, "based": BasedAttention,
             "gated_deltanet": GatedDeltaNet, "sliding": SlidingAttention,
             "power": PowerAttention, "nsa": NativeSparseAttention}
