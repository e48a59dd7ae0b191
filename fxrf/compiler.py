"""`fxrf.compile`: from a model to an optimised compiled model in one call -- the module-level passes
(`fxrf.optimize`: the organizer, then the decomposer) on the nn.Module, then torch.compile with the fxrf backend
(fxrf.backend), whose graph passes default to `DEFAULT_GRAPH_PASSES`.

This layer sits above the passes and the backend: it may import both (the backend itself only runs graph passes).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .backend import FxrfBackend, GraphReport, make_backend
from .progress import progress

__all__ = ["compile_model", "CompileInfo", "DEFAULT_GRAPH_PASSES"]

DEFAULT_GRAPH_PASSES = ("roll_as_cat",)  # what fxrf.compile applies to dynamo's graphs unless told otherwise


@dataclass
class CompileInfo:
    """What `compile_model` did: the module-level passes' results and the backend that holds the graph reports."""

    passes: dict = field(default_factory=dict)  # "stages" / "kernels" -> PassResult
    result: object = None  # the passes.pipeline.OptimizeResult (None: no module-level pass asked for)
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
    if stages or kernels:
        from .passes.pipeline import optimize
        res = optimize(model, example_input, stages=stages or None, kernels=kernels, keep_class=False)
        info.passes, info.result, model = dict(res.steps), res, res.graph_module
    opts = {"passes": DEFAULT_GRAPH_PASSES, **(backend_options or {})}
    if "options" in torch_compile_kwargs:  # torch.compile(options=...) is the backend's options here too
        opts.update(torch_compile_kwargs.pop("options"))
    info.backend = make_backend(**opts)
    compiled = torch.compile(model, backend=_announced(info.backend), **torch_compile_kwargs)
    compiled.fxrf = info
    if warmup:
        x = example_input if isinstance(example_input, torch.Tensor) else _example_tensor(model, example_input)
        with torch.no_grad():
            compiled(x)
    return compiled


def _announced(backend: FxrfBackend):
    """`backend` with a line on stderr before and after each graph it compiles: the first call compiles, which
    takes seconds to minutes (fxrf.progress: shown under FXRF_PROGRESS=1 or progress.show(), else quiet)."""
    def compile_graph(gm, example_inputs, **kwargs):  # kwargs: torch.compile's mode / options, passed on
        with progress(f"fxrf.compile: compiling a graph of {len(gm.graph.nodes)} nodes (the first call)",
                      announce=True):
            return backend(gm, example_inputs, **kwargs)
    return compile_graph


def _example_tensor(model: nn.Module, shape) -> torch.Tensor:
    p = next(iter(model.parameters()), None)
    return torch.randn(tuple(shape), device=p.device if p is not None else "cpu",
                       dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)
