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

from .base import (DEFAULT, Call, Ctx, Decline, T, TMeta, default_sp, define, op, per_output, rf_rule,
                   same_shape, spatial_dims, tuple_of)

__all__ = ["DEFAULT", "Call", "Ctx", "Decline", "T", "TMeta", "define", "op", "rf_rule", "default_sp", "tuple_of",
           "same_shape", "per_output", "spatial_dims"]

from . import conv, elementwise, layout, misc, pool  # noqa: E402,F401  (fill the table)
from . import aten  # noqa: E402,F401  (the ATen spellings of the ops above, for torch.export graphs)
