"""The one typed Config: its schema (`schema`), checks (`validation`) and loading from
presets, overrides and saved workdirs (`loading`).

This package sits above the layers: nothing under `efflm.layers`, `efflm.models`,
`efflm.pallas_kernels` or `efflm.mesh` imports it at run time.
"""

from efflm.errors import check_choice, check_positive
from efflm.shapes import head_dim, num_kv_heads

from .loading import (
    MOVED_KEYS,
    config_from_dict,
    flatten,
    load_config,
    migrate,
    preset_names,
    to_dict,
    to_yaml,
)
from .schema import (
    DATA_ORDER_KEYS,
    FAMILIES,
    RESUMABLE_MODEL_KEYS,
    SHAPE_KEYS,
    AttentionConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    DepthConfig,
    DistributedConfig,
    LoggingConfig,
    MeshConfig,
    MLPConfig,
    ModelConfig,
    MoEConfig,
    OptimizerConfig,
    QuantConfig,
    SparsityConfig,
    TrainConfig,
)
from .validation import validate, vocab_size

__all__ = [
    "DATA_ORDER_KEYS", "FAMILIES", "MOVED_KEYS", "RESUMABLE_MODEL_KEYS", "SHAPE_KEYS",
    "AttentionConfig", "CheckpointConfig", "Config", "DataConfig", "DepthConfig",
    "DistributedConfig", "LoggingConfig", "MLPConfig", "MeshConfig", "ModelConfig",
    "MoEConfig", "OptimizerConfig", "QuantConfig", "SparsityConfig", "TrainConfig",
    "check_choice", "check_positive", "config_from_dict", "flatten", "head_dim", "load_config",
    "migrate", "num_kv_heads", "preset_names", "to_dict", "to_yaml", "validate",
    "vocab_size",
]
