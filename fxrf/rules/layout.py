"""Ops that move channels around without computing: reshape, permute, cat, split, slicing, roll, shuffle.

All of them are numpy operations on the channel index array, so a channel shuffle written as
view -> transpose -> view (ShuffleNet) is followed exactly, channel by channel.
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import field
from .base import Ctx, Decline, T, TMeta, define, op
from .elementwise import broadcast_merge


def _with(x, dim, n):
    s = list(x.shape)
    s[dim] = n
    return TMeta(tuple(s), x.dtype)


def _sizes(ctx: Ctx, name: str):
    """The size arguments of view/reshape/permute: method varargs, or one sequence argument."""
    got = ctx.args[1:] if ctx.node.op == "call_method" else (ctx.arg(1, name),)
    return tuple(got[0]) if len(got) == 1 and isinstance(got[0], (tuple, list, torch.Size)) else tuple(got)


def reshape_shape(ctx: Ctx):  # one -1 takes what the others leave
    x = ctx.args[0]
    shape = _sizes(ctx, "shape")
    known = math.prod(s for s in shape if s != -1)
    return TMeta(tuple(math.prod(x.shape) // known if s == -1 else int(s) for s in shape), x.dtype)


def flatten_shape(ctx: Ctx):  # axes start..end become one of their product
    x = ctx.args[0]
    start, end = ctx.param("start_dim", 1, "start_dim", 0), ctx.param("end_dim", 2, "end_dim", -1)
    n = len(x.shape)
    start, end = start % n if n else 0, end % n if n else 0
    return TMeta(x.shape[:start] + (math.prod(x.shape[start:end + 1]),) + x.shape[end + 1:], x.dtype)


# Row-major reshape. With the spatial axes trailing and kept, only the channel part is regrouped; when they are
# folded into features, feature i*HW + j comes from channel i (at some pixel: the whole map, conservatively).
@op("view", "reshape", torch.reshape, shape=reshape_shape)
def reshape(ctx: Ctx):
    x = ctx.args[0]
    return reshape_field(x, ctx.out_shape, ctx.dims)


define("flatten", nn.Flatten, torch.flatten, "flatten", shape=flatten_shape, rf=reshape)
define("unflatten", nn.Unflatten, "unflatten", rf=reshape)


# unsqueeze(d): a new channel-like axis of size 1 at d, the axes from d on move up one. At d = 0 the old batch axis
# becomes a channel-like axis whose entries all have the field of their channel (fields do not depend on the
# sample: a window mask or a bias broadcast over windows); `reshape` would decline that as a batch change.
@op("unsqueeze", torch.unsqueeze)
def unsqueeze(ctx: Ctx):
    x = ctx.args[0]
    f = x.field
    if f is None:
        return None
    d = ctx.arg(1, "dim") % (len(x.shape) + 1)
    sp = tuple(None if a is None else a + (a >= d) for a in f.sp)
    if d == 0:
        idx = np.broadcast_to(f.idx, (x.shape[0],) + f.idx.shape)
    else:
        idx = np.expand_dims(f.idx, sum(a < d for a in f.channel_axes()))  # after the channel-like axes before d
    n, dims = len(ctx.out_shape), ctx.dims
    if dims and all(a is None for a in sp) and n >= 2 + dims and math.prod(ctx.out_shape[n - dims:]) == 1:
        # a vector back on a map of one pixel (as `reshape` has it): the gate of x * gate broadcasts over x's map
        # (efficient channel attention: pooled (N, C, 1).unsqueeze(-1))
        return f.with_idx(idx.reshape(ctx.out_shape[1:n - dims]), sp=tuple(range(n - dims, n)))
    return f.with_idx(idx, sp=sp)


# squeeze(dims) (all size-1 axes when no dim is given): the size-1 axes go, the later axes move down. A size-1
# channel-like axis leaves the index array; a size-1 map axis is a map of one pixel, which goes as if pooled away
# (an int index on it), and with it a map left of one pixel. Squeezing the batch axis (N = 1) makes the first kept
# axis the batch axis: exact when it is channel-like and all its entries have the same field (fields do not depend
# on the sample: unsqueeze(0) undone).
@op("squeeze", torch.squeeze)
def squeeze(ctx: Ctx):
    x = ctx.args[0]
    f = x.field
    if f is None:
        return None
    rank = len(x.shape)
    dims = ctx.arg(1, "dim")
    dims = range(rank) if dims is None else dims if isinstance(dims, (tuple, list)) else (dims,)
    gone = {d % rank for d in dims if x.shape[d % rank] == 1}
    kept = [a for a in range(rank) if a not in gone]
    cin = f.channel_axes()
    idx = f.idx
    drop = [a for a in cin if a in gone]
    if 0 in gone:
        if not kept or kept[0] in f.sp:
            raise Decline("a squeeze that makes a spatial axis the batch axis")
        k = cin.index(kept[0])
        idx = np.take(idx, [0], axis=k)
        if not (f.idx == idx).all():
            raise Decline("a squeeze that makes channels with different fields the batch axis")
        drop.append(kept[0])
    idx = np.squeeze(idx, axis=tuple(cin.index(a) for a in drop))
    sp = tuple(None if a is None or a in gone else kept.index(a) for a in f.sp)
    if any(a in gone for a in f.sp if a is not None) and all(ctx.out_shape[a] == 1 for a in sp if a is not None):
        # the rest of a 1-pixel map is no map any more (as `reshape` has it): its axes become channel-like, so
        # (N, C, 1, 1).squeeze(-1) can be transposed and convolved along C (efficient channel attention)
        sp = (None,) * len(sp)
        idx = idx.reshape(ctx.out_shape[1:])
    return f.with_idx(idx, sp=sp)


def reshape_field(x: T, out_shape: tuple, dims: int):
    f = x.field
    if f is None:
        return None
    if not out_shape or not x.shape or out_shape[0] != x.shape[0]:
        raise Decline("a reshape that folds other axes into the batch axis (heads or windows as batch)")
    rank = len(x.shape)
    present = [a for a in f.sp if a is not None]
    map_sizes = [x.shape[a] for a in present]
    hw = math.prod(map_sizes)
    trailing = tuple(present) == tuple(range(rank - len(present), rank))
    if present and hw > 1 and not trailing:
        raise Decline("a reshape of a tensor whose spatial axes are not the trailing ones")
    if present and hw > 1:
        if len(out_shape) >= 2 + len(present) and tuple(out_shape[-len(present):]) == tuple(map_sizes):
            idx = f.idx.reshape(out_shape[1:len(out_shape) - len(present)])
            out_sp = tuple(None if a is None else a - rank + len(out_shape) for a in f.sp)
            return f.with_idx(idx, sp=out_sp)
        sizes = [x.shape[a] if a is not None else 1 for a in f.sp]
        f = field.spread(f, sizes)
        flat = np.repeat(f.idx.ravel(), hw)
    else:
        flat = f.idx.ravel()
    n = len(out_shape)
    if n >= 2 + dims and math.prod(out_shape[n - dims:]) == 1 and dims:
        return f.with_idx(flat.reshape(out_shape[1:n - dims]), sp=tuple(range(n - dims, n)))
    return f.with_idx(flat.reshape(out_shape[1:]), sp=(None,) * dims)


# Axis permutation: the spatial axes move with it, the channel index array is transposed.
def _perm(ctx: Ctx) -> list:
    rank = len(ctx.args[0].shape)
    if ctx.name == "permute":
        return [d % rank for d in _sizes(ctx, "dims")]
    a, b = ctx.arg(1, "dim0") % rank, ctx.arg(2, "dim1") % rank
    perm = list(range(rank))
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def permute_shape(ctx: Ctx):  # out.shape[i] = in.shape[perm[i]]
    x = ctx.args[0]
    return TMeta(tuple(x.shape[d] for d in _perm(ctx)), x.dtype)


@op("permute", torch.permute, "transpose", torch.transpose, shape=permute_shape)
def permute(ctx: Ctx):
    return permute_field(ctx.args[0].field, _perm(ctx))


define("swapaxes", "swapaxes", torch.swapaxes, "swapdims", rf=permute)


def permute_field(f, perm: list):
    if f is None:
        return None
    if perm[0] != 0:
        raise Decline("a permutation that moves the batch axis")
    sp = tuple(None if a is None else perm.index(a) for a in f.sp)
    cin = f.channel_axes()
    order = [cin.index(src) for src in perm[1:] if src not in f.sp]
    return f.with_idx(f.idx.transpose(order), sp=sp)


# Concatenation along a channel-like axis keeps each part's channels in order.
def cat_shape(ctx: Ctx):  # the sizes along dim add up
    xs = [t for t in ctx.arg(0, "tensors") if isinstance(t, TMeta)]
    dim = ctx.arg(1, "dim", 0) % len(xs[0].shape)
    return _with(xs[0], dim, sum(t.shape[dim] for t in xs))


@op(torch.cat, torch.concat, shape=cat_shape)
def cat(ctx: Ctx):
    parts = [t for t in ctx.arg(0, "tensors") if isinstance(t, T)]
    dim = ctx.arg(1, "dim", 0) % len(parts[0].shape)
    live = [t.field for t in parts if t.field is not None]
    if not live:
        return None
    lead = live[0]
    if dim in lead.sp or dim == 0:
        raise Decline("concatenation along a spatial or the batch axis")
    if any(f.sp != lead.sp or f.idx.ndim != lead.idx.ndim for f in live):
        raise Decline("concatenation of tensors with different layouts")
    return field.cat([t.field for t in parts], lead.idx_axis(dim), [t.shape[dim] for t in parts])


# chunk/split along channels: each piece keeps its channels; along a spatial axis each piece is a crop.
def chunk_shape(ctx: Ctx):  # pieces of ceil(n / chunks), the last one shorter
    x, n = ctx.args[0], ctx.arg(1, "chunks")
    dim = ctx.arg(2, "dim", 0) % len(x.shape)
    step = -(-x.shape[dim] // n)
    return tuple(_with(x, dim, min(step, x.shape[dim] - i)) for i in range(0, x.shape[dim], step))


def split_shape(ctx: Ctx):  # pieces of split_size (the last one shorter), or the given sections
    x, sz = ctx.args[0], ctx.arg(1, "split_size_or_sections", ctx.kwargs.get("split_size"))
    dim = ctx.arg(2, "dim", 0) % len(x.shape)
    if isinstance(sz, int):
        return tuple(_with(x, dim, min(sz, x.shape[dim] - i)) for i in range(0, x.shape[dim], sz))
    return tuple(_with(x, dim, s) for s in sz)


define("chunk", "chunk", torch.chunk, shape=chunk_shape, rf=lambda ctx: split(ctx))
define("split", "split", torch.split, shape=split_shape, rf=lambda ctx: split(ctx))


@op("tensor_split", torch.tensor_split, "unbind", torch.unbind, name="tensor_split")
def split(ctx: Ctx):
    x = ctx.args[0]
    outs = ctx.out
    f = x.field
    name = ctx.name
    dim = ctx.arg(1 if name == "unbind" else 2, "dim", 0) % len(x.shape)
    if f is None:
        return tuple(None for _ in outs)
    if dim in f.sp:
        return tuple(f for _ in outs)
    if dim == 0:
        raise Decline("a split of the batch axis")
    ax = f.idx_axis(dim)
    bounds = np.cumsum([1 if name == "unbind" else o.shape[dim] for o in outs])[:-1]
    pieces = np.split(f.idx, bounds, axis=ax)
    if name == "unbind":
        pieces = [p.squeeze(ax) for p in pieces]
    return tuple(f.with_idx(p) for p in pieces)


# x[index]: basic indexing. Channel axes are sliced in the index array; spatial slices are crops (a step s
# multiplies the jump); an int on a spatial axis drops it.
@op(operator.getitem)
def getitem(ctx: Ctx):
    x, index = ctx.args[0], ctx.args[1]
    if not isinstance(x, T):  # picking one output of split/chunk or of a module returning a tuple
        return x[index].field
    f = x.field
    if f is None:
        return None
    index = index if isinstance(index, tuple) else (index,)
    rank = len(x.shape)
    if any(i is Ellipsis for i in index):
        k = index.index(Ellipsis)
        fill = rank - (len(index) - 1 - sum(i is None for i in index))
        index = index[:k] + (slice(None),) * fill + index[k + 1:]
    index = index + (slice(None),) * (rank - sum(i is not None for i in index))
    idx_index, sp, jump, out_axis, in_axis = [], list(f.sp), list(f.jump), 0, 0
    for i in index:
        if i is None:
            idx_index.append(None)
            out_axis += 1
            continue
        if not isinstance(i, (int, slice)):
            raise Decline("advanced (tensor or list) indexing")
        if in_axis == 0:
            if not isinstance(i, slice):
                raise Decline("indexing into the batch axis")
        elif in_axis in f.sp:
            k = f.sp.index(in_axis)
            if isinstance(i, slice):
                jump[k] = jump[k] * (i.step or 1)
                sp[k] = ("new", out_axis)
            else:
                sp[k] = None
        else:
            idx_index.append(i)
        if isinstance(i, slice):
            out_axis += 1
        in_axis += 1
    sp = tuple(a[1] if isinstance(a, tuple) else None for a in sp)
    return f.with_idx(f.idx[tuple(idx_index)], sp=sp, jump=jump)


# torch.roll along channels rotates them; along a spatial axis it wraps around the map.
@op("roll", torch.roll, traits={"channel_permutation"})
def roll(ctx: Ctx):
    x = ctx.args[0]
    f = x.field
    shifts, dims = ctx.arg(1, "shifts"), ctx.arg(2, "dims")
    if f is None:
        return None
    if dims is None:
        raise Decline("roll of the flattened tensor")
    shifts = shifts if isinstance(shifts, (tuple, list)) else (shifts,)
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    for s, d in zip(shifts, dims):
        d %= len(x.shape)
        if d in f.sp and f.size is not None and x.shape[d] > 1:
            # output x reads input (x - s) mod n: a shift, then offsets n reference pixels apart are one pixel
            k = f.sp.index(d)
            shift = [int(s) % x.shape[d] if i == k else 0 for i in range(len(f.sp))]
            f = field.window(f, [1] * len(f.sp), [1] * len(f.sp), shift, [1] * len(f.sp))
            f = field.wrap(f, [x.shape[d] * j if i == k else 0 for i, j in enumerate(f.jump)])
        elif d in f.sp:  # the hull (input_rf): any pixel of the row, an upper bound
            sizes = [x.shape[a] if a == d else 1 for a in f.sp]
            f = field.spread(f, sizes)
        else:
            f = field.remap(f, lambda idx, ax=f.idx_axis(d), s=s: np.roll(idx, s, axis=ax))
    return f


# index_select with a constant index tensor picks channels.
@op("index_select", torch.index_select, traits={"channel_permutation"})
def index_select(ctx: Ctx):
    x, dim, index = ctx.args[0], ctx.arg(1, "dim"), ctx.arg(2, "index")
    f = x.field
    if f is None:
        return None
    if not isinstance(index, T) or index.value is None or index.value.is_meta:
        raise Decline("index_select with an index that is not a constant")
    dim %= len(x.shape)
    if dim in f.sp or dim == 0:
        raise Decline("index_select along a spatial or the batch axis")
    try:
        picks = index.value.detach().cpu().numpy().astype(np.int64)
    except Exception:  # a fake tensor (inside torch.compile): no values to read
        raise Decline("index_select with an index whose values are not available") from None
    return field.remap(f, lambda idx: np.take(idx, picks, axis=f.idx_axis(dim)))


# channel_shuffle(g): out channel k*g + j is in channel j*(C/g) + k.
@op(nn.ChannelShuffle, F.channel_shuffle, torch.channel_shuffle, F.native_channel_shuffle,
    traits={"channel_permutation"})
def channel_shuffle(ctx: Ctx):
    x = ctx.args[0]
    g = ctx.param("groups", 1, "groups")
    f = x.field
    if f is None:
        return None
    ax = f.idx_axis(1)

    def shuffle(idx):
        idx = np.moveaxis(idx, ax, 0)
        c = idx.shape[0]
        idx = idx.reshape((g, c // g) + idx.shape[1:]).swapaxes(0, 1).reshape(idx.shape)
        return np.moveaxis(idx, 0, ax)

    return field.remap(f, shuffle)


# expand / expand_as / broadcast_to: a broadcast of one operand. expand_as(other) reads only other's shape, but its
# output lives on other's map (an SE gate `y.expand_as(x)` stays in x's stage instead of starting one of its own).
@op("expand", "expand_as", torch.broadcast_to, "broadcast_to")
def expand(ctx: Ctx):
    ts = ctx.tensors()
    layout = ts[1] if ctx.name == "expand_as" and len(ts) > 1 and isinstance(ts[1], T) else None
    return broadcast_merge([t for t in ts[:1] if t.field is not None], ctx.out_shape, layout)
