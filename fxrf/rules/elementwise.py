"""Elementwise ops: per-channel maps (identity on fields) and broadcasting merges (union of fields)."""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import field
from . import Ctx, Decline, T, rf_rule

try:  # torchvision's stochastic depth is an fx-wrapped function: identity at inference
    from torchvision.ops import stochastic_depth as _stochastic_depth
    from torchvision.ops.stochastic_depth import StochasticDepth as _StochasticDepth
    _TV = (_stochastic_depth, _StochasticDepth)
except ImportError:  # pragma: no cover - torchvision is a dependency
    _TV = ()

# out[c, x] = f(in[c, x]): activations, dropout (inference), casts, copies.
_PER_ELEMENT = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.softplus, F.dropout, F.sigmoid, F.tanh, torch.relu, torch.sigmoid, torch.tanh, torch.clone,
    torch.abs, torch.exp, torch.neg, torch.sqrt, torch.rsqrt, torch.clamp,
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone", "abs", "exp", "neg", "sqrt", "rsqrt",
    "clamp", "clamp_", "detach", "hardtanh_", "float", "half", "to", "type_as",
) + _TV


@rf_rule(*_PER_ELEMENT)
def per_element(ctx: Ctx):
    return ctx.args[0].field


# out = a (op) b with broadcasting: each output element sees what its two source elements see.
@rf_rule(operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.truediv, torch.add,
         torch.mul, torch.sub, torch.div, torch.maximum, torch.minimum, "add", "add_", "mul", "mul_", "sub", "div",
         "__add__", "__mul__", "__radd__", "__rmul__")
def binary(ctx: Ctx):
    return broadcast_merge([t for t in ctx.tensors() if t.field is not None], ctx.out_shape)


def broadcast_merge(ts: list[T], out_shape: tuple):
    if not ts:
        return None
    rank = len(out_shape)
    # the output layout comes from an operand of the output's full shape that still has its spatial axes
    lead = max(ts, key=lambda t: (tuple(t.shape) == tuple(out_shape), t.field.is_map, len(t.shape)))
    shift = rank - len(lead.shape)
    sp = tuple(None if a is None else a + shift for a in lead.field.sp)
    channel_axes = [a for a in range(1, rank) if a not in sp]
    shape = tuple(out_shape[a] for a in channel_axes)
    aligned = [_align(t, rank, sp, channel_axes, out_shape, lead.field.jump) for t in ts]
    return field.merge(aligned, shape, sp)


def _align(t: T, rank: int, sp: tuple, channel_axes: list, out_shape: tuple, jump: tuple):
    """One operand's field expressed in the output's layout: broadcast channels, spread broadcast pixels."""
    f = t.field.replace(jump=jump)  # a pooled gate broadcast back lives on the output's pixel grid
    shift = rank - len(t.shape)
    own_sp = tuple(None if a is None else a + shift for a in f.sp)
    for mine, theirs in zip(own_sp, sp):
        if mine is not None and mine != theirs:
            raise Decline("operands whose spatial axes do not line up")
    sizes = []  # a size-1 (or pooled-away) spatial axis is broadcast over the whole output map
    for k, axis in enumerate(sp):
        here = t.shape[own_sp[k] - shift] if own_sp[k] is not None else 1
        sizes.append(out_shape[axis] if axis is not None and here == 1 else 1)
    f = field.spread(f, sizes)
    # operand channel axes, in output coordinates, hold idx; the rest broadcast
    mine = [a + shift for a in range(1, len(t.shape)) if a not in f.sp]
    if any(a in sp for a in mine):
        raise Decline("a channel-like axis broadcast against a spatial one")
    view = [f.idx.shape[mine.index(a)] if a in mine else 1 for a in channel_axes]
    idx = np.broadcast_to(f.idx.reshape(view), tuple(out_shape[a] for a in channel_axes))
    return f.replace(idx=idx, sp=sp)
