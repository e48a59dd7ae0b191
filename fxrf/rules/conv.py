"""Convolutions, linear layers and normalisations: the ops that mix channels."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import field
from . import Ctx, Decline, rf_rule


class ConvSpec(NamedTuple):
    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple
    stride: tuple
    padding: tuple  # left padding per spatial dim
    dilation: tuple

    @property
    def kind(self) -> str:
        """The paper's kernel types: standard, pointwise (1x1), depthwise (one input channel per group), grouped."""
        if self.groups == 1:
            return "pointwise" if all(k == 1 for k in self.kernel) else "standard"
        if self.groups == self.in_channels:
            return "depthwise"
        return "grouped"


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _left_pad(padding, kernel, dilation):
    if padding == "valid":
        return (0,) * len(kernel)
    if padding == "same":  # PyTorch puts the odd extra pixel on the right
        return tuple(dl * (k - 1) // 2 for k, dl in zip(kernel, dilation))
    return _tuple(padding, len(kernel))


def conv_spec(ctx: Ctx) -> ConvSpec:
    """The conv's hyper-parameters, from the module or from the functional call's arguments."""
    m = ctx.module
    if m is not None:
        k = tuple(m.kernel_size)
        return ConvSpec(m.in_channels, m.out_channels, m.groups, k, tuple(m.stride),
                        _left_pad(m.padding, k, m.dilation), tuple(m.dilation))
    w = ctx.arg(1, "weight")
    d = len(w.shape) - 2
    groups = ctx.arg(6, "groups", 1)
    k = tuple(w.shape[2:])
    dil = _tuple(ctx.arg(5, "dilation", 1), d)
    return ConvSpec(w.shape[1] * groups, w.shape[0], groups, k, _tuple(ctx.arg(3, "stride", 1), d),
                    _left_pad(ctx.arg(4, "padding", 0), k, dil), dil)


# out[o, x] = sum over c in o's group, t < k of w * in[c, x*s - p + t*dil]: o sees its group's channels,
# and along each spatial dim the window [x*s - p, x*s - p + (k-1)*dil].
@rf_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, F.conv1d, F.conv2d, F.conv3d)
def conv(ctx: Ctx):
    x = ctx.args[0]
    spec = conv_spec(ctx)
    f = x.field
    if f is None:
        return None
    f = field.mix(f, spec.out_channels, spec.groups, axis=f.idx_axis(-len(spec.kernel) - 1))
    return _slide(f, x.shape, spec.kernel, spec.stride, spec.padding, spec.dilation, ctx.out_shape)


def one_pixel(size, k, s, p, dl):
    """A window along an axis of size 1 reads only position 0, all other taps are padding: an identity window
    if some tap hits position 0 (exact, since a 1-pixel map has a single neuron)."""
    if size == 1 and any(t * dl == p for t in range(k)):
        return 1, s, 0, 1
    return k, s, p, dl


def _slide(f, in_shape, kernel, stride, padding, dilation, out_shape):
    """A window over the last len(kernel) tensor axes, whichever of them are spatial or channel-like."""
    d, rank = len(kernel), len(in_shape)
    params = {a: one_pixel(in_shape[a], k, s, p, dl)
              for a, k, s, p, dl in zip(range(rank - d, rank), kernel, stride, padding, dilation)}
    sp_k, sp_s, sp_p, sp_d = [], [], [], []
    for axis in f.sp:  # spatial dims of the reference, in its order
        k, s, p, dl = params.pop(axis, (1, 1, 0, 1))
        sp_k.append(k), sp_s.append(s), sp_p.append(p), sp_d.append(dl)
    f = field.window(f, sp_k, sp_s, sp_p, sp_d)
    for axis, (k, s, p, dl) in params.items():  # a conv run across a channel-like axis (ECA's conv1d)
        f = field.channel_window(f, f.idx_axis(axis), k, s, p, dl, out_shape[axis])
    return f


# y = x W^T + b over the last axis: every output feature sees every input feature of its row.
@rf_rule(nn.Linear, F.linear)
def linear(ctx: Ctx):
    x = ctx.args[0]
    if x.field is None:
        return None
    if x.field.sp and (len(x.shape) - 1) in x.field.sp:
        raise Decline("a linear layer applied along a spatial axis")
    return field.mix(x.field, ctx.out_shape[-1], 1, axis=-1)


# Inference-mode batch norm is an affine map per channel: identity on fields.
@rf_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, F.batch_norm)
def batch_norm(ctx: Ctx):
    return ctx.args[0].field


# Layer norm statistics run over the trailing normalized_shape axes: each output sees all of them.
@rf_rule(nn.LayerNorm, F.layer_norm)
def layer_norm(ctx: Ctx):
    x = ctx.args[0]
    ns = ctx.param("normalized_shape", 1, "normalized_shape")
    return _statistics_over(x, range(len(x.shape) - len(_tuple(ns, 1)), len(x.shape)))


# Group norm: statistics over each group of channels and the whole map.
@rf_rule(nn.GroupNorm, F.group_norm)
def group_norm(ctx: Ctx):
    x = ctx.args[0]
    groups = ctx.param("num_groups", 1, "num_groups")
    if x.field is None:
        return None
    f = field.mix(x.field, x.shape[1], groups, axis=x.field.idx_axis(1))
    return _statistics_over(x._replace(field=f), [a for a in x.field.sp if a is not None])


# Instance norm: statistics over the whole map, per channel.
@rf_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, F.instance_norm)
def instance_norm(ctx: Ctx):
    x = ctx.args[0]
    return _statistics_over(x, [a for a in (x.field.sp if x.field else ()) if a is not None])


def _statistics_over(x, axes):
    """Each output element depends on every element along `axes` (normalisation statistics, softmax)."""
    f = x.field
    if f is None:
        return None
    sizes = [1] * len(f.sp)
    for axis in axes:
        if axis in f.sp:
            sizes[f.sp.index(axis)] = x.shape[axis]
        else:
            n = x.shape[axis]
            f = field.mix(f, n, 1, axis=f.idx_axis(axis))
    return field.spread(f, sizes)


@rf_rule(nn.Softmax, nn.LogSoftmax, nn.Softmin, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
         "softmax", "log_softmax")
def softmax(ctx: Ctx):
    x = ctx.args[0]
    dim = ctx.param("dim", 1, "dim")
    if dim is None:
        raise Decline("softmax without an explicit dim")
    return _statistics_over(x, [dim % len(x.shape)])
