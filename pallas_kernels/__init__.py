from efflm.pallas_kernels.block_sparse_attention import block_sparse_attention  # noqa: F401
from efflm.pallas_kernels.flash_attention import flash_attention, reference_attention  # noqa: F401
from efflm.pallas_kernels.fused_cross_entropy import linear_cross_entropy  # noqa: F401
from efflm.pallas_kernels.grouped_matmul import grouped_matmul, tgmm  # noqa: F401
from efflm.pallas_kernels.linear_attention import chunked_linear_attention  # noqa: F401
