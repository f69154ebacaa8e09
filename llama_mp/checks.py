"""The rules for plain option values, each in one place: what counts as an integer or a number."""

from __future__ import annotations

from .errors import LlamaMPError


def is_number(value) -> bool:
    """An int or float, but not a bool (fire and JSON turn `--x True` into one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(name: str, value, least: int) -> int:
    """`value` if it is an integer >= `least`, else a LlamaMPError naming `name`."""
    if not is_int(value) or value < least:
        raise LlamaMPError(f"{name} must be an integer >= {least}, got {value!r}.")
    return value
