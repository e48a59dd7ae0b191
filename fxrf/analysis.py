"""The analysis pass: stages, then one walk over the graph that applies the rules and writes one record per node.

Three steps, each linear in the number of nodes and independent of the input resolution:
1. shapes (fxrf.shapes) and the fields referenced to the model input (which also tell where the spatial axes of
   every tensor are);
2. stages: a node whose map has another spatial size than its inputs starts one; the maps of one resolution
   connected to each other form one stage, whose input is the union of the channels of all its starting nodes;
3. fields referenced to the stage input, the paper's 3DRF, and the gain of every conv.

The records live in fxrf.records, the walk in fxrf.walk, stages in fxrf.stages, in-place writes in fxrf.inplace;
this module keeps the entry points and re-exports what callers import from it.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from .checks import check_number  # noqa: F401  (the passes' option checks; re-exported)
from .inplace import Version, inplace_versions, mutates  # noqa: F401  (re-exported)
from .metric import DEFAULT_ALPHA
from .naming import module_path  # noqa: F401  (re-exported)
from .ops import OpTable, TMeta
from .records import META_KEY, RF, Analysis, NodeRecord, Stage, map_size, path_of  # noqa: F401  (re-exported)
from .shapes import fetch_attr
from .trace import CAPTURE_KEY, InputSpec, _as_shapes, annotate, trace_with_values
from .walk import _Walker, extend, reanalyze  # noqa: F401  (re-exported)


def analyze(model: nn.Module, example_input: InputSpec, *, alpha: float = DEFAULT_ALPHA, strict: bool = False,
            concrete_args: dict | None = None, leaf_modules=(), spatial_cap: bool = True,
            rules: OpTable | None = None, capture: str = "auto") -> Analysis:
    """Trace `model` (unless it is a GraphModule already) and annotate every node with its 3DRF.

    capture: how to get the graph, "auto" (torch.fx, then torch.export if fx cannot), "fx" or "export" (see
    `fxrf.trace`); `Analysis.capture` says which was used. rules: an op table to use instead of the default
    (`fxrf.DEFAULT_OPS + mine` to override some ops for this call only).

    spatial_cap: True (default) reports the poster's 3DRF^w_k = min(3DRF^w_{k-1} + w_k - 1, w_0), measured
    exactly at the centre neuron (what autograd checks); False reports the uncapped extent of the stack
    (3DRF^w_{k-1} + (w_k - 1) * D_k, which may exceed w_0) and computes volumes and gains from it, as the paper's
    Tables 3-5 do (docs/paper.md). Channel fields are the same either way.

    >>> import torch.nn as nn
    >>> a = analyze(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)), (1, 3, 32, 32))
    >>> [(r.name, r.rf.height, r.rf.channel, r.rf.volume) for r in a.convs()]
    [('_0', 3, 3, 27), ('_1', 5, 3, 75)]
    >>> round(a.record("_1").gain, 4)
    1.7315
    >>> a = analyze(nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)]), (1, 8, 4, 4),
    ...             spatial_cap=False)
    >>> [r.rf.height for r in a.convs()]   # 3, 5, 7 on a 4x4 map (capped: 3, 4, 4)
    [3, 5, 7]
    """
    check_number("alpha", alpha)
    gm, shapes, modules = trace_with_values(model, example_input, concrete_args=concrete_args,
                                            leaf_modules=leaf_modules, rules=rules, capture=capture)
    inputs = _as_shapes(example_input)
    walker = _Walker(gm, shapes, inputs, modules, alpha, strict, rules)
    walker.spatial_cap = spatial_cap
    return walker.run(type(model).__name__)


def analyze_graph(gm: fx.GraphModule, example_inputs, *, constant_inputs=(), alpha: float = DEFAULT_ALPHA,
                  strict: bool = False, name: str | None = None, spatial_cap: bool = True,
                  rules: OpTable | None = None) -> Analysis:
    """Analyse a GraphModule given one example tensor (or shape) per placeholder (spatial_cap: as `analyze`).

    Placeholders at the positions in `constant_inputs` hold parameters or buffers (as torch.compile lifts them
    into graph inputs) and are treated like `get_attr` constants: they see nothing of the model input.
    """
    check_number("alpha", alpha)
    constant_inputs = set(constant_inputs)
    metas = [TMeta(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor)
             else t if isinstance(t, (int, float, torch.SymInt)) else _as_shapes(t)[0]  # sizes pass as values
             for t in example_inputs]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = {placeholders[i].name: example_inputs[i] for i in constant_inputs
              if isinstance(example_inputs[i], torch.Tensor)}
    modules = dict(gm.named_modules())
    from .shapes import propagate
    from .trace import annotate
    shapes = propagate(gm, metas, modules, rules)
    annotate(gm, shapes)
    inputs = [m for i, m in enumerate(metas) if i not in constant_inputs and isinstance(m, TMeta)] or \
        [m for m in metas if isinstance(m, TMeta)]
    walker = _Walker(gm, shapes, inputs, modules, alpha, strict, rules)
    walker.constants = values
    walker.constant_names = {placeholders[i].name for i in constant_inputs}
    walker.spatial_cap = spatial_cap
    return walker.run(name or type(gm).__name__)


def rebind(a: Analysis, gm: fx.GraphModule, name: str | None = None) -> Analysis | None:
    """`a` as the analysis of `gm`, a copy of `a.graph_module`'s graph over the same module objects (unchanged
    since `a` was made), without walking it again: the same stages and records, written onto `gm`'s nodes (with
    their shapes) as `analyze(gm)` writes them; `name`: the model name (default: gm's class name). None where the
    two graphs differ in any node, target, argument or module, or were captured differently."""
    old = a.graph_module
    if a._walk is None or old.meta.get(CAPTURE_KEY, "fx") != gm.meta.get(CAPTURE_KEY, "fx"):
        return None
    mine, theirs = list(gm.graph.nodes), list(old.graph.nodes)
    if len(mine) != len(theirs):
        return None
    for n, o in zip(mine, theirs):
        if (n.op, n.name, n.target, repr(n.args), repr(n.kwargs)) != (o.op, o.name, o.target, repr(o.args),
                                                                     repr(o.kwargs)):
            return None
        if n.op in ("call_module", "get_attr") and fetch_attr(gm, n.target) is not fetch_attr(old, n.target):
            return None
    shapes = {n.name: v for n, v in a._walk.shapes.items() if isinstance(n, fx.Node)}
    annotate(gm, {n: shapes[n.name] for n in mine if n.name in shapes})
    gm.meta[CAPTURE_KEY] = old.meta.get(CAPTURE_KEY, "fx")
    by_name = {r.name: r for r in a.records}
    for n in mine:
        if n.name in by_name:
            n.meta[META_KEY] = by_name[n.name]
    return Analysis(gm, name or type(gm).__name__, a.input_shape, a.alpha, a.stages, a.records, a.unsupported,
                    a.spatial_cap, a.warnings)
