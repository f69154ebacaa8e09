"""The rules for plain option values, each in one place: what counts as an integer, a number, a seed,
a number of seconds or a flag, and the message that says so when a value is none of them.

Values come from people (fire turns `--x 1e-300`, `--x nan`, `--x True` into Python values) and from
Python callers, so the rules refuse what would be accepted and then give nonsense (a temperature of
1e-300 turns the logits into inf and NaN) or end in a traceback deep inside torch (a seed of 2**64).
"""

from __future__ import annotations

import math

from .errors import LlamaMPError

SEED_LIMIT = 2 ** 64  # torch.Generator.manual_seed takes 64 bits
# A wait is a bound, not a wish: below a millisecond gloo rounds it to nothing, and a week is longer
# than any shard read or decode step (datetime.timedelta overflows near 3e6 years, thread waits sooner).
SHORTEST_WAIT_S, LONGEST_WAIT_S = 1e-3, 7 * 24 * 3600.0


def is_number(value) -> bool:
    """An int or float, but not a bool (fire and JSON turn `--x True` into one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def described(value) -> str:
    """`value` as a message shows it: its repr (cut short) and, unless that says it, its type."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    if isinstance(value, (str, float)) or is_int(value):
        return text
    return f"{text} (a {type(value).__name__})"


def is_finite_number(value) -> bool:
    """A number that is neither NaN nor infinite. An int too big for a float is finite all the same."""
    return is_number(value) and (isinstance(value, int) or math.isfinite(value))


def require_int(name: str, value, least: int) -> int:
    """`value` if it is an integer >= `least`, else a LlamaMPError naming `name`."""
    if not is_int(value) or value < least:
        raise LlamaMPError(f"{name} must be an integer >= {least}, got {described(value)}.")
    return value


def require_number(name: str, value, low: float, high: float, why: str = "") -> float:
    """`value` if it is a finite number in [low, high], else a LlamaMPError naming `name`; `why` says
    what the range means."""
    if not is_finite_number(value) or not low <= value <= high:
        raise LlamaMPError(f"{name} must be a number from {low:g} to {high:g}{why}, got {described(value)}.")
    return value


def require_seed(name: str, value, limit: int = SEED_LIMIT) -> int:
    """`value` if it is an integer in [0, limit): by default what a random generator's seed can hold."""
    if not is_int(value) or not 0 <= value < limit:
        top = "2**64 - 1" if limit == SEED_LIMIT else str(limit - 1)
        raise LlamaMPError(f"{name} must be an integer from 0 to {top} (it seeds the random generator), "
                           f"got {described(value)}.")
    return value


def require_seconds(name: str, value) -> float:
    """`value` if it is a finite number of seconds a rank may wait, in [1 ms, one week]."""
    if not is_finite_number(value) or not SHORTEST_WAIT_S <= value <= LONGEST_WAIT_S:
        raise LlamaMPError(f"{name} must be a number of seconds from {SHORTEST_WAIT_S:g} to {LONGEST_WAIT_S:g} "
                           f"(one week), got {described(value)}. It bounds how long a rank waits for the others "
                           "before the job gives up.")
    return value


def require_bool(name: str, value) -> bool:
    """`value` if it is True or False: a flag given a number or a string is a mistake, not a wish."""
    if not isinstance(value, bool):
        raise LlamaMPError(f"{name} must be True or False, got {described(value)}.")
    return value
