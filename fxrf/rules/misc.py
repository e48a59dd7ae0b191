"""Ops that only have a shape: sizes and attributes read off a tensor (`x.size()`, `x.dim()`, `x.shape`)."""
from __future__ import annotations

import torch

from .base import Ctx, TMeta, define


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
