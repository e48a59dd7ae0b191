"""Convolutions, linear layers and normalisations: the ops that mix channels."""
from __future__ import annotations

import math
import operator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import field
from ..errors import InputError
from .base import Ctx, Decline, TMeta, define, op, per_output, same_shape, tuple_of


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


def _left_pad(padding, kernel, dilation):
    if padding == "valid":
        return (0,) * len(kernel)
    if padding == "same":  # PyTorch puts the odd extra pixel on the right
        return tuple(dl * (k - 1) // 2 for k, dl in zip(kernel, dilation))
    return tuple_of(padding, len(kernel))


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
    dil = tuple_of(ctx.arg(5, "dilation", 1), d)
    return ConvSpec(w.shape[1] * groups, w.shape[0], groups, k, tuple_of(ctx.arg(3, "stride", 1), d),
                    _left_pad(ctx.arg(4, "padding", 0), k, dil), dil)


def window_out(size, k, s, p, dl, ceil=False):
    """Output length of a k-tap window (stride s, padding p each side, dilation dl) over `size` pixels."""
    num = size + 2 * p - dl * (k - 1) - 1
    out = (-(-num // s) if ceil else num // s) + 1
    if ceil and (out - 1) * s >= size + p:  # PyTorch: the last window must start inside the input or left padding
        out -= 1
    if out <= 0:
        raise InputError(f"a {k}-pixel window (stride {s}, padding {p}, dilation {dl}) does not fit a {size}-pixel "
                         f"input: the example input is too small for this model")
    return out


def _check_conv_input(call: Ctx, x, d, in_channels):
    """A wrong input for the first conv is the usual symptom of a wrong example input: say so plainly."""
    node, m = call.node, call.module
    what = (f"call_module '{node.target}' ({type(m).__name__}({m.in_channels}, {m.out_channels}, ...))"
            if m is not None else f"call_function {call.name}")
    if len(x.shape) != d + 2:
        raise InputError(f"{what} [node {node.name}] expects a batched {d + 2}-D input (N, C, "
                         f"{ {1: 'L', 2: 'H, W', 3: 'D, H, W'}.get(d, '...')}) but gets shape {tuple(x.shape)}: pass an example input "
                         f"of rank {d + 2}, e.g. (1, {in_channels}, {', '.join(['32'] * d)})")
    if x.shape[1] != in_channels:
        raise InputError(f"{what} [node {node.name}] expects {in_channels} input channels but gets {x.shape[1]} "
                         f"(input shape {tuple(x.shape)}): pass an example input with {in_channels} channels")


# out size per dim = floor((n + 2p - dil*(k-1) - 1) / s) + 1; padding="same" keeps n.
def conv_shape(call: Ctx):
    x = call.args[0]
    spec = conv_spec(call)
    d = len(spec.kernel)
    _check_conv_input(call, x, d, spec.in_channels)
    out_c = x.shape[:1] + (spec.out_channels,)
    if call.param("padding", 4, "padding", 0) == "same":
        return TMeta(out_c + tuple(x.shape[-d:]), x.dtype)
    sp = tuple(window_out(n, k, s, p, dl) for n, k, s, p, dl in
               zip(x.shape[-d:], spec.kernel, spec.stride, spec.padding, spec.dilation))
    return TMeta(out_c + sp, x.dtype)


def conv_cost(call: Ctx):  # out_elements * (C_in / groups) * prod(kernel); the bias add is not counted
    spec = conv_spec(call)
    return call.out_numel * (spec.in_channels // spec.groups) * math.prod(spec.kernel), 0


# out[o, x] = sum over c in o's group, t < k of w * in[c, x*s - p + t*dil]: o sees its group's channels,
# and along each spatial dim the window [x*s - p, x*s - p + (k-1)*dil].
@op(nn.Conv1d, nn.Conv2d, nn.Conv3d, F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d,
    shape=conv_shape, cost=conv_cost, kind="conv", spec=lambda call: conv_spec(call))
def conv(ctx: Ctx):
    x = ctx.args[0]
    spec = conv_spec(ctx)
    f = x.field
    if f is None:
        return None
    mode = getattr(ctx.module, "padding_mode", "zeros")
    if mode in ("reflect", "replicate") and any(p and (2 * p > k - 1 or (dl > 1 and k > 1)) for k, p, dl in
                                                 zip(spec.kernel, spec.padding, spec.dilation)):
        # a border neuron reads padding that holds pixels outside its own taps (a dilated window's holes, or
        # padding wider than half the window): which ones depends on its position, which a field cannot hold
        raise Decline(f"{mode} padding read outside the window's own taps (dilation or wide padding)")
    if mode != "circular" and (out := _one_reach(f, x.shape, spec)) is not None:
        return out
    f = field.mix(f, spec.out_channels, spec.groups, axis=f.idx_axis(-len(spec.kernel) - 1))
    if mode != "circular" and (out := _one_reach(f, x.shape, spec)) is not None:
        return out  # mixed into one reach (a standard conv over a stage input): slid in one step too
    out = _slide(f, x.shape, spec.kernel, spec.stride, spec.padding, spec.dilation, ctx.out_shape)
    if mode == "circular":  # the padding wraps around the map
        rank, d = len(x.shape), len(spec.kernel)
        pads = dict(zip(range(rank - d, rank), spec.padding))
        out = field.wrap(out, [x.shape[a] * j if a is not None and pads.get(a) else 0 for a, j in zip(f.sp, f.jump)])
    # reflect / replicate padding of at most half a dense window: a border neuron reads, instead of padding, pixels
    # its own window covers anyway (reflect: -o - 2x within [x - |o|, x + |o|]; replicate: the edge), so as zeros
    return out


def _one_reach(f, in_shape, spec: ConvSpec):
    """mix then _slide in one step, for the usual conv: a one-reach field without taps over a batched map whose
    spatial axes are the window's, no window with holes on a stage field (those would grow taps). None otherwise.
    Half of a CNN's rule time was building the intermediate field and the window's lists (tests/test_field.py
    compares it with the general path)."""
    d, rank = len(spec.kernel), len(in_shape)
    if len(f.bits) != 1 or f.taps is not None or rank != d + 2 or f.sp != tuple(range(2, rank)):
        return None
    lo, hi, jump = [], [], []
    for n, k, s, p, dl, j in zip(in_shape[2:], spec.kernel, spec.stride, spec.padding, spec.dilation, f.jump):
        if n == 1:
            k, s, p, dl = one_pixel(n, k, s, p, dl)
        if f.size is not None and k > 1 and dl * j != 1:
            return None  # a window with holes on a stage field: its taps (field.window)
        lo.append(-p * j)
        hi.append(((k - 1) * dl - p) * j)
        jump.append(j * s)
    spans = f.spans  # as field._shifted: moved unless the reach sees no pixel, the same array if nothing moves
    if any(lo) or any(hi):
        row = f.spans[0].tolist()
        if not any(row[2 * k] > row[2 * k + 1] for k in range(d)):
            row = [v + float(x) for v, x in zip(row, (x for pair in zip(lo, hi) for x in pair))]
        spans = field._frozen(np.array([row]))
    depthwise = spec.groups == f.idx.shape[-1] and spec.out_channels // spec.groups == 1  # mix hands f on
    idx = f.idx if depthwise else field._frozen(field._uniform((spec.out_channels,)))
    return field.Field(f.bits, spans, idx, tuple(jump), f.sp, None, f.size)


def one_pixel(size, k, s, p, dl):
    """A window along an axis of size 1 reads only position 0, all other taps are padding: an identity window
    if some tap hits position 0 (exact, since a 1-pixel map has a single neuron)."""
    if size == 1 and any(t * dl == p for t in range(k)):
        return 1, s, 0, 1
    return k, s, p, dl


def keeps_taps(f, kernel, stride, padding, dilation, out_sizes) -> None:
    """Decline a window whose output neurons lie beyond the stage map (padding wider than the window) when it
    would shift seen offsets out of the stored range -(w0-1)..w0-1 of a field with holes (`taps`): such a neuron
    may need them. Inside the map, an offset beyond w0-1 can never be seen and dropping it is exact."""
    if f is None or f.taps is None or f.size is None:
        return
    for t, k, s, p, dl, j, w0, n in zip(f.taps, kernel, stride, padding, dilation, f.jump, f.size, out_sizes):
        if (n - 1) * j * s <= w0 - 1:
            continue
        cols = np.flatnonzero(t.any(axis=0))
        if len(cols) and any(c + (-p + i * dl) * j not in range(t.shape[1]) for c in (cols[0], cols[-1])
                             for i in range(int(k))):
            raise Decline("padding that puts neurons beyond the stage map of a field with holes (a dilated window)")


def pads_inside(f, kernel, padding, dilation, in_sizes) -> None:
    """Decline a padded window with holes (a dilated one, or any over a field with holes) on a map that covers less
    than its stage's input (a valid pool or conv shrank it): a tap in its padding stands at a reference offset that
    can still lie inside the stage map, so clipping by the stage map would count pixels no tap reads. Example: a
    2x2 max pool (stride 1) takes 6 px to 5, then a 3x3 conv at dilation 3 and padding 3: the centre neuron's taps
    -1 and 5 are padding, it sees 2 px, while offsets -3..4 around it clip to the whole 6-px map."""
    if f is None or f.size is None:
        return
    for k, p, dl, j, w0, n in zip(kernel, padding, dilation, f.jump, f.size, in_sizes):
        holes = f.taps is not None or (k > 1 and dl * j != 1)
        if holes and p and n * j < w0:
            raise Decline("a padded window with holes on a map smaller than its stage's input (a dilated window "
                          "after a valid pool or conv)")


def _slide(f, in_shape, kernel, stride, padding, dilation, out_shape):
    """A window over the last len(kernel) tensor axes, whichever of them are spatial or channel-like."""
    d, rank = len(kernel), len(in_shape)
    params = {a: one_pixel(in_shape[a], k, s, p, dl)
              for a, k, s, p, dl in zip(range(rank - d, rank), kernel, stride, padding, dilation)}
    sp_k, sp_s, sp_p, sp_d = [], [], [], []
    for axis in f.sp:  # spatial dims of the reference, in its order
        k, s, p, dl = params.pop(axis, (1, 1, 0, 1))
        sp_k.append(k), sp_s.append(s), sp_p.append(p), sp_d.append(dl)
    if f.size is not None:  # (both checks are about stage fields)
        keeps_taps(f, sp_k, sp_s, sp_p, sp_d, [out_shape[a] if a is not None else 1 for a in f.sp])
        pads_inside(f, sp_k, sp_p, sp_d, [in_shape[a] if a is not None else 1 for a in f.sp])
    f = field.window(f, sp_k, sp_s, sp_p, sp_d)
    for axis, (k, s, p, dl) in params.items():  # a conv run across a channel-like axis (ECA's conv1d)
        f = field.channel_window(f, f.idx_axis(axis), k, s, p, dl, out_shape[axis])
    return f


def linear_shape(call: Ctx):
    x = call.args[0]
    m = call.module
    if m is not None and x.shape[-1] != m.in_features:
        raise InputError(f"call_module '{call.node.target}' (Linear({m.in_features}, {m.out_features})) [node "
                         f"{call.node.name}] gets {x.shape[-1]} features (shape {tuple(x.shape)}): the "
                         f"example input's size probably differs from the one the model was built for")
    out = m.out_features if m is not None else call.arg(1, "weight").shape[0]
    return TMeta(x.shape[:-1] + (out,), x.dtype)


def linear_cost(call: Ctx):  # out_elements * in_features (bias not counted)
    m = call.module
    return call.out_numel * (m.in_features if m is not None else call.arg(1, "weight").shape[-1]), 0


# y = x W^T + b over the last axis: every output feature sees every input feature of its row.
@op(nn.Linear, F.linear, shape=linear_shape, cost=linear_cost, kind="linear")
def linear(ctx: Ctx):
    x = ctx.args[0]
    if x.field is None:
        return None
    if x.field.sp and (len(x.shape) - 1) in x.field.sp:
        raise Decline("a linear layer applied along a spatial axis")
    return field.mix(x.field, ctx.out_shape[-1], 1, axis=-1)


def norm_cost(weight_arg: int):
    """1 op per element to normalise, 2 when affine (a weight is present): ptflops' convention."""
    def cost(call: Ctx):
        w = getattr(call.module, "weight", None) if call.module is not None else call.arg(weight_arg, "weight")
        return 0, call.out_numel * (2 if w is not None else 1)
    return cost


def uses_batch_statistics(ctx: Ctx) -> bool:
    """Whether a batch norm normalises with the statistics of the batch it is given in the function fxrf reads: the
    inference one. A norm with running statistics uses them in eval mode, so it is per channel whatever mode the
    model is in now (a model is analysed for deployment, not for the training step: reading its training-mode batch
    statistics would make every freshly built model's fields whole maps); one without (track_running_stats=False,
    F.batch_norm / aten.batch_norm with running_mean None) always uses the batch's."""
    m = ctx.module
    if m is not None:
        return not m.track_running_stats or getattr(m, "running_mean", None) is None
    # F.batch_norm(x, running_mean, running_var, ...) and aten.batch_norm(x, weight, bias, running_mean, ...)
    index = 1 if ctx.node.target is F.batch_norm else 3
    return ctx.arg(index, "running_mean", None) is None


@op(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, F.batch_norm,
    shape=same_shape, cost=norm_cost(3), kind="norm", traits={"per_channel"})
def batch_norm(ctx: Ctx):
    x = ctx.args[0]
    if uses_batch_statistics(ctx):
        return _statistics_over(x, [a for a in (x.field.sp if x.field else ()) if a is not None])
    return x.field


# Layer norm statistics run over the trailing normalized_shape axes: each output sees all of them.
@op(nn.LayerNorm, F.layer_norm, torch.layer_norm, shape=same_shape, cost=norm_cost(2), kind="norm")
def layer_norm(ctx: Ctx):
    x = ctx.args[0]
    ns = ctx.param("normalized_shape", 1, "normalized_shape")
    return _statistics_over(x, range(len(x.shape) - len(tuple_of(ns, 1)), len(x.shape)))


# Group norm: statistics over each group of channels and the whole map.
@op(nn.GroupNorm, F.group_norm, torch.group_norm, shape=same_shape, cost=norm_cost(2), kind="norm")
def group_norm(ctx: Ctx):
    x = ctx.args[0]
    groups = ctx.param("num_groups", 1, "num_groups")
    if x.field is None:
        return None
    f = field.mix(x.field, x.shape[1], groups, axis=x.field.idx_axis(1))
    return _statistics_over(x._replace(field=f), [a for a in x.field.sp if a is not None])


# Instance norm: statistics over the whole map, per channel; with running statistics (track_running_stats in eval
# mode, use_input_stats=False) an affine map per channel.
@op(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, F.instance_norm, shape=same_shape,
    cost=norm_cost(3), kind="norm")
def instance_norm(ctx: Ctx):
    x, m = ctx.args[0], ctx.module
    # F.instance_norm and aten.instance_norm both have use_input_stats at position 5
    batch_stats = (m.training or not m.track_running_stats) if m is not None else ctx.arg(5, "use_input_stats", True)
    if not batch_stats:
        return x.field
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


@op(nn.Softmax, nn.LogSoftmax, nn.Softmin, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
    "softmax", "log_softmax", shape=same_shape, cost=per_output, kind="activation", traits={"activation"})
def softmax(ctx: Ctx):
    x = ctx.args[0]
    dim = ctx.param("dim", 1, "dim")
    if dim is None:
        raise Decline("softmax without an explicit dim")
    return _statistics_over(x, [dim % len(x.shape)])


# Transposed convs: in_elements * (C_out / groups) * prod(kernel). Shape by meta execution; no receptive-field
# rule yet (conservative).
def conv_transpose_cost(call: Ctx):
    m = call.module
    per = (m.out_channels // m.groups) * math.prod(m.kernel_size) if m is not None else \
        math.prod(call.arg(1, "weight").shape[1:])
    return call.in_numel * per, 0


define("conv_transpose", nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, F.conv_transpose1d,
       F.conv_transpose2d, F.conv_transpose3d, cost=conv_transpose_cost, kind="conv")


# matmul / mm / bmm: out_elements * K, K = the contracted dim (a.shape[-1]); addmm/baddbmm's addend is free.
def matmul_cost(call: Ctx):
    return call.out_numel * call.arg(0, "input").shape[-1], 0


def addmm_cost(call: Ctx):
    return call.out_numel * call.arg(1, "mat1").shape[-1], 0


define("matmul", torch.matmul, torch.mm, torch.bmm, operator.matmul, "matmul", "mm", "bmm", cost=matmul_cost,
       kind="linear")
define("addmm", torch.addmm, torch.baddbmm, "addmm", "baddbmm", cost=addmm_cost, kind="linear")
