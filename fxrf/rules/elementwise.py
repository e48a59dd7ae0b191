"""Elementwise ops: per-element maps (identity on fields) and broadcasting arithmetic (union of fields)."""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import field
from ..ops import Op
from .base import DEFAULT, Ctx, Decline, T, TMeta, define, per_output, same_shape


# out[c, x] = f(in[c, x]): the output element sees exactly what its input element sees.
def per_element(ctx: Ctx):
    return ctx.args[0].field


def _forms(name: str, extra=()) -> tuple:
    """Every spelling of an activation: F.name, torch.name, torch._C._nn.name, their in-place `name_`, the
    tensor methods of those names."""
    fns = [f for n in (name, name + "_") for ns in (F, torch, torch._C._nn) if (f := getattr(ns, n, None))]
    methods = [m for m in (name, name + "_") if hasattr(torch.Tensor, m)]
    return (*fns, *methods, *extra)


# Activations: per element, 1 op per output element (ptflops). Idempotent ones (act(act(x)) == act(x)) can be
# repeated after an identity conv without changing the function (the organizer's insertions).
_ACTIVATIONS = (  # (name, module, idempotent, extra targets)
    ("relu", nn.ReLU, True, ()),
    ("relu6", nn.ReLU6, True, ()),
    ("hardtanh", nn.Hardtanh, True, ("hardtanh_",)),
    ("leaky_relu", nn.LeakyReLU, False, ()),
    ("prelu", nn.PReLU, False, ()),
    ("elu", nn.ELU, False, ()),
    ("selu", nn.SELU, False, ()),
    ("celu", nn.CELU, False, ()),
    ("gelu", nn.GELU, False, ()),
    ("silu", nn.SiLU, False, ()),
    ("mish", nn.Mish, False, ()),
    ("sigmoid", nn.Sigmoid, False, ()),
    ("tanh", nn.Tanh, False, ()),
    ("hardswish", nn.Hardswish, False, ()),
    ("hardsigmoid", nn.Hardsigmoid, False, ()),
    ("softplus", nn.Softplus, False, ()),
    ("clamp", None, False, ("clamp_min", "clamp_min_", "clamp_max", "clamp_max_")),
)
def clamp_rule(ctx: Ctx):
    """clamp(x, min, max): per element, unless a bound is a tensor computed from the input (then each element
    also sees that bound's element there, broadcast)."""
    if any(t.field is not None for t in ctx.tensors()[1:]):
        return binary(ctx)
    return ctx.args[0].field


for _name, _module, _idempotent, _extra in _ACTIVATIONS:
    DEFAULT.register(Op(_name, ((_module,) if _module else ()) + _forms(_name, _extra), shape=same_shape,
                        rf=clamp_rule if _name == "clamp" else per_element, cost=per_output, kind="activation",
                        traits={"per_element", "per_channel", "activation"} | ({"idempotent"} if _idempotent else set())))


# Dropout (an identity at inference), identity, copies and casts: per element, free.
_CASTS = {"float": torch.float32, "half": torch.float16, "double": torch.float64, "bfloat16": torch.bfloat16,
          "bool": torch.bool, "int": torch.int32, "long": torch.int64}


def _cast_shape(ctx: Ctx):  # the dtype it casts to: the method's, a dtype argument, or type_as's other tensor
    x = ctx.args[0]
    target = ctx.node.target
    if target in _CASTS:
        return TMeta(x.shape, _CASTS[target])
    if target == "type_as":
        return TMeta(x.shape, ctx.args[1].dtype)
    for a in list(ctx.args[1:]) + list(ctx.kwargs.values()):
        if isinstance(a, torch.dtype):
            return TMeta(x.shape, a)
        if isinstance(a, TMeta):  # x.to(other): other's dtype
            return TMeta(x.shape, a.dtype)
    return TMeta(x.shape, x.dtype)


define("identity", nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, F.dropout,
       torch.clone, "contiguous", "clone", "detach",
       # torchvision's stochastic depth (fx-wrapped function and module): the identity at inference; resolved
       # once torchvision is imported, so importing fxrf does not import it
       "torchvision.ops.stochastic_depth:stochastic_depth", "torchvision.ops.stochastic_depth:StochasticDepth",
       shape=same_shape, rf=per_element, traits={"per_element", "per_channel"})
define("cast", *_CASTS, "to", "type_as", shape=_cast_shape, rf=per_element, traits={"per_element"})
define("unary_math", torch.abs, torch.exp, torch.neg, torch.sqrt, torch.rsqrt, torch.reciprocal, "abs", "exp", "neg",
       "sqrt", "rsqrt", "reciprocal", "reciprocal_", shape=same_shape, rf=per_element, traits={"per_element"})


# out = a (op) b with broadcasting: each output element sees what its two source elements see.
def broadcast_shape(ctx: Ctx):
    ts = [a for a in ctx.tensors()]
    return TMeta(_broadcast([tuple(t.shape) for t in ts]), ts[0].dtype)


def _broadcast(shapes: list) -> tuple:
    """torch.broadcast_shapes for plain int sizes, in Python (torch's goes through its symbolic-shape machinery,
    a tenth of a resnet's whole analysis); anything else, or sizes that do not broadcast, go to torch's."""
    if all(type(n) is int for s in shapes for n in s):
        out = [1] * max(map(len, shapes), default=0)
        for s in shapes:
            for i, n in enumerate(s, len(out) - len(s)):
                if n != 1:
                    if out[i] != 1 and out[i] != n:
                        break
                    out[i] = n
            else:
                continue
            break
        else:
            return tuple(out)
    return tuple(torch.broadcast_shapes(*shapes))


def binary(ctx: Ctx):
    return broadcast_merge([t for t in ctx.tensors() if t.field is not None], ctx.out_shape)


_ARITH = ("add", "sub", "mul", "div", "true_divide")
define("binary", operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
       operator.truediv, operator.itruediv, torch.maximum, torch.minimum,
       *(getattr(torch, n) for n in _ARITH), *(m for n in _ARITH for m in (n, n + "_")),
       "__add__", "__mul__", "__radd__", "__rmul__",
       shape=broadcast_shape, rf=binary, cost=per_output, kind="elementwise")


def compare_shape(ctx: Ctx):
    return TMeta(broadcast_shape(ctx).shape, torch.bool)


# Comparisons and boolean masks (attention masks): a bool tensor that sees what its operands see.
define("compare", operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne, torch.gt, torch.lt,
       torch.ge, torch.le, torch.eq, torch.ne, "gt", "lt", "ge", "le", "eq", "ne", "__gt__", "__lt__",
       shape=compare_shape, rf=binary)
define("logical_not", operator.invert, torch.bitwise_not, torch.logical_not, "bitwise_not", "logical_not",
       "__invert__", shape=same_shape, rf=per_element, traits={"per_element"})


# masked_fill(x, mask, value): each element is x's or the value, chosen by the mask's element at the same place
# (broadcast): it sees what x, the mask and a tensor value see there (autograd sees x's part only: a comparison's
# gradient is 0; where a constant mask is set the element sees nothing, so the field is exact where it is clear).
define("masked_fill", torch.masked_fill, "masked_fill", "masked_fill_", shape=same_shape, rf=binary, cost=per_output,
       kind="elementwise")


# dst.copy_(src): dst's elements replaced by src's, broadcast to dst's shape: it sees what src sees, not what dst saw.
def copy_into(ctx: Ctx):
    src = ctx.arg(1, "src")
    return broadcast_merge([src] if isinstance(src, T) and src.field is not None else [], ctx.out_shape)


define("copy", "copy_", shape=lambda ctx: TMeta(ctx.args[0].shape, ctx.args[0].dtype), rf=copy_into)


def broadcast_merge(ts: list[T], out_shape: tuple, layout: T | None = None):
    """The union of the operands' fields, broadcast to `out_shape`. `layout`: a tensor of that shape whose spatial
    axes and pixel grid the output has, though its values are not read (expand_as's template)."""
    if not ts:
        return None
    rank = len(out_shape)
    # the output layout comes from an operand of the output's full shape that still has its spatial axes
    out_t = tuple(out_shape)
    lead, best = None, None
    for t in ts:  # max(ts, key=...) without a call per operand: the first of the best
        key = (tuple(t.shape) == out_t, t.field.is_map, len(t.shape))
        if best is None or key > best:
            lead, best = t, key
    if layout is not None and layout.field is not None and layout.field.is_map and \
            tuple(layout.shape) == tuple(out_shape) and not (tuple(lead.shape) == tuple(out_shape) and lead.field.is_map):
        lead = layout
    shift = rank - len(lead.shape)
    sp = tuple(lead.field.sp) if not shift else tuple(None if a is None else a + shift for a in lead.field.sp)
    channel_axes = [a for a in range(1, rank) if a not in sp]
    shape = tuple(out_shape[a] for a in channel_axes)
    out = _one_reach_union(ts, out_t, shape, sp, lead.field.jump)
    if out is not None:
        return out
    aligned = [_align(t, rank, sp, channel_axes, out_shape, lead.field.jump) for t in ts]
    return field.merge(aligned, shape, sp)


def _one_reach_union(ts: list[T], out_shape: tuple, shape: tuple, sp: tuple, jump: tuple):
    """What aligning then merging gives when every operand has one reach, no taps and the output's layout (the
    residual adds of a CNN outside its stage fields): one union of bits, one hull of bounds. None otherwise."""
    if len(ts) < 2 or not all(len(t.field.bits) == 1 and t.field.taps is None and t.field.sp == sp and
                              tuple(t.shape) == out_shape for t in ts):
        return None
    bits, spans = ts[0].field.bits, ts[0].field.spans
    for t in ts[1:]:  # as field.merge pairs them, one operand at a time
        bits = bits | t.field.bits
        spans = field._frozen(field._hull(np.concatenate([spans, t.field.spans]))[None])
    return field.Field(field._frozen(bits), spans, field._frozen(field._uniform(shape)), tuple(jump), sp, None,
                       ts[0].field.size)


def _align(t: T, rank: int, sp: tuple, channel_axes: list, out_shape: tuple, jump: tuple):
    """One operand's field expressed in the output's layout: broadcast channels, spread broadcast pixels."""
    if t.field.sp == sp and tuple(t.shape) == tuple(out_shape):  # in that layout already (a residual add)
        return t.field.replace(jump=jump, idx=t.field.idx.view())  # (an idx object of its own, as broadcast_to's)
    return _broadcast_field(t, rank, sp, channel_axes, out_shape, jump)


def _broadcast_field(t: T, rank: int, sp: tuple, channel_axes: list, out_shape: tuple, jump: tuple):
    """_align's general case (tests/test_fast_paths.py compares the two where both apply)."""
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
