"""Pooling, reductions and resampling: the ops that move along the spatial axes without mixing channels."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import field
from .base import Ctx, Decline, TMeta, define, op, spatial_dims, tuple_of
from .conv import one_pixel, window_out


def pool_params(ctx: Ctx, d: int):
    """(kernel, stride, padding, dilation, ceil_mode) of a max/avg pool in module or functional form."""
    m = ctx.module
    if m is not None:
        k = tuple_of(m.kernel_size, d)
        s = tuple_of(m.stride if m.stride is not None else m.kernel_size, d)
        return k, s, tuple_of(m.padding, d), tuple_of(getattr(m, "dilation", 1), d), m.ceil_mode
    k = tuple_of(ctx.arg(1, "kernel_size"), d)
    s = ctx.arg(2, "stride", None)
    s = k if s is None or s == [] or s == () else tuple_of(s, d)
    p = tuple_of(ctx.arg(3, "padding", 0), d)
    if "max" in ctx.name:  # max_pool(x, k, s, p, dilation, ceil_mode)
        return k, s, p, tuple_of(ctx.arg(4, "dilation", 1), d), ctx.arg(5, "ceil_mode", False)
    return k, s, p, (1,) * d, ctx.arg(4, "ceil_mode", False)  # avg_pool(x, k, s, p, ceil_mode, ...)


# out size per dim = floor or ceil((n + 2p - dil*(k-1) - 1) / s) + 1
def pool_shape(ctx: Ctx):
    x = ctx.args[0]
    d = spatial_dims(ctx)
    k, s, p, dl, ceil = pool_params(ctx, d)
    sp = tuple(window_out(n, kk, ss, pp, dd, ceil) for n, kk, ss, pp, dd in zip(x.shape[-d:], k, s, p, dl))
    return TMeta(x.shape[:-d] + sp, x.dtype)


def pool_cost(ctx: Ctx):  # 1 op per input element
    return 0, ctx.in_numel


# out[c, x] = reduce over t < k of in[c, x*s - p + t*dil]: a window per channel.
@op(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    torch.max_pool1d, torch.max_pool2d, torch.max_pool3d, torch.avg_pool1d,
    shape=pool_shape, cost=pool_cost, kind="pool", traits={"per_channel"})
def pool(ctx: Ctx):
    x = ctx.args[0]
    k, s, p, dl, _ = pool_params(ctx, spatial_dims(ctx))
    return _window_last(x, k, s, p, dl)


def _window_last(x, kernel, stride, padding, dilation):
    f = x.field
    if f is None:
        return None
    rank, d = len(x.shape), len(kernel)
    params = {a: one_pixel(x.shape[a], *kps) for a, kps in zip(range(rank - d, rank), zip(kernel, stride, padding,
                                                                                          dilation))}
    if any(a not in f.sp for a in params):
        raise Decline("pooling over a channel-like axis")
    ks, ss, ps, ds = zip(*(params.get(a, (1, 1, 0, 1)) for a in f.sp))
    return field.window(f, ks, ss, ps, ds)


def adaptive_out(ctx: Ctx, x) -> tuple:
    """(d, output size per spatial dim) of an adaptive pool (None in output_size keeps the input's size)."""
    d = spatial_dims(ctx)
    size = tuple_of(ctx.param("output_size", 1, "output_size"), d)
    return d, tuple(n if o is None else o for o, n in zip(size, x.shape[-d:]))


def adaptive_shape(ctx: Ctx):
    x = ctx.args[0]
    d, out = adaptive_out(ctx, x)
    return TMeta(x.shape[:-d] + out, x.dtype)


# Adaptive pooling: output i reads [floor(i*n/o), ceil((i+1)*n/o)); the widest such window bounds every neuron.
@op(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    torch.adaptive_avg_pool1d, shape=adaptive_shape, cost=pool_cost, kind="pool", traits={"per_channel"})
def adaptive_pool(ctx: Ctx):
    x = ctx.args[0]
    d, out = adaptive_out(ctx, x)
    kernel, stride = [], []
    for n, o in zip(x.shape[-d:], out):
        kernel.append(max(math.ceil((i + 1) * n / o) - (i * n) // o for i in range(o)))
        stride.append(n // o if n % o == 0 else n / o)
    return _window_last(x, kernel, stride, [0] * d, [1] * d)


def reduce_shape(ctx: Ctx):
    x = ctx.args[0]
    dims = ctx.arg(1, "dim")
    keep = ctx.arg(2, "keepdim", False)
    if dims is None:
        return TMeta((), x.dtype)
    dims = {d % len(x.shape) for d in tuple_of(dims, 1)}
    shape = tuple((1 if keep else None) if i in dims else s for i, s in enumerate(x.shape))
    return TMeta(tuple(s for s in shape if s is not None), x.dtype)


# mean/sum/amax over axes: spatial axes fold the whole map into each output, channel axes union.
@op("mean", torch.mean, "sum", torch.sum, "amax", torch.amax, shape=reduce_shape)
def reduce(ctx: Ctx):
    x = ctx.args[0]
    f = x.field
    if f is None:
        return None
    dims = ctx.arg(1, "dim")
    keep = ctx.arg(2, "keepdim", False)
    rank = len(x.shape)
    axes = sorted({a % rank for a in (range(1, rank) if dims is None else field_tuple(dims))})
    if 0 in axes:
        raise Decline("reduction over the batch axis")
    sizes = [x.shape[a] if a in axes else 1 for a in f.sp]
    f = field.widen(f, sizes)
    for a in axes:
        if a not in f.sp:
            ax = f.idx_axis(a)
            f = field.mix(f, 1, 1, axis=ax)
    if keep:
        return f
    # drop the reduced axes: channel ones from idx, spatial ones from the layout
    idx = f.idx.reshape([n for a, n in zip(f.channel_axes(), f.idx.shape) if a not in axes])
    sp = tuple(None if a is None or a in axes else a - sum(r < a for r in axes) for a in f.sp)
    return f.with_idx(idx, sp=sp)


def field_tuple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


# Upsampling: output pixel x reads input x / scale (nearest) or its two neighbours (linear modes).
@op(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate)
def upsample(ctx: Ctx):
    x = ctx.args[0]
    f = x.field
    if f is None:
        return None
    mode = ctx.param("mode", 3, "mode", "nearest")
    rank = len(x.shape)
    if any(a is None for a in f.sp) or tuple(f.sp) != tuple(range(rank - len(f.sp), rank)):
        raise Decline("resampling a tensor whose spatial axes are not the trailing ones")
    factor = [o / i for o, i in zip(ctx.out_shape[-len(f.sp):], x.shape[-len(f.sp):])]
    taps = 1 if mode == "nearest" else 2
    f = field.window(f, [taps] * len(f.sp), [1] * len(f.sp), [0] * len(f.sp), [1] * len(f.sp))
    return field.rescale(f, factor)


# pixel_shuffle(r): out channel c at (y, x) reads in channel c*r*r + (y%r)*r + x%r at (y//r, x//r).
@op(nn.PixelShuffle, F.pixel_shuffle)
def pixel_shuffle(ctx: Ctx):
    x = ctx.args[0]
    r = ctx.param("upscale_factor", 1, "upscale_factor")
    f = x.field
    if f is None:
        return None
    c_out = ctx.out_shape[1]
    f = field.mix(f, c_out, c_out, axis=f.idx_axis(1))
    return field.rescale(f, [r] * len(f.sp))


# pixel_unshuffle(r): out channel c*r*r + k at (y, x) reads in channel c at one pixel of the r x r block (y, x).
@op(nn.PixelUnshuffle, F.pixel_unshuffle)
def pixel_unshuffle(ctx: Ctx):
    x = ctx.args[0]
    r = ctx.param("downscale_factor", 1, "downscale_factor")
    f = x.field
    if f is None:
        return None
    idx = f.idx
    ax = f.idx_axis(1)
    f = f.with_idx(np.repeat(idx, r * r, axis=ax))
    n = len(f.sp)
    return field.window(f, [r] * n, [r] * n, [0] * n, [1] * n)


# LP pooling: counted (1 op per input element); no receptive-field rule yet (conservative).
define("lp_pool", nn.LPPool1d, nn.LPPool2d, F.lp_pool1d, F.lp_pool2d, cost=pool_cost, kind="pool")
