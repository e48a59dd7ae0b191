"""fxrf as a torch.compile backend: analyse every graph dynamo captures, apply the passes asked for, hand the
graph to inductor.

    torch.compile(model, backend="fxrf")                      # registered on `import fxrf` and as an entry point
    torch.compile(model, backend="fxrf", options={"inner": "eager", "passes": [my_pass], "alpha": 3.0})
    torch.compile(model, backend=fxrf.backend.make_backend(inner="aot_eager"))
    fxrf.compile(model, x, kernels="DW+PW")                   # module-level passes, then the above (fxrf.compiler)

What the backend does with each graph dynamo hands it (one per graph break, plus one per recompilation):

1. analysis (`fxrf.dynamo`): the graph is copied, each placeholder that dynamo lifted from a parameter or buffer
   becomes a `get_attr` constant again (named by its module path, `layer1.0.conv1.weight`), and
   `fxrf.analysis.analyze_graph` runs on the copy -- the same rules, stages and costs as `fxrf.analyze` on the
   module; the graph that is compiled is never touched by it. Shapes come from the example inputs dynamo passes
   (real tensors) or, where those are fake or symbolic, from their FakeTensor metadata (size hints for symbolic
   sizes); no forward runs.
2. the report: a `GraphReport` per graph (its index within the call -- graph 0 runs up to the first graph break --,
   dynamo's compile id, the frame, why the graph ended, the Analysis), logged at INFO on `logging.getLogger("fxrf")`
   and kept: `reports()` lists every report since `clear_reports()`, `last_report()` those of the latest call.
3. passes (`fxrf.passes.graph_passes`): each `pass(gm, example_inputs) -> GraphModule` (or a PassResult) in the
   order given. They work on dynamo's graph, where parameters are graph inputs: a pass must keep the placeholders
   as they are and compute the same function at inference. Built in: `roll_as_cat` (exact; what `fxrf.compile`
   applies by default).
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

import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch.fx as fx

from .analysis import Analysis
from .dynamo import Explanation, analyze_dynamo_graph, analyze_with_params, break_text, explain  # noqa: F401
from .metric import DEFAULT_ALPHA
from .passes.graph_passes import PASSES, register_pass, resolve_pass, roll_as_cat, run_pass  # noqa: F401

__all__ = ["BACKEND_NAME", "GraphReport", "FxrfBackend", "make_backend", "fxrf_backend", "analyze_dynamo_graph",
           "explain", "Explanation", "register_pass", "roll_as_cat", "reports", "last_report", "clear_reports"]

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


# ---------------------------------------------------------------------------------------------------- the backend

_OPTIONS = ("inner", "passes", "alpha", "strict", "analyze", "log_table", "inductor")


class FxrfBackend:
    """A dynamo backend: `backend(gm, example_inputs) -> callable`. Build one with `make_backend`."""

    def __init__(self, inner: str | Callable = "inductor", passes: Sequence = (), alpha: float = DEFAULT_ALPHA,
                 strict: bool = False, analyze: bool = True, log_table: bool = True, inductor: dict | None = None):
        self.options = {"inner": inner, "passes": tuple(passes), "alpha": alpha, "strict": strict,
                        "analyze": analyze, "log_table": log_table, "inductor": dict(inductor or {})}
        for p in passes:  # unknown names fail here, not at the first compile
            resolve_pass(p)
        self.reports: list[GraphReport] = []  # the graphs this backend compiled

    __name__ = BACKEND_NAME  # what dynamo prints as the backend's name
    KEEP = 256  # reports kept in `self.reports` (the shared `fxrf_backend` serves every backend="fxrf")

    def __call__(self, gm: fx.GraphModule, example_inputs, *, options: dict | None = None, mode: str | None = None):
        opts = dict(self.options)
        for k, v in (options or {}).items():
            if k not in _OPTIONS:
                raise ValueError(f"unknown fxrf backend option {k!r}; the options are {', '.join(_OPTIONS)}")
            opts[k] = tuple(v) if k == "passes" else v
        passes = [resolve_pass(p) for p in opts["passes"]]
        inner = opts["inner"]
        inner_name = inner if isinstance(inner, str) else getattr(inner, "__name__", type(inner).__name__)

        frame_key, frame, location, owner = _frame()
        call, index, call_reports = _LOG.place(frame_key)
        name = f"{owner or 'graph'}#{index}"
        reason = getattr(gm, "compile_subgraph_reason", None)
        report = GraphReport(index, call, _compile_id(gm), frame, location, break_text(reason), None, None,
                             tuple(n for n, _ in passes), inner_name, 0, 0, 0.0)
        if opts["analyze"]:
            report.analysis, report.params, report.seconds, report.error = self._analysis(gm, example_inputs, opts,
                                                                                          name)
            if report.analysis is not None:
                report.macs = _macs(report.analysis)
        for pass_name, fn in passes:
            gm = run_pass(pass_name, fn, gm, example_inputs)
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
            a, params = analyze_with_params(gm, example_inputs, alpha=opts["alpha"], strict=opts["strict"],
                                            name=name)
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

