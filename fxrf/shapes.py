"""Shape propagation without running the model.

Running a graph on meta or fake tensors costs about as much as a real forward (every op goes through the
dispatcher and python meta kernels), so the common ops get a closed-form shape rule here, and only the rest fall
back to executing that single op on meta tensors. The cost is independent of the input resolution.

`propagate(gm, example_shape)` returns {node: value} where a tensor is a `TMeta(shape, dtype)` and every other
value (sizes, ints, tuples) is the concrete Python value the traced code would compute.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import AnalysisError, FxrfError, InputError
from .registry import registrar


class TMeta(NamedTuple):
    shape: tuple
    dtype: torch.dtype


_SHAPE_RULES: dict[Any, Callable] = {}


shape_rule = registrar(_SHAPE_RULES, "shape rule")  # @shape_rule(nn.Conv2d, F.conv2d, "view", ...)


def _a(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _window_out(size, k, s, p, dl, ceil=False):
    num = size + 2 * p - dl * (k - 1) - 1
    out = (-(-num // s) if ceil else num // s) + 1
    if ceil and (out - 1) * s >= size + p:  # PyTorch: the last window must start inside the input or left padding
        out -= 1
    if out <= 0:
        raise InputError(f"a {k}-pixel window (stride {s}, padding {p}, dilation {dl}) does not fit a {size}-pixel "
                         f"input: the example input is too small for this model")
    return out


# ---- same shape as the first tensor argument -------------------------------------------------------------------

_SAME = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softmax, nn.LogSoftmax,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.softplus, F.softmax, F.log_softmax, F.dropout, F.batch_norm, F.layer_norm, F.group_norm,
    F.sigmoid, F.tanh, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.softmax, torch.log_softmax,
    torch.clone, torch.abs, torch.exp, torch.neg, torch.sqrt, torch.rsqrt, torch.clamp,
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone", "softmax", "log_softmax", "abs", "exp",
    "neg", "sqrt", "rsqrt", "clamp", "clamp_", "detach", "hardtanh_", "float", "half", "to", "type_as",
)


@shape_rule(*_SAME)
def _same(node, mod, args, kwargs):
    x = args[0] if args else next(iter(kwargs.values()))
    if node.op == "call_method" and node.target in ("float", "half"):
        return TMeta(x.shape, torch.float32 if node.target == "float" else torch.float16)
    return x


def _broadcast(node, mod, args, kwargs):
    shapes, dtype = [], None
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, TMeta):
            shapes.append(a.shape)
            dtype = dtype or a.dtype
    return TMeta(tuple(torch.broadcast_shapes(*shapes)), dtype)


shape_rule(operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.truediv,
           torch.add, torch.mul, torch.sub, torch.div, "add", "add_", "mul", "mul_", "sub", "div",
           "__add__", "__mul__", "__radd__", "__rmul__", torch.maximum, torch.minimum)(_broadcast)


# ---- convolution, pooling, linear ------------------------------------------------------------------------------


def _check_conv_input(node, x, d, in_channels, what):
    """A wrong input for the first conv is the usual symptom of a wrong example input: say so plainly."""
    if len(x.shape) != d + 2:
        raise InputError(f"{what} [node {node.name}] expects a batched {d + 2}-D input (N, C, "
                         f"{ {1: 'L', 2: 'H, W', 3: 'D, H, W'}.get(d, '...')}) but gets shape {tuple(x.shape)}: pass an example input "
                         f"of rank {d + 2}, e.g. (1, {in_channels}, {', '.join(['32'] * d)})")
    if x.shape[1] != in_channels:
        raise InputError(f"{what} [node {node.name}] expects {in_channels} input channels but gets {x.shape[1]} "
                         f"(input shape {tuple(x.shape)}): pass an example input with {in_channels} channels")


@shape_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_module(node, mod, args, kwargs):
    x = args[0]
    d = len(mod.kernel_size)
    _check_conv_input(node, x, d, mod.in_channels, f"call_module '{node.target}' ({type(mod).__name__}"
                                                   f"({mod.in_channels}, {mod.out_channels}, ...))")
    pad = mod.padding
    if isinstance(pad, str):
        pad = (0,) * d if pad == "valid" else tuple((dl * (k - 1)) // 2 for k, dl in zip(mod.kernel_size, mod.dilation))
        if mod.padding == "same":  # "same" keeps the size by definition
            return TMeta(x.shape[:1] + (mod.out_channels,) + x.shape[2:], x.dtype)
    sp = tuple(_window_out(s, k, st, p, dl) for s, k, st, p, dl in
               zip(x.shape[-d:], mod.kernel_size, mod.stride, pad, mod.dilation))
    return TMeta(x.shape[:-d - 1] + (mod.out_channels,) + sp, x.dtype)


@shape_rule(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
def _conv_fn(node, mod, args, kwargs):
    x, w = args[0], _a(args, kwargs, 1, "weight")
    d = len(w.shape) - 2
    _check_conv_input(node, x, d, w.shape[1] * _a(args, kwargs, 6, "groups", 1), f"call_function {node.target.__name__}")
    stride = _tuple(_a(args, kwargs, 3, "stride", 1), d)
    pad = _a(args, kwargs, 4, "padding", 0)
    dil = _tuple(_a(args, kwargs, 5, "dilation", 1), d)
    if isinstance(pad, str):
        if pad == "same":
            return TMeta(x.shape[:1] + (w.shape[0],) + x.shape[2:], x.dtype)
        pad = 0
    pad = _tuple(pad, d)
    sp = tuple(_window_out(s, k, st, p, dl) for s, k, st, p, dl in zip(x.shape[-d:], w.shape[2:], stride, pad, dil))
    return TMeta(x.shape[:-d - 1] + (w.shape[0],) + sp, x.dtype)


def pool_params(node, mod_or_none, args, kwargs, d):
    """(kernel, stride, padding, dilation, ceil_mode) of a max/avg pool in module or functional form."""
    if mod_or_none is not None:
        m = mod_or_none
        k = _tuple(m.kernel_size, d)
        s = _tuple(m.stride if m.stride is not None else m.kernel_size, d)
        return k, s, _tuple(m.padding, d), _tuple(getattr(m, "dilation", 1), d), m.ceil_mode
    k = _tuple(_a(args, kwargs, 1, "kernel_size"), d)
    s = _a(args, kwargs, 2, "stride", None)
    s = k if s is None or s == [] or s == () else _tuple(s, d)
    p = _tuple(_a(args, kwargs, 3, "padding", 0), d)
    if "max" in node.target.__name__:  # max_pool(x, k, s, p, dilation, ceil_mode)
        return k, s, p, _tuple(_a(args, kwargs, 4, "dilation", 1), d), _a(args, kwargs, 5, "ceil_mode", False)
    return k, s, p, (1,) * d, _a(args, kwargs, 4, "ceil_mode", False)  # avg_pool(x, k, s, p, ceil_mode, ...)


_POOL_DIMS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
              F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
              torch.max_pool1d: 1, torch.max_pool2d: 2, torch.max_pool3d: 3, torch.avg_pool1d: 1}


def pool_dims(node, mod) -> int:
    return _POOL_DIMS[type(mod) if mod is not None else node.target]


@shape_rule(*_POOL_DIMS)
def _pool(node, mod, args, kwargs):
    x = args[0]
    d = pool_dims(node, mod)
    k, s, p, dl, ceil = pool_params(node, mod, args, kwargs, d)
    sp = tuple(_window_out(n, kk, ss, pp, dd, ceil) for n, kk, ss, pp, dd in zip(x.shape[-d:], k, s, p, dl))
    return TMeta(x.shape[:-d] + sp, x.dtype)


_ADAPTIVE_DIMS = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
                  nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
                  F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
                  F.adaptive_max_pool2d: 2, torch.adaptive_avg_pool1d: 1}


def adaptive_out(node, mod, args, kwargs, x):
    d = _ADAPTIVE_DIMS[type(mod) if mod is not None else node.target]
    size = mod.output_size if mod is not None else _a(args, kwargs, 1, "output_size")
    size = _tuple(size, d)
    return d, tuple(n if o is None else o for o, n in zip(size, x.shape[-d:]))


@shape_rule(*_ADAPTIVE_DIMS)
def _adaptive(node, mod, args, kwargs):
    x = args[0]
    d, out = adaptive_out(node, mod, args, kwargs, x)
    return TMeta(x.shape[:-d] + out, x.dtype)


@shape_rule(nn.Linear)
def _linear_module(node, mod, args, kwargs):
    if args[0].shape[-1] != mod.in_features:
        raise InputError(f"call_module '{node.target}' (Linear({mod.in_features}, {mod.out_features})) [node "
                         f"{node.name}] gets {args[0].shape[-1]} features (shape {tuple(args[0].shape)}): the "
                         f"example input's size probably differs from the one the model was built for")
    return TMeta(args[0].shape[:-1] + (mod.out_features,), args[0].dtype)


@shape_rule(F.linear)
def _linear_fn(node, mod, args, kwargs):
    return TMeta(args[0].shape[:-1] + (_a(args, kwargs, 1, "weight").shape[0],), args[0].dtype)


@shape_rule(nn.Flatten, torch.flatten, "flatten")
def _flatten(node, mod, args, kwargs):
    x = args[0]
    if mod is not None:
        start, end = mod.start_dim, mod.end_dim
    else:
        start, end = _a(args, kwargs, 1, "start_dim", 0), _a(args, kwargs, 2, "end_dim", -1)
    n = len(x.shape)
    start, end = start % n if n else 0, end % n if n else 0
    mid = math.prod(x.shape[start:end + 1])
    return TMeta(x.shape[:start] + (mid,) + x.shape[end + 1:], x.dtype)


@shape_rule("view", "reshape", torch.reshape)
def _reshape(node, mod, args, kwargs):
    x = args[0]
    shape = args[1:] if node.op == "call_method" else (_a(args, kwargs, 1, "shape"),)
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    total = math.prod(x.shape)
    known = math.prod(s for s in shape if s != -1)
    return TMeta(tuple(total // known if s == -1 else int(s) for s in shape), x.dtype)


@shape_rule("permute", torch.permute)
def _permute(node, mod, args, kwargs):
    x = args[0]
    dims = args[1:] if node.op == "call_method" else (_a(args, kwargs, 1, "dims"),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return TMeta(tuple(x.shape[d] for d in dims), x.dtype)


@shape_rule("transpose", torch.transpose)
def _transpose(node, mod, args, kwargs):
    x = args[0]
    a, b = _a(args, kwargs, 1, "dim0"), _a(args, kwargs, 2, "dim1")
    s = list(x.shape)
    s[a], s[b] = s[b], s[a]
    return TMeta(tuple(s), x.dtype)


@shape_rule(torch.cat, torch.concat)
def _cat(node, mod, args, kwargs):
    xs = [t for t in _a(args, kwargs, 0, "tensors") if isinstance(t, TMeta)]
    dim = _a(args, kwargs, 1, "dim", 0) % len(xs[0].shape)
    s = list(xs[0].shape)
    s[dim] = sum(t.shape[dim] for t in xs)
    return TMeta(tuple(s), xs[0].dtype)


@shape_rule("size")
def _size(node, mod, args, kwargs):
    dim = _a(args, kwargs, 1, "dim")
    return torch.Size(args[0].shape) if dim is None else args[0].shape[dim]


@shape_rule("dim")
def _dim(node, mod, args, kwargs):
    return len(args[0].shape)


@shape_rule(getattr)
def _getattr(node, mod, args, kwargs):
    x, name = args[0], args[1]
    if not isinstance(x, TMeta):
        return getattr(x, name)
    if name == "shape":
        return torch.Size(x.shape)
    if name == "dtype":
        return x.dtype
    if name == "ndim":
        return len(x.shape)
    raise NotImplementedError  # falls back to meta execution


@shape_rule("mean", torch.mean, "sum", torch.sum, "amax", torch.amax)
def _reduce(node, mod, args, kwargs):
    x = args[0]
    dims = _a(args, kwargs, 1, "dim")
    keep = _a(args, kwargs, 2, "keepdim", False)
    if dims is None:
        return TMeta((), x.dtype)
    dims = {d % len(x.shape) for d in _tuple(dims, 1)}
    shape = tuple((1 if keep else None) if i in dims else s for i, s in enumerate(x.shape))
    return TMeta(tuple(s for s in shape if s is not None), x.dtype)


@shape_rule("chunk", torch.chunk)
def _chunk(node, mod, args, kwargs):
    x, n = args[0], _a(args, kwargs, 1, "chunks")
    dim = _a(args, kwargs, 2, "dim", 0) % len(x.shape)
    step = -(-x.shape[dim] // n)
    return tuple(_with(x, dim, min(step, x.shape[dim] - i)) for i in range(0, x.shape[dim], step))


@shape_rule("split", torch.split)
def _split(node, mod, args, kwargs):
    x, sz = args[0], _a(args, kwargs, 1, "split_size_or_sections", kwargs.get("split_size"))
    dim = _a(args, kwargs, 2, "dim", 0) % len(x.shape)
    if isinstance(sz, int):
        return tuple(_with(x, dim, min(sz, x.shape[dim] - i)) for i in range(0, x.shape[dim], sz))
    return tuple(_with(x, dim, s) for s in sz)


def _with(x, dim, n):
    s = list(x.shape)
    s[dim] = n
    return TMeta(tuple(s), x.dtype)


# ---- the walk --------------------------------------------------------------------------------------------------


def _meta(v):
    if isinstance(v, TMeta):
        return torch.empty(v.shape, dtype=v.dtype, device="meta")
    if isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
        return type(v)(_meta(x) for x in v)
    if isinstance(v, dict):
        return {k: _meta(x) for k, x in v.items()}
    return v


def _unmeta(v):
    if isinstance(v, torch.Tensor):
        return TMeta(tuple(v.shape), v.dtype)
    if isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
        return type(v)(_unmeta(x) for x in v) if not hasattr(v, "_fields") else tuple(_unmeta(x) for x in v)
    return v


def _has_tensor(v) -> bool:
    if isinstance(v, TMeta):
        return True
    if isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
        return any(_has_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(_has_tensor(x) for x in v.values())
    return False


def _run_on_meta(node: fx.Node, mod, args, kwargs):
    """Execute one op on meta tensors (parameters swapped for meta copies, the module itself untouched)."""
    margs, mkwargs = _meta(args), _meta(kwargs)
    if node.op == "call_module":
        state = {k: torch.empty_like(v, device="meta") for k, v in
                 list(mod.named_parameters()) + list(mod.named_buffers())}
        out = torch.func.functional_call(mod, state, tuple(margs), mkwargs) if state else mod(*margs, **mkwargs)
    elif node.op == "call_method":
        out = getattr(margs[0], node.target)(*margs[1:], **mkwargs)
    else:
        out = node.target(*margs, **mkwargs)
    return _unmeta(out)


def fetch_attr(gm: fx.GraphModule, target: str):
    """What a get_attr node with this dotted target reads from `gm`."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def evaluate(node: fx.Node, gm: fx.GraphModule, env: dict, modules: dict) -> Any:
    """The abstract value of one node given the values of its inputs (`modules`: gm.named_modules() as a dict)."""
    args = fx.node.map_arg(node.args, env.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
    if node.op == "get_attr":
        v = fetch_attr(gm, node.target)
        return TMeta(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v
    mod = modules[node.target] if node.op == "call_module" else None
    if not _has_tensor(args) and not _has_tensor(kwargs) and node.op == "call_function":
        return node.target(*args, **kwargs)  # plain Python arithmetic on sizes
    if node.op == "call_function" and node.target is operator.getitem and not isinstance(args[0], TMeta):
        return args[0][args[1]]
    rule = _SHAPE_RULES.get(type(mod) if mod is not None else node.target)
    if rule is not None:
        try:
            return rule(node, mod, args, kwargs)
        except NotImplementedError:
            pass
    return _run_on_meta(node, mod, args, kwargs)


def propagate(gm: fx.GraphModule, inputs: list[TMeta], modules: dict | None = None) -> dict:
    """{node: abstract value} for every node of `gm`; placeholders take `inputs` in order."""
    modules = dict(gm.named_modules()) if modules is None else modules
    env: dict = {}
    it = iter(inputs)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(it, None)
            if env[node] is None:
                env[node] = node.args[0] if node.args else None  # default value of an optional argument
            continue
        if node.op == "output":
            env[node] = fx.node.map_arg(node.args[0], env.__getitem__)
            continue
        try:
            env[node] = evaluate(node, gm, env, modules)
        except FxrfError:
            raise
        except Exception as e:
            from .trace import describe
            raise AnalysisError(
                f"cannot compute the output shape of {describe(gm, node)}: {type(e).__name__}: {e}. fxrf runs ops "
                f"without a shape rule on meta tensors, which this one does not support; register a shape rule "
                f"with @fxrf.shapes.shape_rule(...) or trace with this module inlined") from e
    return env
