"""The ATen spellings of the ops above, as a torch.export graph calls them (`aten.conv2d.default`, ...).

Most ATen ops take their arguments in the order of their torch.nn.functional form, so they are further targets of
the same op (`DEFAULT.alias`): one registration per op kind, whichever way the graph was captured. The few whose
signatures differ (batch norm's argument order, the resampling ops that carry their mode in their name, slicing
as its own op, ops that return (output, indices)) get a small op of their own here that reuses the rule.
"""
from __future__ import annotations

import math
import operator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .base import DEFAULT, Call, Ctx, Decline, define, same_shape
from .conv import _statistics_over, batch_norm, conv, conv_spec, instance_norm, norm_cost
from .layout import getitem
from .pool import adaptive_pool, pool, upsample

aten = torch.ops.aten


def _overloads(name: str, *names: str) -> list:
    """The overloads `aten.<name>.<n>` that exist in this torch (default: `.default`)."""
    packet = getattr(aten, name, None)
    if packet is None:
        return []
    return [o for n in (names or ("default",)) if (o := getattr(packet, n, None)) is not None]


def _alias(existing, *spellings) -> None:
    targets = [o for s in spellings for o in (_overloads(*s) if isinstance(s, tuple) else _overloads(s))]
    DEFAULT.alias(existing, *targets)


# Same argument order as the functional form.
_alias(F.conv2d, "conv1d", "conv2d", "conv3d", ("conv1d", "padding"), ("conv2d", "padding"), ("conv3d", "padding"))
_alias(F.linear, "linear")
_alias(F.layer_norm, "layer_norm")
_alias(F.group_norm, "group_norm")
_alias(F.softmax, ("softmax", "int"), "_softmax", ("log_softmax", "int"), "_log_softmax")
_alias(F.max_pool2d, "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d")
_alias(F.adaptive_avg_pool2d, "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
       "_adaptive_avg_pool2d")
for _name in ("relu", "relu6", "hardtanh", "leaky_relu", "prelu", "elu", "selu", "celu", "gelu", "silu", "mish",
              "sigmoid", "tanh", "hardswish", "hardsigmoid", "softplus", "clamp", "clamp_min", "clamp_max"):
    _base = {"relu6": F.relu6, "clamp_min": torch.clamp, "clamp_max": torch.clamp}.get(_name) or \
        getattr(torch, _name, None) or getattr(F, _name)
    _alias(_base, _name, f"{_name}_", (_name, "Tensor"), (f"{_name}_", "Tensor"))
_alias(torch.clone, "clone", "alias", "detach", "contiguous", "dropout", "dropout_", "feature_dropout",
       "lift_fresh_copy")
_alias("to", "_to_copy", ("to", "dtype"), ("to", "dtype_layout"), ("to", "device"), "type_as")
_alias(torch.abs, "abs", "exp", "neg", "sqrt", "rsqrt", "reciprocal", "reciprocal_")
_alias(operator.add, ("add", "Tensor"), ("add_", "Tensor"), ("sub", "Tensor"), ("sub_", "Tensor"),
       ("mul", "Tensor"), ("mul_", "Tensor"), ("div", "Tensor"), ("div_", "Tensor"), "maximum", "minimum",
       ("true_divide", "Tensor"), ("true_divide", "Scalar"),
       ("true_divide_", "Tensor"), ("rsub", "Scalar"), ("rsub", "Tensor"))  # rsub(x, c) = c - x: what `1 - x` exports to
_alias("view", "view", "reshape", "_unsafe_view", "reshape_as")  # reshape_as: the rule reads the output's shape
_alias(F.pad, "pad", "constant_pad_nd")
_alias("copy_", "copy_")
_alias("swapaxes", "swapaxes", ("swapaxes", "default"), "swapdims")
_alias(torch.flatten, ("flatten", "using_ints"))
_alias(torch.squeeze, "squeeze", ("squeeze", "dim"), ("squeeze", "dims"))
_alias("unflatten", ("unflatten", "int"))
_alias("unsqueeze", "unsqueeze")
_alias(torch.zeros_like, "zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_full",
       "new_empty", ("fill", "Scalar"), ("fill", "Tensor"), ("fill_", "Scalar"), ("fill_", "Tensor"), "zero",
       "zero_", "zeros", "ones", "full", ("empty", "memory_format"), "arange", ("arange", "start"),
       ("arange", "start_step"), "scalar_tensor")
_alias(operator.gt, *((n, o) for n in ("gt", "lt", "ge", "le", "eq", "ne") for o in ("Tensor", "Scalar")))
_alias(torch.logical_not, "logical_not", "bitwise_not")
_alias(torch.masked_fill, ("masked_fill", "Scalar"), ("masked_fill", "Tensor"), ("masked_fill_", "Scalar"),
       ("masked_fill_", "Tensor"))
_alias("permute", "permute", ("transpose", "int"))
_alias(torch.cat, "cat", "concat")
_alias("split", ("split", "Tensor"), "split_with_sizes")
_alias("chunk", "chunk")
_alias("unbind", ("unbind", "int"))
_alias("tensor_split", ("tensor_split", "sections"), ("tensor_split", "indices"))
_alias("mean", ("mean", "dim"), ("sum", "dim_IntList"), "amax")
_alias(F.pixel_shuffle, "pixel_shuffle")
_alias(F.pixel_unshuffle, "pixel_unshuffle")
_alias(F.channel_shuffle, "channel_shuffle", "native_channel_shuffle")
_alias("roll", "roll")
_alias("index_select", "index_select")
_alias("expand", "expand", "expand_as", "broadcast_to")
_alias(torch.matmul, "matmul", "mm", "bmm")
_alias(torch.addmm, "addmm", "baddbmm")
_alias(F.conv_transpose2d, ("conv_transpose1d", "default"), ("conv_transpose2d", "input"),
       ("conv_transpose3d", "input"))


# aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn): the weight is
# argument 1 (F.batch_norm has the running statistics first).
define("aten_batch_norm", *_overloads("batch_norm"), shape=same_shape, rf=batch_norm, cost=norm_cost(1),
       kind="norm", traits={"per_channel"})


# aten.instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn): the
# weight is argument 1 (F.instance_norm has the running statistics first).
define("aten_instance_norm", *_overloads("instance_norm"), shape=same_shape, rf=instance_norm, cost=norm_cost(1),
       kind="norm")


# aten._native_batch_norm_legit_no_training(...) -> (out, mean, invstd): the output is the input's field.
def _bn_tuple(ctx: Ctx):
    return (ctx.args[0].field, None, None)


def _bn_tuple_cost(ctx: Ctx):
    return 0, ctx.out_numel * (2 if ctx.arg(1, "weight") is not None else 1)


define("aten_native_batch_norm", *_overloads("_native_batch_norm_legit_no_training"), rf=_bn_tuple,
       cost=_bn_tuple_cost, kind="norm")


# Training-mode batch norm of decomposed graphs, (input, weight, bias, [running_mean, running_var,] training, ...) ->
# (out, batch mean, batch invstd[, new running_mean, new running_var]). As for the module (conv.uses_batch_statistics),
# fxrf reads the inference function: with running statistics (.default, _functional) it is per channel; without them
# (.no_stats) every output depends on its channel's whole map.
def _bn_training_tuple(ctx: Ctx):
    x = ctx.args[0]
    if isinstance(ctx.node.target, torch._ops.OpOverload) and ctx.node.target._overloadname == "no_stats":
        f = _statistics_over(x, [a for a in (x.field.sp if x.field else ()) if a is not None])
    else:
        f = x.field
    return (f,) + (None,) * (len(ctx.out) - 1)


define("aten_native_batch_norm_training", *_overloads("_native_batch_norm_legit", "default", "no_stats"),
       *_overloads("_native_batch_norm_legit_functional"), rf=_bn_training_tuple, cost=_bn_tuple_cost,
       kind="norm")


# aten.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups).
def _convolution_call(ctx: Ctx) -> Call:
    if ctx.arg(6, "transposed", False):
        raise Decline("a transposed convolution")
    a = ctx.args
    return Call(ctx.node, None, (a[0], a[1], a[2], a[3], a[4], a[5], ctx.arg(8, "groups", 1)), {}, ctx.out,
                ctx.dims)


class _NotAConv(NamedTuple):
    """The spec of a transposed convolution: no kernel type and no 3DRF gain, as nn.ConvTranspose2d has none."""

    kind: None = None


def _convolution_spec(ctx: Ctx):
    if ctx.arg(6, "transposed", False):  # the analysis asks every conv-like op for its spec, outside Decline's guard
        return _NotAConv()
    return conv_spec(_convolution_call(ctx))


def _convolution_cost(ctx: Ctx):
    if ctx.arg(6, "transposed", False):  # weight (C_in, C_out / groups, *k): each input element feeds C_out/g * k
        return ctx.in_numel * math.prod(ctx.arg(1, "weight").shape[1:]), 0
    return ctx.out_numel * math.prod(ctx.arg(1, "weight").shape[1:]), 0


define("aten_convolution", *_overloads("convolution"), rf=lambda ctx: conv(_convolution_call(ctx)),
       spec=_convolution_spec, kind="conv", cost=_convolution_cost)


# max_pool with indices: (out, indices), both the window's field (`pool` returns the pair itself: its name says
# "with_indices").
define("aten_max_pool_with_indices", *_overloads("max_pool1d_with_indices"), *_overloads("max_pool2d_with_indices"),
       *_overloads("max_pool3d_with_indices"),
       rf=pool, cost=lambda ctx: (0, ctx.in_numel), kind="pool", traits={"per_channel"})
define("aten_adaptive_max_pool", *_overloads("adaptive_max_pool1d"), *_overloads("adaptive_max_pool2d"),
       *_overloads("adaptive_max_pool3d"), rf=lambda ctx: (adaptive_pool(ctx),) * 2,
       cost=lambda ctx: (0, ctx.in_numel), kind="pool", traits={"per_channel"})


# upsample_<mode><d>d(input, output_size, [align_corners,] scale_factors): the mode is in the op's name.
def _upsample(mode: str):
    def rule(ctx: Ctx):
        return upsample(Call(ctx.node, None, ctx.args[:1], {"mode": mode}, ctx.out, ctx.dims))
    return rule


for _mode, _name in (("nearest", "upsample_nearest"), ("linear", "upsample_linear"),
                     ("bilinear", "upsample_bilinear"), ("bicubic", "upsample_bicubic"),
                     ("trilinear", "upsample_trilinear"), ("nearest-exact", "_upsample_nearest_exact")):
    for _d in ("1d", "2d", "3d"):
        _ops = _overloads(f"{_name}{_d}", "default", "vec")
        if _ops:
            define(f"aten_{_name.lstrip('_')}{_d}", *_ops, rf=_upsample(_mode))


# slice(self, dim, start, end, step) and select(self, dim, index): x[..., start:end:step, ...] / x[..., index, ...]
def _index_call(ctx: Ctx, item) -> Call:
    x = ctx.args[0]
    dim = ctx.arg(1, "dim", 0) % len(x.shape)
    return Call(ctx.node, None, (x, (slice(None),) * dim + (item,)), {}, ctx.out, ctx.dims)


def _slice(ctx: Ctx):
    start, end, step = ctx.arg(2, "start"), ctx.arg(3, "end"), ctx.arg(4, "step", 1)
    return getitem(_index_call(ctx, slice(start, end, step)))


define("aten_slice", *_overloads("slice", "Tensor"), rf=_slice)
define("aten_select", *_overloads("select", "int"), rf=lambda ctx: getitem(_index_call(ctx, ctx.arg(2, "index"))))


# Shape-only ops of export graphs: sizes are plain values there.
_alias("size", ("size", "int"), ("size", "default"))
_alias("dim", "dim")
define("aten_sym_size", *_overloads("sym_size", "int"),
       shape=lambda ctx: ctx.args[0].shape[ctx.arg(1, "dim")])
