"""Errors meant for people: each says what was wrong and what would be right."""


class EfflmError(Exception):
    """Base class; the CLI prints it on one line and exits with status 2."""


class ConfigError(EfflmError):
    """An unknown key, a wrong type or an invalid choice in the config."""


class DataError(EfflmError):
    """Missing, empty or unreadable training data."""


class CheckpointError(EfflmError):
    """A checkpoint that cannot be used for this run."""
