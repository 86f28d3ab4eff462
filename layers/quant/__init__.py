"""Number formats of the matmuls: `model.quant.kind` -> format (None: plain float)."""

from efflm.layers.quant.fp8 import Fp8
from efflm.layers.quant.int8 import Int8
from efflm.layers.quant.ternary import Ternary

QUANT = {"none": None, "int8": Int8, "ternary": Ternary, "fp8": Fp8}
