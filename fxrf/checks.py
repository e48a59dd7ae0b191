"""Checks of option values that the analysis, the passes and the CLI share: one place decides what a valid value
is, and every caller gets the same message (the CLI turns it into its one-line usage error)."""
from __future__ import annotations

import math
import numbers

from .errors import InputError


def check_number(name: str, value, *, minimum: float | None = 0.0) -> float:
    """A finite real number (not a bool or a string), at least `minimum` (None: any sign): InputError otherwise.

    >>> check_number("alpha", 3)
    3.0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {type(value).__name__} {value!r}: pass e.g. {name}=3.0")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        raise InputError(f"{name} must be a finite number" + ("" if minimum is None else f" >= {minimum:g}")
                         + f", got {value!r}")
    return value
