"""efflm: pretraining efficient language-model architectures in JAX."""

from efflm.errors import CheckpointError, ConfigError, DataError, EfflmError

__all__ = ["CheckpointError", "ConfigError", "DataError", "EfflmError"]
__version__ = "0.1.0"
