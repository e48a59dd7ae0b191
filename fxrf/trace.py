"""Model -> torch.fx GraphModule with a shape on every node, without running the model."""
from __future__ import annotations

import inspect
import numbers
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import TensorMetadata

from .errors import AnalysisError, InputError, TraceError
from .naming import _type_name, describe, op_name  # noqa: F401  (describe and op_name: re-exported)
from .shapes import TMeta, evaluate, fetch_attr, propagate

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


def _is_size(s) -> bool:
    """An integer size: int or numpy integer (not bool)."""
    return isinstance(s, numbers.Integral) and not isinstance(s, bool)


def _as_shapes(example_input: InputSpec) -> list[TMeta]:
    def one(x):
        if isinstance(x, torch.Tensor):
            return TMeta(tuple(x.shape), x.dtype)
        if isinstance(x, (tuple, list, torch.Size)) and x and all(isinstance(s, numbers.Real) for s in x):
            bad = [s for s in x if not _is_size(s) or int(s) < 0]
            if bad:
                raise InputError(f"example input shape {tuple(x)} has sizes that are not non-negative integers "
                                 f"({bad[0]!r}): pass whole numbers, e.g. (1, 3, 224, 224)")
            return TMeta(tuple(int(s) for s in x), torch.float32)
        raise InputError(
            f"example input must be a tensor or a shape such as (1, 3, 224, 224), got {type(x).__name__}")

    if isinstance(example_input, (tuple, list)) and example_input and not all(
            isinstance(s, numbers.Real) for s in example_input):
        return [one(x) for x in example_input]
    return [one(example_input)]


def _check_model(model, inputs: list, example_input) -> list:
    """Wrapped models get one line saying what to pass; too few example inputs are named; a shape given for a
    half/bfloat16 model takes the model's dtype."""
    wrapped = {"ScriptModule": "the original nn.Module (before torch.jit.script/trace)",
               "RecursiveScriptModule": "the original nn.Module (before torch.jit.script/trace)",
               "OptimizedModule": "model._orig_mod (the module torch.compile wrapped)",
               "DataParallel": "model.module (the module DataParallel wraps)",
               "DistributedDataParallel": "model.module (the module DistributedDataParallel wraps)"}
    for cls in type(model).__mro__:
        if cls.__name__ in wrapped:
            raise InputError(f"{type(model).__name__} is a wrapper fxrf cannot trace through: pass "
                             f"{wrapped[cls.__name__]} instead")
    if isinstance(model, fx.GraphModule):
        required = [n.name for n in model.graph.nodes if n.op == "placeholder" and not n.args]
    else:
        try:
            params = inspect.signature(model.forward).parameters.values()
        except (TypeError, ValueError):
            params = []
        required = [p.name for p in params if p.default is inspect.Parameter.empty
                    and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(inputs) < len(required):
        raise InputError(f"{type(model).__name__}.forward takes {len(required)} inputs "
                         f"({', '.join(required)}) but {len(inputs)} example input(s) were given: pass a tuple "
                         f"with one tensor or shape per input")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    shapes_only = not isinstance(example_input, torch.Tensor) and not (
        isinstance(example_input, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in example_input))
    if shapes_only and dtype is not None and dtype != torch.float32:
        inputs = [TMeta(m.shape, dtype) if m.dtype == torch.float32 else m for m in inputs]
    return inputs


CAPTURES = ("auto", "fx", "export")
CAPTURE_KEY = "fxrf_capture"  # gm.meta[CAPTURE_KEY]: how the graph was captured, "fx" or "export"


def trace(model: nn.Module, example_input: InputSpec, *, capture: str = "auto", concrete_args: dict | None = None,
          leaf_modules: Sequence[type] = ()) -> fx.GraphModule:
    """Capture `model` as a GraphModule and annotate every node with `node.meta["tensor_meta"]`.

    capture: "fx" is torch.fx.symbolic_trace (module-level graph, no forward runs: shapes come from closed-form
    rules, so models on the meta device work); "export" is torch.export.export(strict=False) (an ATen-level graph
    of whatever Python the forward runs: control flow on shapes, iteration over tensors; `export` runs the forward
    on fake tensors); "auto" tries fx, then export, and records which it used in
    `gm.meta["fxrf_capture"]`. The returned GraphModule shares parameters with `model`; `model` itself is not
    modified. A GraphModule is taken as it is and only gets shapes.

    >>> import torch.nn as nn
    >>> gm = trace(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU()), (1, 3, 32, 32))
    >>> [tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op != "output"], gm.meta["fxrf_capture"]
    ([(1, 3, 32, 32), (1, 8, 15, 15), (1, 8, 15, 15)], 'fx')
    """
    return trace_with_values(model, example_input, capture=capture, concrete_args=concrete_args,
                             leaf_modules=leaf_modules)[0]


def trace_with_values(model, example_input, *, capture="auto", concrete_args=None, leaf_modules=(), rules=None):
    """`trace`, also returning the abstract value of every node and the module table (for the analysis)."""
    if not isinstance(model, nn.Module):
        raise InputError(f"fxrf works on torch.nn.Module objects, got {type(model).__name__}: pass the model "
                         f"instance (e.g. torchvision.models.resnet50()), not its class or output")
    if capture not in CAPTURES:
        raise InputError(f"capture={capture!r} is not one of {', '.join(CAPTURES)}")
    inputs = _check_model(model, _as_shapes(example_input), example_input)
    if isinstance(model, fx.GraphModule):
        return _with_values(model, inputs, rules, model.meta.get(CAPTURE_KEY, "fx"))
    if capture == "export":
        return _with_values(_export(model, example_input, inputs), inputs, rules, "export")
    try:
        return _with_values(_symbolic_trace(model, concrete_args, leaf_modules), inputs, rules, "fx")
    except (TraceError, AnalysisError) as e:  # the fx graph could not be built or given shapes
        if capture == "fx":
            raise
        try:
            return _with_values(_export(model, example_input, inputs), inputs, rules, "export")
        except TraceError as e2:
            raise TraceError(f"{e} -- torch.export could not capture it either: {e2}") from e2


def keep_modes(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give each of `new`'s modules the training flag of `old`'s module at the same path, or of the nearest enclosing
    one `old` has (the root: `old`'s own), so a pass's result is in its input model's mode. Needed because
    fx.GraphModule(old, graph) makes each container on a called module's path (`layer1`, `layer1.0`) a fresh
    nn.Module, in training mode whatever `old`'s was, and torch.export's GraphModule is in training mode throughout
    (its ATen calls carry the mode instead). A batch norm with running statistics keeps its own flag: a lifted one
    has its ATen call's, which is what the graph computes (without running statistics both modes compute the same
    batch statistics, so such a norm takes `old`'s flag like any other module)."""
    mine = dict(old.named_modules())
    for path, m in new.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            continue
        parts = path.split(".") if path else []
        while ".".join(parts) not in mine:
            parts.pop()
        m.training = mine[".".join(parts)].training
    return new


def _with_values(gm: fx.GraphModule, inputs: list, rules, how: str):
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) > len(placeholders):
        raise InputError(f"{gm.__class__.__name__} takes {len(placeholders)} input(s), got {len(inputs)} example "
                         f"inputs")
    modules = dict(gm.named_modules())
    exported = how == "export" and all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")
    env = _values_from_export(gm, inputs, modules, rules) if exported else propagate(gm, inputs, modules, rules)
    annotate(gm, env)
    gm.meta[CAPTURE_KEY] = how
    return gm, env, modules


def _export(model: nn.Module, example_input, inputs: list) -> fx.GraphModule:
    """torch.export.export(strict=False) of `model`, as a plain GraphModule whose forward takes and returns
    tensors as the model's does (ATen ops; module paths in each node's nn_module_stack)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    given = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    args = tuple(t if isinstance(t, torch.Tensor) else torch.zeros(m.shape, dtype=m.dtype, device=device)
                 for t, m in zip(given if all(isinstance(t, torch.Tensor) for t in given) else inputs, inputs))
    try:
        ep = torch.export.export(model, args, strict=False)
    except Exception as e:
        raise TraceError(f"cannot capture {type(model).__name__} with torch.export (strict=False): "
                         f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}. "
                         f"To proceed: make the forward exportable (torch.export's docs list the fixes for this "
                         f"error) or trace it with torch.fx and pass the GraphModule") from e
    gm = ep.module()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    in_spec, out_spec = ep.call_spec.in_spec, ep.call_spec.out_spec
    flat_inputs = in_spec is None or in_spec.num_leaves == len(args)
    if flat_inputs and out_spec is not None and out_spec.is_leaf():  # tensors in, one tensor out: plain code
        gm.graph._codegen = fx.graph.CodeGen()
        out.args = (out.args[0][0],)
        gm = fx.GraphModule(gm, gm.graph, type(model).__name__)
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        gm.graph.erase_node(node)  # export's check of the example's input shapes: fxrf's records assume them too,
    gm.graph.eliminate_dead_code()  # and the check is a closure that cannot be saved or copied with the graph
    gm.delete_all_unused_submodules()
    gm.recompile()
    return keep_modes(gm, model)  # export's GraphModule is in training mode throughout; the model's mode, please


def _from_val(v):
    """A node's `val` (a FakeTensor, a SymInt, a tuple of them) as the values shape propagation computes."""
    if isinstance(v, torch.Tensor):
        return TMeta(tuple(int(s) for s in v.shape), v.dtype)
    if isinstance(v, torch.SymInt):
        return int(v.node.hint) if v.node.hint is not None else v
    if isinstance(v, (list, tuple)):
        return type(v)(_from_val(x) for x in v)
    return v


def _values_from_export(gm: fx.GraphModule, inputs: list, modules: dict, rules) -> dict:
    """{node: abstract value} of an exported graph, read off the `val` torch.export leaves on every node."""
    env: dict = {}
    it = iter(inputs)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(it, None) or _from_val(node.meta.get("val"))
        elif node.op == "output":
            env[node] = fx.node.map_arg(node.args[0], env.get)
        elif node.op == "get_attr":
            v = fetch_attr(gm, node.target)
            env[node] = TMeta(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v
        elif "val" in node.meta:
            env[node] = _from_val(node.meta["val"])
        else:  # a node export left without a value (a submodule call): its shape the usual way
            env[node] = evaluate(node, gm, env, modules, rules)
    return env


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
    return keep_modes(_GraphModule(tracer.root, graph, name), model)  # fresh path containers: the model's mode


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
