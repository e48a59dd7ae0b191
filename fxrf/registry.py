"""One way to build an op-keyed rule table (receptive-field rules, shape rules)."""
from __future__ import annotations

from typing import Any, Callable


def registrar(table: dict, what: str) -> Callable:
    """A decorator factory `@reg(*targets)` filling `table`; a second rule for a target raises KeyError.

    Targets are module types, functions, or tensor-method names (strings). F.relu_ is torch.relu_: one object
    named twice in one call is one target.
    """

    def register(*targets: Any) -> Callable:
        def deco(fn: Callable) -> Callable:
            for t in dict.fromkeys(targets):
                if t in table:
                    raise KeyError(f"a {what} for {t!r} is already registered ({table[t].__name__})")
                table[t] = fn
            return fn

        return deco

    return register
