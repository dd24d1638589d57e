"""Checks of scalar arguments: the right kind of value or InvalidArgumentError naming it.

Nothing is coerced: ``int(8.9)`` would silently be 8 and ``bool("false")`` True.
- integers: ``int`` or a numpy integer; ``bool`` is refused (``True`` is never meant as a count);
- booleans: ``bool`` or ``numpy.bool_``; ``0``/``1`` are refused;
- reals: ``int``, ``float`` or numpy integers and floats; ``bool``, complex and strings are refused.
"""

from __future__ import annotations

import numbers

import numpy as np

from .errors import InvalidArgumentError

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _got(value) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def integer(value, name: str, lo: int = INT32_MIN, hi: int = INT32_MAX) -> int:
    """``value`` as an int in ``lo..hi`` (int32 by default)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentError(f"{name}: expected an int, got {_got(value)}")
    value = int(value)
    if not lo <= value <= hi:
        raise InvalidArgumentError(f"{name}: {value} not in {lo}..{hi}")
    return value


def optional_integer(value, name: str, lo: int = INT32_MIN, hi: int = INT32_MAX) -> int | None:
    return None if value is None else integer(value, name, lo, hi)


def boolean(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(f"{name}: expected a bool, got {_got(value)}")
    return bool(value)


def real(value, name: str) -> float:
    """``value`` as a float (it may be NaN or infinite: range checks belong to the caller)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"{name}: expected a real number, got {_got(value)}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        raise InvalidArgumentError(f"{name}: {value} is beyond float's range") from None


def optional_real(value, name: str) -> float | None:
    return None if value is None else real(value, name)


def choice(value, name: str, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise InvalidArgumentError(
            f"{name}: expected one of {sorted(options)}, got {_got(value)}")
    return value
