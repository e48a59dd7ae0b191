"""Model -> torch.fx GraphModule with a shape on every node, without running the model."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import TensorMetadata

from .errors import InputError, TraceError
from .naming import _type_name, describe, op_name  # noqa: F401  (describe and op_name: re-exported)
from .shapes import TMeta, propagate

InputSpec = Any  # a tensor, a shape (tuple of ints / torch.Size), or a tuple of those for several inputs


try:  # generates the forward's Python code on first use, not at trace time (about 5 ms on resnet50)
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModule
except ImportError:  # pragma: no cover - older torch
    _GraphModule = fx.GraphModule


class _Tracer(fx.Tracer):
    """fx.Tracer that remembers which submodule it is inside (for error messages) and takes extra leaf types."""

    def __init__(self, leaf_modules: Iterable[type] = ()):
        super().__init__()
        self.extra_leaves = tuple(leaf_modules)
        self.path: list[str] = []
        self.failed_in: str | None = None  # the innermost submodule whose forward raised

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.extra_leaves) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.path.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = path
            raise
        finally:
            self.path.pop()


def _as_shapes(example_input: InputSpec) -> list[TMeta]:
    def one(x):
        if isinstance(x, torch.Tensor):
            return TMeta(tuple(x.shape), x.dtype)
        if isinstance(x, (tuple, list, torch.Size)) and all(isinstance(s, int) for s in x):
            return TMeta(tuple(int(s) for s in x), torch.float32)
        raise InputError(
            f"example input must be a tensor or a shape such as (1, 3, 224, 224), got {type(x).__name__}")

    if isinstance(example_input, (tuple, list)) and example_input and not all(
            isinstance(s, int) for s in example_input):
        return [one(x) for x in example_input]
    return [one(example_input)]


def trace(model: nn.Module, example_input: InputSpec, *, concrete_args: dict | None = None,
          leaf_modules: Sequence[type] = ()) -> fx.GraphModule:
    """Trace `model` symbolically and annotate every node with `node.meta["tensor_meta"]`.

    No forward runs: shapes come from closed-form rules (meta execution for the rest), so models on the meta
    device work. The returned GraphModule shares parameters with `model` (as `torch.fx.symbolic_trace` does);
    `model` itself is not modified. A GraphModule is taken as it is and only gets shapes.

    >>> import torch.nn as nn
    >>> gm = trace(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU()), (1, 3, 32, 32))
    >>> [tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op != "output"]
    [(1, 3, 32, 32), (1, 8, 15, 15), (1, 8, 15, 15)]
    """
    return trace_with_values(model, example_input, concrete_args=concrete_args, leaf_modules=leaf_modules)[0]


def trace_with_values(model, example_input, *, concrete_args=None, leaf_modules=(), rules=None):
    """`trace`, also returning the abstract value of every node and the module table (for the analysis)."""
    if not isinstance(model, nn.Module):
        raise InputError(f"fxrf works on torch.nn.Module objects, got {type(model).__name__}: pass the model "
                         f"instance (e.g. torchvision.models.resnet50()), not its class or output")
    inputs = _as_shapes(example_input)
    gm = model if isinstance(model, fx.GraphModule) else _symbolic_trace(model, concrete_args, leaf_modules)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) > len(placeholders):
        raise InputError(f"{type(model).__name__} takes {len(placeholders)} input(s), got {len(inputs)} example inputs")
    modules = dict(gm.named_modules())
    env = propagate(gm, inputs, modules, rules)
    annotate(gm, env)
    return gm, env, modules


def _symbolic_trace(model: nn.Module, concrete_args, leaf_modules) -> fx.GraphModule:
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as e:
        where = tracer.failed_in or ""
        inside = f" in submodule '{where}' ({_type_name(type(model.get_submodule(where)))})" if where else ""
        raise TraceError(
            f"cannot trace {type(model).__name__}{inside}: {type(e).__name__}: {e}. "
            f"To proceed: mark that module as a leaf (fxrf.trace(model, x, leaf_modules=[ItsClass])), pass "
            f"concrete_args for the argument the control flow depends on, or trace the model yourself "
            f"(torch.fx.symbolic_trace or a custom Tracer) and pass the GraphModule") from e
    name = type(model).__name__
    return _GraphModule(tracer.root, graph, name)


def annotate(gm: fx.GraphModule, env: dict) -> None:
    """Write torch's standard `tensor_meta` (as ShapeProp does) for every tensor-valued node."""
    for node, v in env.items():
        if isinstance(v, TMeta):
            node.meta["tensor_meta"] = _tensor_metadata(v)
        elif isinstance(v, tuple) and any(isinstance(x, TMeta) for x in v):  # (out, None) as MHA returns
            node.meta["tensor_meta"] = tuple(_tensor_metadata(x) if isinstance(x, TMeta) else None for x in v)


def _tensor_metadata(v: TMeta) -> TensorMetadata:
    stride, acc = [], 1
    for s in reversed(v.shape):
        stride.append(acc)
        acc *= s
    return TensorMetadata(torch.Size(v.shape), v.dtype, False, tuple(reversed(stride)), torch.contiguous_format,
                          False, {})
