"""The graph passes the fxrf torch.compile backend runs on dynamo's graphs, and their registry.

A graph pass is `pass(gm, example_inputs) -> GraphModule` (or a PassResult): it works on the graph dynamo hands the
backend, where parameters are graph inputs, so it must keep the placeholders as they are and compute the same
function at inference. Unlike the module-level passes beside it (organizer, decomposer), which deep-copy the model,
`roll_as_cat` edits a copy of the graph that shares the caller's parameters (`fxrf.passes.shared_copy`): what a
graph pass returns is compiled in place of the graph, so it must keep reading the model's own weights.

    torch.compile(model, backend="fxrf", options={"passes": ["roll_as_cat", my_pass, "pkg.mod:fn"]})

Built in: `roll_as_cat` (exact; what `fxrf.compile` applies by default). `register_pass(name)` adds one by name.
"""
from __future__ import annotations

import importlib
import operator
from typing import Callable

import torch
import torch.fx as fx

from fxrf.dynamo import size_hint
from fxrf.shapes import TMeta, propagate

from . import shared_copy

__all__ = ["PASSES", "register_pass", "resolve_pass", "run_pass", "roll_as_cat"]

PASSES: dict[str, Callable] = {}  # name -> pass(gm, example_inputs) -> GraphModule, for options={"passes": [name]}


def register_pass(name: str) -> Callable:
    """Make a graph pass available by name: `options={"passes": [name]}`. A second registration of a name raises."""

    def register(fn: Callable) -> Callable:
        if name in PASSES:
            raise ValueError(f"a pass named {name!r} is registered already ({PASSES[name]!r})")
        PASSES[name] = fn
        return fn

    return register


def _roll_args(node: fx.Node):
    """(input, shift, dim) of a torch.roll / Tensor.roll along one dim by a constant shift, else None."""
    if not ((node.op == "call_function" and node.target is torch.roll) or
            (node.op == "call_method" and node.target == "roll")):
        return None
    names = ("input", "shifts", "dims")
    args = dict(zip(names, node.args), **node.kwargs)
    shift, dim = args.get("shifts"), args.get("dims")
    shift = shift[0] if isinstance(shift, (tuple, list)) and len(shift) == 1 else shift
    dim = dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim
    if not isinstance(shift, int) or not isinstance(dim, int) or not isinstance(args.get("input"), fx.Node):
        return None
    return args["input"], shift, dim


@register_pass("roll_as_cat")
def roll_as_cat(gm: fx.GraphModule, example_inputs=None) -> fx.GraphModule:
    """torch.roll(x, s, d) -> torch.cat([x[.., C-k:], x[.., :C-k]], d), k = s mod C: the same values.

    Why: inductor lowers a roll to a pointwise kernel that indexes `(c + k) % C` along the axis, which its CPU
    code generator does not vectorise (the innermost axis in channels-last); two slices and a cat are contiguous
    copies it does vectorise. The DW+RPW blocks' channel rotations that fxrf.passes.fold cannot fold (between two
    grouped convs) cost next to nothing this way. Exact, so safe for training as well as inference.

    >>> import torch, torch.fx as fx
    >>> gm = fx.symbolic_trace(lambda x: torch.roll(x, -3, 1))
    >>> out = roll_as_cat(gm, [torch.randn(2, 8, 4, 4)])
    >>> [n.target.__name__ for n in out.graph.nodes if n.op == "call_function"]
    ['getitem', 'getitem', 'cat']
    >>> x = torch.randn(2, 8, 4, 4); torch.equal(out(x), torch.roll(x, -3, 1))
    True
    """
    new, env = shared_copy(gm)  # the caller's parameters: this graph is what gets compiled
    graph = new.graph
    done = 0
    shapes = _placeholder_shapes(gm, example_inputs)
    for old in list(gm.graph.nodes):
        node = env.get(old)
        parsed = None if node is None else _roll_args(node)
        if parsed is None:
            continue
        x, shift, dim = parsed
        shape = _shape_of(old.args[0] if old.args else old.kwargs["input"], shapes)
        if shape is None or not -len(shape) <= dim < len(shape):
            continue  # no shape known for its input: leave it
        size = int(shape[dim])
        k = shift % size if size else 0
        if k == 0:
            node.replace_all_uses_with(x)
            graph.erase_node(node)
            done += 1
            continue
        lead = (slice(None),) * (dim % len(shape))
        with graph.inserting_before(node):
            tail = graph.call_function(operator.getitem, (x, lead + (slice(size - k, None),)))
            head = graph.call_function(operator.getitem, (x, lead + (slice(None, size - k),)))
            cat = graph.call_function(torch.cat, ([tail, head], dim))
        cat.meta = dict(node.meta)
        node.replace_all_uses_with(cat)
        graph.erase_node(node)
        done += 1
    graph.lint()
    new.recompile()
    new.meta["fxrf_roll_as_cat"] = done  # how many rolls were rewritten
    return new


def _placeholder_shapes(gm: fx.GraphModule, example_inputs) -> dict:
    """{placeholder node: shape} from the example inputs (dynamo graphs also carry FakeTensors in node.meta)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {n: tuple(size_hint(s) for s in t.shape) for n, t in zip(phs, example_inputs or ())
            if isinstance(t, torch.Tensor)}


def _shape_of(node: fx.Node, shapes: dict):
    """The shape of a node's value: dynamo's example_value / val, torch's tensor_meta, or a placeholder's example."""
    for key in ("example_value", "val", "tensor_meta"):
        v = node.meta.get(key)
        if v is not None and hasattr(v, "shape"):
            return tuple(size_hint(s) for s in v.shape)
    if node in shapes:
        return shapes[node]
    if node.op in ("call_function", "call_method", "call_module") and shapes:
        try:  # a graph without meta (symbolic_trace): fxrf's own shape propagation from the example inputs
            phs = [n for n in node.graph.nodes if n.op == "placeholder"]
            env = propagate(node.graph.owning_module, [TMeta(shapes[p], torch.float32) for p in phs if p in shapes])
            v = env.get(node)
            return tuple(v.shape) if isinstance(v, TMeta) else None
        except Exception:
            return None
    return None


def resolve_pass(p) -> tuple[str, Callable]:
    """(name, function) of a pass given as a callable, a registered name or 'package.module:function'."""
    if callable(p):
        return getattr(p, "__name__", type(p).__name__), p
    if isinstance(p, str) and p in PASSES:
        return p, PASSES[p]
    if isinstance(p, str) and ":" in p:  # "package.module:function"
        mod, _, attr = p.partition(":")
        return p, getattr(importlib.import_module(mod), attr)
    raise ValueError(f"unknown pass {p!r}: give a callable (gm, example_inputs) -> GraphModule, a name registered "
                     f"with fxrf.backend.register_pass ({', '.join(sorted(PASSES)) or 'none yet'}), or "
                     f"'module:function'")


def run_pass(name: str, fn: Callable, gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    """Apply one pass to a dynamo graph: its GraphModule (a PassResult is unwrapped), which must keep the inputs."""
    before = [n.target for n in gm.graph.nodes if n.op == "placeholder"]  # before: a pass may edit gm in place
    out = fn(gm, example_inputs)
    out = getattr(out, "graph_module", out)  # a PassResult
    if not isinstance(out, fx.GraphModule):
        raise TypeError(f"pass {name} returned {type(out).__name__}; a pass returns a GraphModule (or a PassResult)")
    after = [n.target for n in out.graph.nodes if n.op == "placeholder"]
    if len(before) != len(after):
        raise ValueError(f"pass {name} changed the graph's inputs ({len(before)} placeholders -> {len(after)}); "
                         f"under torch.compile a pass must keep dynamo's placeholders (parameters are graph inputs)")
    return out
