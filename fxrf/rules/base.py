"""What every rule module shares: the call object and small helpers for shapes, costs and layouts."""
from __future__ import annotations

from ..ops import DEFAULT, Call, Decline, T, TMeta, define, op, rf_rule

Ctx = Call  # the name rules were written against before the op table: one call object for every rule


def default_sp(shape: tuple, dims: int) -> tuple:
    """Where the spatial dims are in a tensor with no better information: the trailing `dims` axes of a map."""
    n = len(shape)
    return tuple(range(n - dims, n)) if n >= 2 + dims else (None,) * dims


def tuple_of(v, n: int) -> tuple:
    """An int-or-sequence hyper-parameter as an n-tuple."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def same_shape(call: Call):
    """Shape rule of ops whose output has their first tensor argument's shape and dtype."""
    if call.args and isinstance(call.args[0], TMeta):  # (nearly always: BN, activations)
        return call.args[0]
    return next(a for a in list(call.args) + list(call.kwargs.values()) if isinstance(a, TMeta))


def per_output(call: Call) -> tuple[int, int]:
    """Cost rule: one cheap op per output element (activations, elementwise arithmetic)."""
    return 0, call.out_numel


def spatial_dims(call: Call) -> int:
    """d of an op named ...1d / ...2d / ...3d (MaxPool2d or a subclass of it, F.adaptive_avg_pool3d)."""
    names = [c.__name__ for c in type(call.module).__mro__] if call.module is not None else [call.name]
    for name in names:
        if name[-1:] == "d" and name[-2:-1].isdigit():
            return int(name[-2])
    return 2


__all__ = ["DEFAULT", "Call", "Ctx", "Decline", "T", "TMeta", "define", "op", "rf_rule", "default_sp", "tuple_of",
           "same_shape", "per_output", "spatial_dims"]
