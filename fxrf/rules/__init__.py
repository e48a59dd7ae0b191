"""The receptive-field rules: one small function per op kind, in one registry.

A rule maps one node (its module or function arguments, with every tensor argument given as `T(shape, field)`)
to the `Field` of its output, or a tuple of fields for ops with several outputs. Rules are pure: they read the
node and never touch the graph. The analysis calls each rule twice, once with fields referenced to the stage
input and once with fields referenced to the model input; the same algebra serves both.

Register a rule for your own op:

    @rf_rule(MyUpsample, my_functional_upsample, "my_method")
    def _my_upsample(ctx):
        return field.rescale(ctx.args[0].field, (2, 2))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch.fx as fx
import torch.nn as nn

from ..field import Field
from ..registry import registrar

Rule = Callable[["Ctx"], Any]
_RULES: dict[Any, Rule] = {}


class Decline(Exception):
    """Raised by a rule that cannot be exact for this call; the node gets the conservative field and is listed."""


class T(NamedTuple):
    """A tensor argument as a rule sees it: its shape and its field (None: sees nothing of the reference)."""

    shape: tuple
    field: Field | None
    value: Any = None  # the tensor itself, for constants (get_attr) that hold real data


@dataclass
class Ctx:
    node: fx.Node
    module: nn.Module | None
    args: tuple
    kwargs: dict
    out: Any  # the output's TMeta (shape, dtype), or a tuple of them
    dims: int  # spatial dims of the reference (2 for images)

    def arg(self, i: int, name: str, default=None):
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    def param(self, attr: str, i: int, name: str, default=None):
        """A hyper-parameter: the module's attribute `attr`, or the functional form's argument `i` / `name`."""
        return getattr(self.module, attr) if self.module is not None else self.arg(i, name, default)

    @property
    def out_shape(self) -> tuple:
        return self.out.shape

    def tensors(self) -> list[T]:
        """Every tensor argument, flattened out of lists and tuples, in argument order."""
        out: list[T] = []

        def walk(v):
            if isinstance(v, T):
                out.append(v)
            elif isinstance(v, (list, tuple)):
                for x in v:
                    walk(x)
            elif isinstance(v, dict):
                for x in v.values():
                    walk(x)

        walk(self.args)
        walk(self.kwargs)
        return out


rf_rule = registrar(_RULES, "receptive-field rule")
rf_rule.__doc__ = "Register a receptive-field rule for module types, functions, and tensor-method names (strings)."


def lookup(node: fx.Node, module: nn.Module | None) -> Rule | None:
    """The rule for a node: by module type (then its base classes), function object, or method name."""
    if module is not None:
        for cls in type(module).__mro__:
            rule = _RULES.get(cls)
            if rule is not None:
                return rule
        return None
    return _RULES.get(node.target)


def default_sp(shape: tuple, dims: int) -> tuple:
    """Where the spatial dims are in a tensor with no better information: the trailing `dims` axes of a map."""
    n = len(shape)
    return tuple(range(n - dims, n)) if n >= 2 + dims else (None,) * dims


from . import conv, elementwise, layout, pool  # noqa: E402,F401  (fill the registry)
