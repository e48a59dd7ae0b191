"""Shape propagation without running the model.

Running a graph on meta or fake tensors costs about as much as a real forward (every op goes through the
dispatcher and python meta kernels), so the common ops carry a closed-form shape rule in the op table
(`fxrf.ops`, filled by `fxrf.rules`), and only the rest fall back to executing that single op on meta tensors.
The cost is independent of the input resolution.

`propagate(gm, example_shape)` returns {node: value} where a tensor is a `TMeta(shape, dtype)` and every other
value (sizes, ints, tuples) is the concrete Python value the traced code would compute.
"""
from __future__ import annotations

import contextlib
import contextvars
import operator
from typing import Any

import torch
import torch.fx as fx

from .errors import AnalysisError, FxrfError
from .naming import describe
from .ops import Call, OpTable, TMeta, default_table

__all__ = ["TMeta", "propagate", "evaluate", "fetch_attr", "reuse_meta_runs"]


# ---- the walk --------------------------------------------------------------------------------------------------


def _meta(v):
    if isinstance(v, TMeta):
        return torch.empty(v.shape, dtype=v.dtype, device="meta")
    if isinstance(v, torch.Tensor):  # a tensor literal in the args: on meta too, devices must not mix
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
    if isinstance(v, (TMeta, torch.Tensor)):
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


_META_RUNS: contextvars.ContextVar = contextvars.ContextVar("fxrf_meta_runs", default=None)


@contextlib.contextmanager
def reuse_meta_runs():
    """Within this block, an op without a closed-form shape rule that runs on meta tensors again with the same
    module object (or function, or method name) and the same abstract inputs gives its first result back instead of
    running again. For a pass that analyses one model many times, changing only a few of its nodes (the organizer:
    one multi-head attention module run on meta tensors is most of a ViT's shape propagation). Modules must not be
    changed in a way that changes their output shapes while it is on."""
    token = _META_RUNS.set({})
    try:
        yield
    finally:
        _META_RUNS.reset(token)


def _hashable(v):
    if isinstance(v, (list, tuple)) and not isinstance(v, TMeta):
        return (type(v).__name__, tuple(_hashable(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple((k, _hashable(x)) for k, x in v.items()))
    return v


def _run_on_meta_reused(node: fx.Node, mod, args, kwargs):
    cache = _META_RUNS.get()
    if cache is None:
        return _run_on_meta(node, mod, args, kwargs)
    key = (node.op, mod if mod is not None else node.target, _hashable(args), _hashable(kwargs))
    try:
        hash(key)
    except TypeError:  # a slice or a tensor literal among the arguments: not reused
        return _run_on_meta(node, mod, args, kwargs)
    if key not in cache:  # (the key holds the module: its id cannot be reused by another while cached)
        cache[key] = _run_on_meta(node, mod, args, kwargs)
    return cache[key]


def fetch_attr(gm: fx.GraphModule, target: str):
    """What a get_attr node with this dotted target reads from `gm`."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _shape_rule(table: OpTable, node: fx.Node, mod):
    """The closed-form shape rule of a node, if any. A module subclass that overrides its registered base's
    forward computes something else (timm's Conv2dSame pads on the fly): it runs on meta tensors instead."""
    if mod is not None:
        base = table.registered_base(type(mod))
        if base is None or type(mod).forward is not base.forward:
            return None
        return table.lookup_target(base).shape  # (lookup(node, mod) would find the base again)
    op = table.lookup(node, mod)
    return op.shape if op is not None else None


def evaluate(node: fx.Node, gm: fx.GraphModule, env: dict, modules: dict, table: OpTable | None = None) -> Any:
    """The abstract value of one node given the values of its inputs (`modules`: gm.named_modules() as a dict)."""
    args = fx.node.map_arg(node.args, env.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, env.__getitem__) if node.kwargs else node.kwargs
    if node.op == "get_attr":
        v = fetch_attr(gm, node.target)
        return TMeta(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v
    mod = modules[node.target] if node.op == "call_module" else None
    if node.op == "call_function" and not _has_tensor(args) and not _has_tensor(kwargs):
        # plain Python arithmetic on sizes; a factory (aten.arange) made a real tensor: its TMeta, as for every
        # other tensor, so that no real tensor meets the meta ones of a later op (an attention mask from arange)
        return _unmeta(node.target(*args, **kwargs))
    if node.op == "call_function" and node.target is operator.getitem and not isinstance(args[0], TMeta):
        return args[0][args[1]]
    rule = _shape_rule(table if table is not None else default_table(), node, mod)
    if rule is not None:
        try:
            return rule(Call(node, mod, args, kwargs))
        except NotImplementedError:
            pass
    return _run_on_meta_reused(node, mod, args, kwargs)


def propagate(gm: fx.GraphModule, inputs: list[TMeta], modules: dict | None = None,
              table: OpTable | None = None) -> dict:
    """{node: abstract value} for every node of `gm`; placeholders take `inputs` in order."""
    modules = dict(gm.named_modules()) if modules is None else modules
    table = table if table is not None else default_table()
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
            env[node] = evaluate(node, gm, env, modules, table)
        except FxrfError:
            raise
        except Exception as e:
            raise AnalysisError(
                f"cannot compute the output shape of {describe(gm, node)}: {type(e).__name__}: {e}. fxrf runs ops "
                f"without a shape rule on meta tensors, which this one does not support; register its op with a "
                f"shape rule (@fxrf.op(..., shape=...), docs/architecture.md) or trace with this module inlined") from e
    return env
