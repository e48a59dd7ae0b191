"""Analysis of the graphs torch.compile's dynamo captures: parameters lifted into graph inputs, functional convs,
FakeTensor or symbolic sizes. The backend (fxrf.backend) and `explain` use it; nothing here compiles anything.

The graph is copied, each placeholder that dynamo lifted from a parameter or buffer becomes a `get_attr` constant
again (named by its module path, `layer1.0.conv1.weight`), and `fxrf.analysis.analyze_graph` runs on the copy --
the same rules, stages and costs as `fxrf.analyze` on the module; the graph given is never touched. Shapes come
from the example inputs dynamo passes (real tensors) or, where those are fake or symbolic, from their FakeTensor
metadata (size hints for symbolic sizes); no forward runs.

>>> import torch, torch.nn as nn
>>> m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
>>> e = explain(m, torch.randn(1, 3, 16, 16))
>>> e.graph_count, [(c.rf.height, c.rf.channel) for c in e.analyses[0].convs()]
(1, [(3, 3), (5, 3)])
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .analysis import Analysis, analyze_graph
from .metric import DEFAULT_ALPHA
from .shapes import fetch_attr

__all__ = ["analyze_dynamo_graph", "analyze_with_params", "explain", "Explanation", "break_text", "size_hint"]


def _param_source(source) -> str | None:
    """'parameter' or 'buffer' if a dynamo Source reads a module's parameter or buffer, else None."""
    if source is None:
        return None
    try:
        from torch._dynamo.source import ParamBufferSource, UnspecializedParamBufferSource
        kinds = (ParamBufferSource, UnspecializedParamBufferSource)
    except ImportError:  # another torch: fall back on the source's text alone
        kinds = ()
    name = source.name() if callable(getattr(source, "name", None)) else str(getattr(source, "name", source))
    s = source
    while s is not None:
        if kinds and isinstance(s, kinds):
            break
        s = getattr(s, "base", None)
    if s is None and "._parameters[" not in name and "._buffers[" not in name:
        return None
    tail = name.rsplit("._", 1)[-1]
    return "buffer" if tail.startswith("buffers[") else "parameter"


def _fqn(source, fallback: str) -> str:
    """`layer1.0.conv1.weight` from a source such as L['self']._modules['layer1']._modules['0']...['weight']."""
    name = source.name() if source is not None and callable(getattr(source, "name", None)) else ""
    parts = re.findall(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)", name)
    path = [a or b for a, b in parts if (a or b) not in ("_modules", "_parameters", "_buffers")]
    path = [re.sub(r"\W", "_", p) for p in path]
    return ".".join(path) if path else re.sub(r"\W", "_", fallback)


def size_hint(s) -> int:
    """A concrete size for an int or SymInt (its hint; no guard is added)."""
    if isinstance(s, int):
        return s
    node = getattr(s, "node", None)
    hint = getattr(node, "hint", None) if node is not None else None
    if hint is None:
        from torch.fx.experimental.symbolic_shapes import hint_int
        return hint_int(s)
    return int(hint)


def _is_fake(t) -> bool:
    try:
        from torch._subclasses.fake_tensor import is_fake
        return is_fake(t)
    except ImportError:
        return type(t).__name__ == "FakeTensor"


def _concrete(t):
    """A tensor the analysis can read: real tensors as they are, fake or symbolic ones as meta tensors."""
    if isinstance(t, torch.Tensor) and (_is_fake(t) or not all(isinstance(s, int) for s in t.shape)):
        return torch.empty(tuple(size_hint(s) for s in t.shape), dtype=t.dtype, device="meta")
    return t


def _frozen_view(gm: fx.GraphModule, example_inputs) -> tuple[fx.GraphModule, list, int]:
    """A copy of dynamo's graph for the analysis: lifted parameters and buffers as get_attr constants, symbolic
    sizes replaced by their values, dead nodes (grad-mode switches and the like) dropped.

    Returns (copy, example tensors of its remaining placeholders, parameters read)."""
    root = nn.Module()
    graph = fx.Graph()
    env: dict = {}
    inputs, seen, params = [], set(), 0
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    examples = list(example_inputs) if example_inputs is not None else [None] * len(placeholders)
    if len(examples) != len(placeholders):
        raise ValueError(f"{len(examples)} example inputs for {len(placeholders)} placeholders")
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            i = placeholders.index(node)
            ex = examples[i]
            if ex is None:  # no example given (explain): the FakeTensor dynamo recorded
                ex = node.meta.get("example_value", node.meta.get("val"))
            source = getattr(node.meta.get("grapharg"), "source", None)
            kind = _param_source(source) or ("parameter" if isinstance(ex, nn.Parameter) else None)
            if kind is not None and isinstance(ex, torch.Tensor):
                path = _unique_path(root, _fqn(source, node.name))
                t = _concrete(ex).detach()
                _set_path(root, path, nn.Parameter(t, requires_grad=False) if kind == "parameter" else t, kind)
                if kind == "parameter" and id(ex) not in seen:
                    seen.add(id(ex))
                    params += ex.numel()
                env[node] = graph.get_attr(path)
            elif isinstance(ex, torch.Tensor):
                env[node] = graph.placeholder(node.target)
                env[node].meta = dict(node.meta)
                inputs.append(_concrete(ex))
            else:  # a size (SymInt or int) or another Python value: a literal in the copy
                env[node] = size_hint(ex) if isinstance(ex, (int, torch.SymInt)) else ex
        elif node.op == "get_attr":
            env[node] = graph.get_attr(node.target)
            obj = fetch_attr(gm, node.target)
            if isinstance(obj, nn.Parameter) and id(obj) not in seen:
                seen.add(id(obj))
                params += obj.numel()
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    _drop_dead(graph)
    for name, mod in gm.named_children():  # call_module targets (dynamo graphs built without inlining)
        if not hasattr(root, name):
            root.add_module(name, mod)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not _has_path(root, node.target):
            obj = fetch_attr(gm, node.target)
            _set_path(root, node.target, obj, "parameter" if isinstance(obj, nn.Parameter) else "buffer")
    for mod in gm.modules():
        if isinstance(mod, nn.Module) and mod is not gm:
            for p in mod.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    params += p.numel()
    return fx.GraphModule(root, graph, type(gm).__name__), inputs, params


def _drop_dead(graph: fx.Graph) -> None:
    """Remove nodes nobody uses (the analysis never runs them: no grad-mode switch or profiler call fires)."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op not in ("placeholder", "output", "get_attr") and not node.users:
                graph.erase_node(node)
                changed = True


def _has_path(root: nn.Module, path: str) -> bool:
    obj = root
    for p in path.split("."):
        if not hasattr(obj, p):
            return False
        obj = getattr(obj, p)
    return True


def _unique_path(root: nn.Module, path: str) -> str:
    p, k = path, 1
    while _has_path(root, p):
        p, k = f"{path}_{k}", k + 1
    return p


def _set_path(root: nn.Module, path: str, value, kind: str) -> None:
    *owners, name = path.split(".")
    mod = root
    for o in owners:
        if not hasattr(mod, o):
            mod.add_module(o, nn.Module())
        mod = getattr(mod, o)
        if not isinstance(mod, nn.Module):
            raise ValueError(f"cannot place constant {path!r}: {o!r} is not a module")
    if kind == "parameter" and isinstance(value, nn.Parameter):
        mod.register_parameter(name, value)
    else:
        mod.register_buffer(name, value)


def analyze_dynamo_graph(gm: fx.GraphModule, example_inputs: Sequence | None = None, *,
                         alpha: float = DEFAULT_ALPHA, strict: bool = False, name: str | None = None) -> Analysis:
    """The Analysis of a graph as dynamo captures it (parameters lifted into graph inputs, functional convs).

    `example_inputs`: what dynamo passed the backend (one per placeholder), or None to use the FakeTensor metadata
    dynamo left on the placeholders (e.g. the graphs of `torch._dynamo.explain`). `gm` is not modified.
    """
    return analyze_with_params(gm, example_inputs, alpha=alpha, strict=strict, name=name)[0]


def analyze_with_params(gm: fx.GraphModule, example_inputs: Sequence | None = None, *,
                        alpha: float = DEFAULT_ALPHA, strict: bool = False,
                        name: str | None = None) -> tuple[Analysis, int]:
    """`analyze_dynamo_graph` and the number of parameters the graph reads (lifted inputs and attributes, each
    tensor once): what the backend reports per graph."""
    view, inputs, params = _frozen_view(gm, example_inputs)
    with torch.no_grad():  # restores the grad mode whatever the graph's ops do
        a = analyze_graph(view, inputs, alpha=alpha, strict=strict, name=name or type(gm).__name__)
    _to_meta(view, gm)  # the records are made: keep shapes only, so a report never holds the model's weights alive
    return a, params


def _to_meta(view: fx.GraphModule, gm: fx.GraphModule) -> None:
    """Swap the view's get_attr constants for meta tensors, leaving any module it shares with `gm` alone."""
    shared = {id(m) for m in gm.modules()}
    for node in view.graph.nodes:
        if node.op != "get_attr":
            continue
        owner_path, _, name = node.target.rpartition(".")
        owner = view.get_submodule(owner_path) if owner_path else view
        if id(owner) in shared:
            continue
        for table in (owner._parameters, owner._buffers):
            v = table.get(name)
            if isinstance(v, torch.Tensor) and not v.is_meta:
                meta = torch.empty_like(v, device="meta")
                table[name] = nn.Parameter(meta, requires_grad=False) if isinstance(v, nn.Parameter) else meta


def break_text(reason) -> str | None:
    """'why at file:line' for a graph that dynamo ended at a graph break (a GraphCompileReason), else None."""
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    text = str(getattr(reason, "reason", "")).strip().splitlines()
    first = text[0] if text else "graph break"
    stack = getattr(reason, "user_stack", None) or []
    where = f" at {stack[-1].filename}:{stack[-1].lineno}" if stack else ""
    return f"{first}{where}"


# ------------------------------------------------------------------------------------------------------- explain


@dataclass
class Explanation:
    """torch._dynamo.explain's graphs and graph-break reasons, each graph with its fxrf Analysis."""

    graph_count: int
    break_reasons: list  # "reason at file:line", one per graph break
    analyses: list  # Analysis (or the error text) per graph, in order
    dynamo: Any  # torch._dynamo's ExplainOutput

    def __str__(self) -> str:
        lines = [f"{self.graph_count} graph(s), {len(self.break_reasons)} graph break(s)"]
        for i, a in enumerate(self.analyses):
            what = a if isinstance(a, str) else f"{len(a.convs())} convs in {len(a.stages)} stages"
            lines.append(f"  graph {i}: {what}")
            if i < len(self.break_reasons):
                lines.append(f"  -- break: {self.break_reasons[i]}")
        return "\n".join(lines)


def explain(model: Callable, *args, alpha: float = DEFAULT_ALPHA, **kwargs) -> Explanation:
    """Where dynamo breaks `model(*args, **kwargs)` into graphs, and the analysis of each graph (from dynamo's
    FakeTensor metadata: nothing is compiled). Calls torch._dynamo.explain, which resets dynamo first."""
    out = torch._dynamo.explain(model)(*args, **kwargs)
    analyses = []
    for g in out.graphs:
        try:
            analyses.append(analyze_dynamo_graph(g, None, alpha=alpha))
        except Exception as e:
            analyses.append(f"not analysed: {type(e).__name__}: {e}")
    return Explanation(out.graph_count, [break_text(r) for r in out.break_reasons], analyses, out)
