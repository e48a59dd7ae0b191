"""Which convs a pass may touch: include/exclude globs over module paths (`layer4.*`, `features.0`).

A conv is selected when its module path (as state_dict keys spell it, `NodeRecord.path`) matches one of the
`include` patterns (None: every conv) and none of the `exclude` patterns. A pattern matches a path when
`fnmatch.fnmatchcase` says so for the path itself or for one of its dotted prefixes, so `layer4` selects
everything under `layer4` (`*` also crosses dots: `layer*.conv1` matches `layer1.0.conv1`). A pattern that
matches no conv of the model raises an InputError naming it, so a typo does not silently select nothing; for the
same reason an empty `include` (`[]`, `()`) raises an InputError instead of selecting nothing (or, as None does,
everything): pass `include=None` for every conv.

    >>> s = Selection(include=["layer4"], exclude=["*.downsample.*"])
    >>> [s.allows(p) for p in ("layer4.0.conv1", "layer4.0.downsample.0", "layer3.5.conv2", None)]
    [True, False, False, False]
    >>> Selection().allows(None)   # no patterns: every conv, with or without a path
    True
    >>> Selection(include=[])
    Traceback (most recent call last):
    ...
    fxrf.errors.InputError: include=[] selects no conv: pass include=None to let the pass touch every conv, or module-path globs such as ['layer4'] (to change nothing, skip the pass)
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Iterable

from fxrf.errors import InputError

__all__ = ["Selection", "matches"]


def matches(path: str | None, pattern: str) -> bool:
    """`pattern` matches `path` or one of its dotted prefixes (`layer4` matches `layer4.0.conv1`)."""
    if path is None:
        return False
    parts = path.split(".")
    return any(fnmatchcase(".".join(parts[:k]), pattern) for k in range(len(parts), 0, -1))


def _patterns(value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@dataclass(frozen=True)
class Selection:
    """include: globs of the convs a pass may touch (None: all); exclude: globs it must leave alone."""

    include: tuple | None = None
    exclude: tuple = ()

    def __init__(self, include: Iterable[str] | str | None = None, exclude: Iterable[str] | str | None = None):
        patterns = _patterns(include)
        if include is not None and not patterns:  # [] would read as "every conv" (None) or "no conv": refuse both
            raise InputError(f"include={include!r} selects no conv: pass include=None to let the pass touch every "
                             f"conv, or module-path globs such as ['layer4'] (to change nothing, skip the pass)")
        object.__setattr__(self, "include", patterns or None)
        object.__setattr__(self, "exclude", _patterns(exclude))

    @property
    def everything(self) -> bool:
        return self.include is None and not self.exclude

    def allows(self, path: str | None) -> bool:
        if self.everything:
            return True
        if self.include is not None and not any(matches(path, p) for p in self.include):
            return False
        return not any(matches(path, p) for p in self.exclude)

    def check(self, paths: Iterable[str | None], what: str = "conv") -> None:
        """Raise an InputError for a pattern that matches none of `paths` (the model's convs)."""
        paths = [p for p in paths if p is not None]
        for flag, pats in (("include", self.include or ()), ("exclude", self.exclude)):
            for p in pats:
                if not any(matches(path, p) for path in paths):
                    shown = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
                    raise InputError(f"{flag} pattern {p!r} matches no {what} of the model; its {what} paths are "
                                     f"{shown or '(none)'}")

    def describe(self) -> dict:
        return {"include": list(self.include) if self.include is not None else None, "exclude": list(self.exclude)}
