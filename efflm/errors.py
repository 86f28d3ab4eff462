"""Errors meant for people: each says what was wrong and what would be right, and the
checks that raise them for a config value."""

import difflib
import math


class EfflmError(Exception):
    """Base class; the CLI prints it on one line and exits with status 2."""


class ConfigError(EfflmError):
    """An unknown key, a wrong type or an invalid choice in the config."""


class DataError(EfflmError):
    """Missing, empty or unreadable training data."""


class CheckpointError(EfflmError):
    """A checkpoint that cannot be used for this run."""


def check_choice(key: str, value: str, choices) -> None:
    """Raise ConfigError unless `value` is one of `choices`, naming the closest one."""
    choices = sorted(choices)
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not a valid choice{hint}; choose one of: "
                          f"{', '.join(choices)}")


def check_positive(key: str, value, allow_zero: bool = False) -> None:
    """Raise ConfigError unless `value` is finite and > 0 (>= 0 with `allow_zero`)."""
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
