"""The built-in ops: one registration per op kind (shape, receptive field, cost, traits) in `fxrf.ops.DEFAULT`.

A receptive-field rule maps one node (a `Call` whose tensor arguments are `T(shape, field)`) to the `Field` of
its output, or a tuple of fields for ops with several outputs. Rules are pure: they read the node and never
touch the graph. The analysis calls each rule twice, once with fields referenced to the stage input and once
with fields referenced to the model input; the same algebra serves both.

One module per op family: conv.py (convs, linear, norms, softmax), elementwise.py (activations, casts,
broadcasting arithmetic), pool.py (pooling, reductions, resampling), layout.py (reshape, permute, cat, split,
indexing, shuffles) and misc.py (what only has a shape or a cost). Register your own op with one call:

    @fxrf.op(MyUpsample, my_functional_upsample, "my_method", shape=my_shape, cost=my_cost, kind="other")
    def my_upsample(call):
        return field.rescale(call.args[0].field, (2, 2))

or `@fxrf.rf_rule(MyOp)` for a receptive-field rule alone (docs/architecture.md, "add an op").
"""
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

from . import conv, elementwise, layout, misc, pool  # noqa: E402,F401  (fill the table)
