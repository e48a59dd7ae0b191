"""fxrf as a torch.compile backend: analyse every graph dynamo captures, apply the passes asked for, hand the
graph to inductor.

    torch.compile(model, backend="fxrf")                      # registered on `import fxrf` and as an entry point
    torch.compile(model, backend="fxrf", options={"inner": "eager", "passes": [my_pass], "alpha": 3.0})
    torch.compile(model, backend=fxrf.backend.make_backend(inner="aot_eager"))
    fxrf.compile(model, x, kernels="DW+PW")                   # module-level passes first, then the above

What the backend does with each graph dynamo hands it (one per graph break, plus one per recompilation):

1. analysis: the graph is copied, each placeholder that dynamo lifted from a parameter or buffer becomes a
   `get_attr` constant again (named by its module path, `layer1.0.conv1.weight`), and `fxrf.analysis.analyze_graph`
   runs on the copy -- the same rules, stages and costs as `fxrf.analyze` on the module; the graph that is compiled
   is never touched by it. Shapes come from the example inputs dynamo passes (real tensors) or, where those are
   fake or symbolic, from their FakeTensor metadata (size hints for symbolic sizes); no forward runs.
2. the report: a `GraphReport` per graph (its index within the call -- graph 0 runs up to the first graph break --,
   dynamo's compile id, the frame, why the graph ended, the Analysis), logged at INFO on `logging.getLogger("fxrf")`
   and kept: `reports()` lists every report since `clear_reports()`, `last_report()` those of the latest call.
3. passes: each `pass(gm, example_inputs) -> GraphModule` (or a PassResult) in the order given. They work on
   dynamo's graph, where parameters are graph inputs: a pass must keep the placeholders as they are and compute
   the same function at inference. Built in: `roll_as_cat` (exact; what `fxrf.compile` applies by default).
4. the inner backend: inductor (`compile_fx`, with `mode=` and `options["inductor"]` as its config), or any
   other registered backend ("eager", "aot_eager", ...), or a callable.

Receptive fields are per graph: a graph that starts after a graph break sees its input as a new stage input, so
its fields do not continue those of the graph before it (`fxrf.analyze` on the module gives the whole picture).

>>> import torch, torch.nn as nn
>>> torch._dynamo.reset(); clear_reports()
>>> m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
>>> out = torch.compile(m, backend=make_backend(inner="eager"))(torch.randn(1, 3, 16, 16))
>>> [(r.graph, [(c.rf.height, c.rf.channel) for c in r.analysis.convs()]) for r in last_report()]
[(0, [(3, 3), (5, 3)])]
>>> last_report()[0].params == sum(p.numel() for p in m.parameters())
True
"""
from __future__ import annotations

import importlib
import logging
import operator
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .analysis import Analysis, analyze_graph
from .metric import DEFAULT_ALPHA

__all__ = ["BACKEND_NAME", "DEFAULT_GRAPH_PASSES", "GraphReport", "FxrfBackend", "make_backend", "fxrf_backend",
           "compile_model", "CompileInfo", "analyze_dynamo_graph", "explain", "Explanation", "register_pass",
           "roll_as_cat", "reports", "last_report", "clear_reports"]

BACKEND_NAME = "fxrf"
log = logging.getLogger("fxrf")

_RESUME_PREFIX = "torch_dynamo_resume_in_"  # dynamo's name for the code that runs after a graph break


# --------------------------------------------------------------------------------------------------- the report


@dataclass
class GraphReport:
    """What the backend saw and did for one graph dynamo handed it."""

    graph: int  # index within its call: 0 = up to the first graph break, 1 = after it, ...
    call: int  # index of the call (compile session) this graph belongs to, see `last_report`
    compile_id: str | None  # dynamo's "frame/recompile", e.g. "0/0", "1/0"
    frame: str | None  # the code dynamo traced: "forward", "torch_dynamo_resume_in_forward_at_42", ...
    location: str | None  # file:line where that code starts
    graph_break: str | None  # None when the graph ends at a return; else why dynamo broke it, and where
    analysis: Analysis | None  # of the graph as dynamo handed it (None if the analysis failed or was off)
    after_passes: Analysis | None  # of the graph after the passes (None without passes)
    passes: tuple  # names of the passes applied, in order
    inner: str  # the backend the graph was handed to
    params: int  # parameters the graph reads (lifted graph inputs and attributes), each tensor once
    macs: int  # conv/linear/matmul multiply-accumulates of one call of the graph at the example input's shape
    seconds: float  # time spent in the analysis
    error: str | None = None  # why the analysis failed, if it did (compilation goes on without it)

    def summary(self) -> str:
        where = f" [{self.frame} @ {self.location}]" if self.frame else ""
        head = f"fxrf: graph {self.graph} (call {self.call}, compile {self.compile_id}){where}"
        if self.analysis is None:
            body = f"not analysed ({self.error})" if self.error else "not analysed"
        else:
            a = self.analysis
            body = (f"{len(a.convs())} convs in {len(a.stages)} stages, params {self.params:,}, MACs {self.macs:,}"
                    f", analysed in {self.seconds * 1e3:.1f} ms"
                    + (f", {len(a.unsupported)} ops analysed conservatively" if a.unsupported else ""))
        tail = f"; passes: {', '.join(self.passes)}" if self.passes else ""
        ends = f"; ends at a graph break: {self.graph_break}" if self.graph_break else ""
        return f"{head}: {body}{tail}; inner backend {self.inner}{ends}"

    def to_dict(self) -> dict:
        return {"graph": self.graph, "call": self.call, "compile_id": self.compile_id, "frame": self.frame,
                "location": self.location, "graph_break": self.graph_break, "passes": list(self.passes),
                "inner": self.inner, "params": self.params, "macs": self.macs, "seconds": self.seconds,
                "error": self.error, "analysis": None if self.analysis is None else self.analysis.to_dict(),
                "after_passes": None if self.after_passes is None else self.after_passes.to_dict()}


class _Log:
    """The reports since `clear_reports()`, grouped into calls (one top-level compiled call and its resumes); the
    latest KEEP calls are kept (each report holds an Analysis, shapes only)."""

    KEEP = 64

    def __init__(self):
        self.calls: list[list[GraphReport]] = []
        self.frames: list[set] = []  # per call: the (file, name, line) of the code objects compiled in it
        self.count = 0  # calls started since clear_reports(), dropped ones included

    def place(self, frame_key) -> tuple[int, int, list]:
        """(call index, graph index, the call's report list) for a graph compiled from `frame_key` (None: unknown)."""
        if not self.calls or not self._continues(frame_key):
            self.calls.append([])
            self.frames.append(set())
            self.count += 1
            del self.calls[:-self.KEEP], self.frames[:-self.KEEP]
        if frame_key is not None:
            self.frames[-1].add(frame_key)
        return self.count - 1, len(self.calls[-1]), self.calls[-1]

    def _continues(self, frame_key) -> bool:
        """A resume function continues the call in progress, and so does any code compiled while a frame of that
        call is still running (a graph break inside a submodule's forward compiles that forward next)."""
        if frame_key is None:
            return True
        if frame_key[1].startswith(_RESUME_PREFIX):
            return True
        known = self.frames[-1] - {frame_key}  # a recompilation of the call's first frame starts a new call
        f = sys._getframe(1)
        while f is not None:
            c = f.f_code
            if (c.co_filename, c.co_name, c.co_firstlineno) in known:
                return True
            f = f.f_back
        return False


_LOG = _Log()


def reports() -> list[GraphReport]:
    """Every GraphReport since the last `clear_reports()`, in the order the graphs were compiled."""
    return [r for call in _LOG.calls for r in call]


def last_report() -> list[GraphReport]:
    """The reports of the latest call: the graphs of one compiled call, in order (graph 0, 1, ... between breaks).

    A new call starts when dynamo compiles a frame that is neither the continuation of a graph break nor called
    from a frame of the call in progress -- a new model, or a recompilation (new shapes) of the same one."""
    return list(_LOG.calls[-1]) if _LOG.calls else []


def clear_reports() -> None:
    global _LOG
    _LOG = _Log()


# --------------------------------------------------------------------------------------- analysing dynamo's graph


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


def _hint(s) -> int:
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
        return torch.empty(tuple(_hint(s) for s in t.shape), dtype=t.dtype, device="meta")
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
                env[node] = _hint(ex) if isinstance(ex, (int, torch.SymInt)) else ex
        elif node.op == "get_attr":
            env[node] = graph.get_attr(node.target)
            obj = gm
            for p in node.target.split("."):
                obj = getattr(obj, p)
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
            obj = gm
            for p in node.target.split("."):
                obj = getattr(obj, p)
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
    return _analyze(gm, example_inputs, alpha, strict, name)[0]


def _analyze(gm, example_inputs, alpha, strict, name):
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


# ---------------------------------------------------------------------------------------------------- passes

PASSES: dict[str, Callable] = {}  # name -> pass(gm, example_inputs) -> GraphModule, for options={"passes": [name]}


def register_pass(name: str) -> Callable:
    """Make a graph pass available by name: `options={"passes": [name]}`. A second registration of a name raises."""

    def register(fn: Callable) -> Callable:
        if name in PASSES:
            raise ValueError(f"a pass named {name!r} is registered already ({PASSES[name]!r})")
        PASSES[name] = fn
        return fn

    return register


def _copy(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict]:
    """A new GraphModule over a copy of gm's graph (attributes shared, node meta copied shallowly), and the map
    from gm's nodes to the copy's."""
    graph, env = fx.Graph(), {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    return fx.GraphModule(gm, graph, type(gm).__name__), env


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
    new, env = _copy(gm)
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
    return {n: tuple(_hint(s) for s in t.shape) for n, t in zip(phs, example_inputs or ())
            if isinstance(t, torch.Tensor)}


def _shape_of(node: fx.Node, shapes: dict):
    """The shape of a node's value: dynamo's example_value / val, torch's tensor_meta, or a placeholder's example."""
    for key in ("example_value", "val", "tensor_meta"):
        v = node.meta.get(key)
        if v is not None and hasattr(v, "shape"):
            return tuple(_hint(s) for s in v.shape)
    if node in shapes:
        return shapes[node]
    if node.op in ("call_function", "call_method", "call_module") and shapes:
        try:  # a graph without meta (symbolic_trace): fxrf's own shape propagation from the example inputs
            from .shapes import TMeta, propagate
            phs = [n for n in node.graph.nodes if n.op == "placeholder"]
            env = propagate(node.graph.owning_module, [TMeta(shapes[p], torch.float32) for p in phs if p in shapes])
            v = env.get(node)
            return tuple(v.shape) if isinstance(v, TMeta) else None
        except Exception:
            return None
    return None


def _resolve_pass(p) -> tuple[str, Callable]:
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


def _run_pass(name: str, fn: Callable, gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
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


# ---------------------------------------------------------------------------------------------------- the backend

_OPTIONS = ("inner", "passes", "alpha", "strict", "analyze", "log_table", "inductor")


class FxrfBackend:
    """A dynamo backend: `backend(gm, example_inputs) -> callable`. Build one with `make_backend`."""

    def __init__(self, inner: str | Callable = "inductor", passes: Sequence = (), alpha: float = DEFAULT_ALPHA,
                 strict: bool = False, analyze: bool = True, log_table: bool = True, inductor: dict | None = None):
        self.options = {"inner": inner, "passes": tuple(passes), "alpha": alpha, "strict": strict,
                        "analyze": analyze, "log_table": log_table, "inductor": dict(inductor or {})}
        for p in passes:  # unknown names fail here, not at the first compile
            _resolve_pass(p)
        self.reports: list[GraphReport] = []  # the graphs this backend compiled

    __name__ = BACKEND_NAME  # what dynamo prints as the backend's name
    KEEP = 256  # reports kept in `self.reports` (the shared `fxrf_backend` serves every backend="fxrf")

    def __call__(self, gm: fx.GraphModule, example_inputs, *, options: dict | None = None, mode: str | None = None):
        opts = dict(self.options)
        for k, v in (options or {}).items():
            if k not in _OPTIONS:
                raise ValueError(f"unknown fxrf backend option {k!r}; the options are {', '.join(_OPTIONS)}")
            opts[k] = tuple(v) if k == "passes" else v
        passes = [_resolve_pass(p) for p in opts["passes"]]
        inner = opts["inner"]
        inner_name = inner if isinstance(inner, str) else getattr(inner, "__name__", type(inner).__name__)

        frame_key, frame, location, owner = _frame()
        call, index, call_reports = _LOG.place(frame_key)
        name = f"{owner or 'graph'}#{index}"
        reason = getattr(gm, "compile_subgraph_reason", None)
        report = GraphReport(index, call, _compile_id(gm), frame, location, _break_text(reason), None, None,
                             tuple(n for n, _ in passes), inner_name, 0, 0, 0.0)
        if opts["analyze"]:
            report.analysis, report.params, report.seconds, report.error = self._analysis(gm, example_inputs, opts,
                                                                                          name)
            if report.analysis is not None:
                report.macs = _macs(report.analysis)
        for pass_name, fn in passes:
            gm = _run_pass(pass_name, fn, gm, example_inputs)
        if passes and opts["analyze"] and report.analysis is not None:
            report.after_passes = self._analysis(gm, example_inputs, opts, name)[0]
            if report.after_passes is not None:
                report.macs = _macs(report.after_passes)
        call_reports.append(report)
        self.reports.append(report)
        del self.reports[:-self.KEEP]
        log.info("%s", report.summary())
        if opts["log_table"] and log.isEnabledFor(logging.INFO) and report.analysis is not None:
            log.info("%s", (report.after_passes or report.analysis).table())
        return _compile_inner(inner, gm, example_inputs, mode, opts["inductor"])

    def _analysis(self, gm, example_inputs, opts, name):
        t0 = time.perf_counter()
        try:
            a, params = _analyze(gm, example_inputs, opts["alpha"], opts["strict"], name)
        except Exception as e:
            if opts["strict"]:
                raise
            log.warning("fxrf: the analysis of a graph failed (compiling it anyway): %s: %s", type(e).__name__, e)
            return None, 0, time.perf_counter() - t0, f"{type(e).__name__}: {e}"
        return a, params, time.perf_counter() - t0, None


def make_backend(**options) -> FxrfBackend:
    """A backend with its own options and its own `reports` list; pass it as `torch.compile(m, backend=...)`.

    Options: inner ("inductor" | "eager" | "aot_eager" | any registered backend name | a callable), passes (a list of
    callables `(gm, example_inputs) -> GraphModule` or registered names), alpha (the gain's alpha), strict (an op
    without a rule, or a failing analysis, is an error), analyze (False: passes and compile only), log_table (the
    per-conv table at INFO), inductor (a dict of inductor config patches).
    """
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise ValueError(f"unknown fxrf backend option(s) {', '.join(sorted(unknown))}; the options are "
                         f"{', '.join(_OPTIONS)}")
    return FxrfBackend(**options)


fxrf_backend = make_backend()  # what backend="fxrf" finds (the entry point and the registration name this object)


def _frame():
    """((file, name, first line), name, 'file:line', class of its `self`) of the code dynamo is compiling."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        tx = InstructionTranslator.current_tx()
        code = tx.f_code
    except Exception:
        return None, None, None, None
    owner = None
    try:
        if "self" in tx.f_locals:
            owner = type(tx.f_locals["self"]).__name__
    except Exception:
        pass
    return ((code.co_filename, code.co_name, code.co_firstlineno), code.co_name,
            f"{code.co_filename}:{code.co_firstlineno}", owner)


def _compile_id(gm) -> str | None:
    cid = getattr(gm, "meta", {}).get("dynamo_compile_id")
    if cid is None:
        try:
            from torch._guards import CompileContext
            cid = CompileContext.current_compile_id()
        except Exception:
            cid = None
    return None if cid is None else str(cid)


def _break_text(reason) -> str | None:
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    text = str(getattr(reason, "reason", "")).strip().splitlines()
    first = text[0] if text else "graph break"
    stack = getattr(reason, "user_stack", None) or []
    where = f" at {stack[-1].filename}:{stack[-1].lineno}" if stack else ""
    return f"{first}{where}"


def _macs(a: Analysis) -> int:
    return sum(c.macs for c in a.costs.values())


def _compile_inner(inner, gm, example_inputs, mode, inductor_options):
    if inner == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx
        patches = dict(list_mode_options(mode) if mode else {})
        patches.update(inductor_options or {})
        return compile_fx(gm, example_inputs, config_patches=patches or None)
    if callable(inner):
        return inner(gm, example_inputs)
    from torch._dynamo.backends.registry import lookup_backend
    return lookup_backend(inner)(gm, example_inputs)


def _register() -> None:
    """Register `fxrf_backend` as "fxrf", unless dynamo has it already or will load it from the entry point
    (pyproject's torch_dynamo_backends): dynamo registers what it loads from there itself, and a second
    registration of a name raises."""
    from torch._dynamo.backends import registry
    if BACKEND_NAME in getattr(registry, "_COMPILER_FNS", {}):
        return
    if getattr(registry, "_BACKENDS", {}).get(BACKEND_NAME) is not None:  # the entry point is known: it loads us
        return
    registry.register_backend(fxrf_backend, name=BACKEND_NAME)


_register()


# -------------------------------------------------------------------------------------------- fxrf.compile


DEFAULT_GRAPH_PASSES = ("roll_as_cat",)  # what fxrf.compile applies to dynamo's graphs unless told otherwise


@dataclass
class CompileInfo:
    """What `compile_model` did: the module-level passes' results and the backend that holds the graph reports."""

    passes: dict = field(default_factory=dict)  # "stages" / "kernels" -> PassResult
    backend: FxrfBackend | None = None

    @property
    def reports(self) -> list[GraphReport]:
        return self.backend.reports if self.backend is not None else []


def compile_model(model: nn.Module, example_input, stages: bool | dict = False, kernels: str | None = None, *,
                  backend_options: dict | None = None, warmup: bool = False, **torch_compile_kwargs):
    """From a model to an optimised compiled model in one call: the module-level passes, then torch.compile with
    the fxrf backend. Exported as `fxrf.compile`.

    stages: False, True (organize_stages with its defaults) or a dict of organize_stages keyword arguments;
    kernels: None, "auto" or a decomposition recipe ("DW+PW", "DW+GPW-g4", "DW+RPW-g4-o50", ...) for decompose;
    backend_options: the fxrf backend's options (inner, passes, alpha, ...; passes default to
    DEFAULT_GRAPH_PASSES, the exact rewrites: roll_as_cat); warmup: run the example input once
    (no grad) so the graphs are compiled and reported before this returns; the rest goes to torch.compile
    (mode, dynamic, fullgraph, ...). The compiled module carries `.fxrf`, a CompileInfo with the passes' results
    and the graph reports.

    >>> import torch, torch.nn as nn
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    >>> c = compile_model(m, (1, 3, 16, 16), backend_options={"inner": "eager"}, warmup=True)
    >>> [len(r.analysis.convs()) for r in c.fxrf.reports]
    [1]
    """
    if "backend" in torch_compile_kwargs:
        raise ValueError("compile_model always uses the fxrf backend; give its options as backend_options "
                         "(inner='inductor' | 'eager' | 'aot_eager' | a callable)")
    info = CompileInfo()
    if stages:
        from . import organize_stages
        res = organize_stages(model, example_input, **(stages if isinstance(stages, dict) else {}))
        info.passes["stages"] = res
        model = res.graph_module
    if kernels:
        from . import decompose
        res = decompose(model, example_input, recipe=kernels)
        info.passes["kernels"] = res
        model = res.graph_module
    opts = {"passes": DEFAULT_GRAPH_PASSES, **(backend_options or {})}
    if "options" in torch_compile_kwargs:  # torch.compile(options=...) is the backend's options here too
        opts.update(torch_compile_kwargs.pop("options"))
    info.backend = make_backend(**opts)
    compiled = torch.compile(model, backend=info.backend, **torch_compile_kwargs)
    compiled.fxrf = info
    if warmup:
        x = example_input if isinstance(example_input, torch.Tensor) else _example_tensor(model, example_input)
        with torch.no_grad():
            compiled(x)
    return compiled


def _example_tensor(model: nn.Module, shape) -> torch.Tensor:
    p = next(iter(model.parameters()), None)
    return torch.randn(tuple(shape), device=p.device if p is not None else "cpu",
                       dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)


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
    return Explanation(out.graph_count, [_break_text(r) for r in out.break_reasons], analyses, out)
