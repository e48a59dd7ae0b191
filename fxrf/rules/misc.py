"""Ops that only have a shape: sizes and attributes read off a tensor (`x.size()`, `x.dim()`, `x.shape`), and
factories, whose values depend on no input value."""
from __future__ import annotations

import torch

from .base import Ctx, Decline, TMeta, define


def size_shape(ctx: Ctx):  # x.size() or x.size(dim): a plain value, not a tensor
    dim = ctx.arg(1, "dim")
    x = ctx.args[0]
    return torch.Size(x.shape) if dim is None else x.shape[dim]


def getattr_shape(ctx: Ctx):  # getattr(x, "shape" | "dtype" | "ndim"); anything else by meta execution
    x, name = ctx.args[0], ctx.args[1]
    if not isinstance(x, TMeta):
        return getattr(x, name)
    if name == "shape":
        return torch.Size(x.shape)
    if name == "dtype":
        return x.dtype
    if name == "ndim":
        return len(x.shape)
    raise NotImplementedError  # falls back to meta execution


define("size", "size", shape=size_shape)
define("dim", "dim", shape=lambda ctx: len(ctx.args[0].shape))
define("getattr", getattr, shape=getattr_shape)


# Factories: zeros/ones/full/empty (`_like`, `new_`), arange, fill_/zero_. The output depends on the shape, dtype
# and device of a template tensor at most, never on its values: it sees nothing (the field None, a zero gradient).
# A fill value given as a tensor that sees something (`fill_(x, t)`) declines.
def sees_nothing(ctx: Ctx):
    if any(t.field is not None for t in ctx.tensors()[1:]):
        raise Decline("a fill value that is a tensor computed from the input")
    return None


_LIKE = ("zeros_like", "ones_like", "full_like", "empty_like")
_NEW = ("new_zeros", "new_ones", "new_full", "new_empty", "fill_", "zero_")
define("factory", *(getattr(torch, n) for n in _LIKE), *_NEW, torch.zeros, torch.ones, torch.full, torch.empty,
       torch.arange, rf=sees_nothing)
