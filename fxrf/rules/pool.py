"""Pooling, reductions and resampling: the ops that move along the spatial axes without mixing channels."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import field, shapes
from . import Ctx, Decline, rf_rule
from .conv import one_pixel


# out[c, x] = reduce over t < k of in[c, x*s - p + t*dil]: a window per channel.
@rf_rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
         F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
def pool(ctx: Ctx):
    x = ctx.args[0]
    d = shapes.pool_dims(ctx.node, ctx.module)
    k, s, p, dl, _ = shapes.pool_params(ctx.node, ctx.module, ctx.args, ctx.kwargs, d)
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


# Adaptive pooling: output i reads [floor(i*n/o), ceil((i+1)*n/o)); the widest such window bounds every neuron.
@rf_rule(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
         nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
         F.adaptive_avg_pool3d, F.adaptive_max_pool2d)
def adaptive_pool(ctx: Ctx):
    x = ctx.args[0]
    d, out = shapes.adaptive_out(ctx.node, ctx.module, ctx.args, ctx.kwargs, x)
    kernel, stride = [], []
    for n, o in zip(x.shape[-d:], out):
        kernel.append(max(math.ceil((i + 1) * n / o) - (i * n) // o for i in range(o)))
        stride.append(n // o if n % o == 0 else n / o)
    return _window_last(x, kernel, stride, [0] * d, [1] * d)


# mean/sum/amax over axes: spatial axes fold the whole map into each output, channel axes union.
@rf_rule("mean", torch.mean, "sum", torch.sum, "amax", torch.amax)
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
@rf_rule(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate)
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
@rf_rule(nn.PixelShuffle, F.pixel_shuffle)
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
@rf_rule(nn.PixelUnshuffle, F.pixel_unshuffle)
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
