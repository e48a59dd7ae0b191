"""Pooling, reductions and resampling: the ops that move along the spatial axes without mixing channels."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import field
from .base import Ctx, Decline, TMeta, define, op, spatial_dims, tuple_of
from .conv import keeps_taps, one_pixel, window_out


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
    out = TMeta(x.shape[:-d] + sp, x.dtype)
    return (out, TMeta(out.shape, torch.int64)) if _with_indices(ctx) else out


def _with_indices(ctx: Ctx) -> bool:
    """max pooling that also returns the argmax indices (a tuple-valued node)."""
    if ctx.module is not None:
        return bool(getattr(ctx.module, "return_indices", False))
    return "with_indices" in ctx.name or bool(ctx.kwargs.get("return_indices", False))


def pool_cost(ctx: Ctx):  # 1 op per input element
    return 0, ctx.in_numel


# out[c, x] = reduce over t < k of in[c, x*s - p + t*dil]: a window per channel.
@op(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    torch.max_pool1d, torch.max_pool2d, torch.max_pool3d, torch.avg_pool1d,
    F.max_pool1d_with_indices, F.max_pool2d_with_indices, F.max_pool3d_with_indices,
    shape=pool_shape, cost=pool_cost, kind="pool", traits={"per_channel"})
def pool(ctx: Ctx):
    x = ctx.args[0]
    k, s, p, dl, _ = pool_params(ctx, spatial_dims(ctx))
    f = _window_last(x, k, s, p, dl)
    return (f, f) if _with_indices(ctx) else f  # the indices point at the same window


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


# Upsampling (any resize): output pixel x reads input pixels around x * n / o. Per mode, the pixels read by every
# output x are enumerated along each dim (PyTorch's index formulas, clamped to the map) and their offsets from
# x * n / o bounded, so the hull is exact per neuron and an upper bound once composed (input_rf).
@op(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate, F.upsample)
def upsample(ctx: Ctx):
    x = ctx.args[0]
    f = x.field
    if f is None:
        return None
    mode = ctx.param("mode", 3, "mode", "nearest")
    align = ctx.param("align_corners", 4, "align_corners", None)
    if ctx.module is not None and isinstance(ctx.module, nn.UpsamplingBilinear2d):
        align = True
    rank = len(x.shape)
    if any(a is None for a in f.sp) or tuple(f.sp) != tuple(range(rank - len(f.sp), rank)):
        raise Decline("resampling a tensor whose spatial axes are not the trailing ones")
    lo, hi, jump = [], [], []
    for j, n, o in zip(f.jump, x.shape[-len(f.sp):], ctx.out_shape[-len(f.sp):]):
        first, last = _resize_reads(mode, bool(align), n, o)
        centre = np.arange(o) * (n / o)
        lo.append(float((first - centre).min()) * j)
        hi.append(float((last - centre).max()) * j)
        jump.append(j * n / o)
    spans = f.spans.copy()
    spans[:, 0::2] += lo
    spans[:, 1::2] += hi
    return f.replace(spans=spans, jump=tuple(jump), taps=None)


def _resize_reads(mode: str, align: bool, n: int, o: int):
    """(first, last) input pixel that each of the o outputs of a resize from n pixels reads."""
    x = np.arange(o, dtype=np.float64)
    r = n / o
    if mode == "area":  # adaptive average pooling
        return np.floor(x * r), np.ceil((x + 1) * r) - 1
    if mode in ("nearest", "nearest-exact"):
        src = np.floor((x + 0.5) * r) if mode == "nearest-exact" else np.floor(x * r)
        src = np.minimum(src, n - 1)
        return src, src
    if align:
        src = x * ((n - 1) / (o - 1)) if o > 1 else np.zeros_like(x)
    else:
        src = np.maximum((x + 0.5) * r - 0.5, 0 if mode != "bicubic" else -np.inf)
    base = np.floor(src)
    before, after = (1, 2) if mode == "bicubic" else (0, 1)
    return np.clip(base - before, 0, n - 1), np.clip(base + after, 0, n - 1)


# pixel_shuffle(r): out channel c at (y, x) reads in channel c*r*r + (y%r)*r + x%r at (y//r, x//r).
@op(nn.PixelShuffle, F.pixel_shuffle, traits={"channel_blocks"})
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


# ---- padding ----------------------------------------------------------------------------------------------------
# F.pad and the nn.*Pad modules: pad (or, with negative amounts, crop) the trailing axes. Output x along a padded
# axis reads input x - left: a one-tap window with padding `left`. The map changes size but is not resampled, so
# it stays in its stage. Zero/constant padding adds pixels that see nothing; reflect and replicate padding read
# pixels that the centre neuron's window already covers (docs/concepts.md); circular padding wraps around.


def pad_params(ctx: Ctx):
    """([(left, right) per padded axis, last axis first], mode)."""
    m = ctx.module
    if m is not None:
        amounts = tuple(m.padding)
        name = type(m).__name__
        mode = ("reflect" if "Reflection" in name else "replicate" if "Replication" in name
                else "circular" if "Circular" in name else "constant")
    else:
        amounts = tuple(ctx.arg(1, "pad"))
        mode = ctx.arg(2, "mode", "constant") or "constant"
    return [(int(amounts[i]), int(amounts[i + 1])) for i in range(0, len(amounts), 2)], mode


def pad_shape(ctx: Ctx):
    x = ctx.args[0]
    pads, _ = pad_params(ctx)
    shape = list(x.shape)
    for k, (lo, hi) in enumerate(pads):
        shape[len(shape) - 1 - k] += lo + hi
    return TMeta(tuple(shape), x.dtype)


def _check_border_reads(node, pads) -> None:
    """Reflect/replicate padding is read as zeros (a padded pixel sees nothing) when each reader is a dense conv
    window at least twice as wide as the padding: a border neuron then reads, in place of padding, pixels its own
    window covers anyway (reflect: -o - 2x lies in [x - |o|, x + |o|]; replicate: the edge). Any other reader could
    see pixels that depend on its position, which a field cannot hold: decline."""
    for user in node.users:
        w = None
        if user.op == "call_module":
            m = user.graph.owning_module.get_submodule(user.target)
            if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and m.padding_mode == "zeros":
                w, pad, dil = m.weight.shape, m.padding, m.dilation
        elif user.op == "call_function" and getattr(user.target, "__name__", "").split(".")[0] in \
                ("conv1d", "conv2d", "conv3d") and user.args[0] is node and len(user.args) > 1:
            meta = getattr(user.args[1], "meta", {}).get("tensor_meta")
            w = getattr(meta, "shape", None)
            pad, dil = (user.args[4] if len(user.args) > 4 else 0), (user.args[5] if len(user.args) > 5 else 1)
        if w is None or isinstance(pad, str):
            raise Decline("reflect or replicate padding read by something other than a conv")
        d = len(w) - 2
        kernel, pad, dil = tuple(w[2:]), _tuple(pad, d), _tuple(dil, d)
        for j, (lo, hi) in enumerate(pads):  # pads run from the last axis
            k, p, dl = kernel[d - 1 - j], pad[d - 1 - j], dil[d - 1 - j]
            if (lo or hi) and (p or (dl > 1 and k > 1) or 2 * max(lo, hi) > k - 1):
                raise Decline("reflect or replicate padding that a dilated, padded or narrow window reads")


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


@op(F.pad, torch.constant_pad_nd, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
    nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
    nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d, shape=pad_shape)
def pad(ctx: Ctx):
    x = ctx.args[0]
    f = x.field
    if f is None:
        return None
    pads, mode = pad_params(ctx)
    rank = len(x.shape)
    left = {rank - 1 - k: lo for k, (lo, hi) in enumerate(pads)}
    for a, (lo, hi) in ((rank - 1 - k, p) for k, p in enumerate(pads)):
        if a in f.sp or (lo == 0 and hi == 0):
            continue
        if a == 0 or mode != "constant":
            raise Decline(f"{mode} padding of a channel-like or the batch axis")
        ax = f.idx_axis(a)  # constant channels added around the real ones (or real ones cropped away)
        n = x.shape[a]
        f = field.remap(f, lambda idx, ax=ax, lo=lo, hi=hi, n=n:
                        np.moveaxis(np.moveaxis(idx, ax, 0)[max(-lo, 0): n + min(hi, 0)], 0, ax))
        if lo > 0 or hi > 0:
            f = field.cat([None, f, None], ax, [max(lo, 0), f.idx.shape[ax], max(hi, 0)])
    if mode in ("reflect", "replicate") and any(lo > 0 or hi > 0 for lo, hi in pads):
        _check_border_reads(ctx.node, pads)
    k = len(f.sp)
    p = [left.get(a, 0) if a is not None else 0 for a in f.sp]
    keeps_taps(f, [1] * k, [1] * k, p, [1] * k, [ctx.out_shape[a] if a is not None else 1 for a in f.sp])
    out = field.window(f, [1] * k, [1] * k, p, [1] * k)
    if mode == "circular":
        out = field.wrap(out, [x.shape[a] * j if a is not None and left.get(a) else 0
                               for a, j in zip(f.sp, f.jump)])
    return out
