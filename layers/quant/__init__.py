"""Number formats of the matmuls: `model.quant.kind` -> format (None: plain float)."""

from efflm.layers.quant.fp8 import Fp8
from efflm.layers.quant.int8 import Int8
from efflm.layers.quant.mxfp4 import Mxfp4
from efflm.layers.quant.qat import Qat
from efflm.layers.quant.ternary import Ternary

QUANT = {"none": None, "int8": Int8, "ternary": Ternary, "fp8": Fp8, "mxfp4": Mxfp4, "qat": Qat}
