"""fxrf.passes: the rewrite passes.

Every pass takes a model (an nn.Module or a GraphModule) and an example input, and returns a `PassResult` whose
`graph_module` is a new, runnable GraphModule; the input model is never modified (its parameters, buffers and
graph are deep-copied first). Passes re-run the analysis on what they build instead of patching records.
`pipeline.optimize` (`fxrf.optimize`) runs them in order.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import torch.fx as fx
import torch.nn as nn


@dataclass
class PassResult:
    """One shape for every pass's result."""

    graph_module: fx.GraphModule
    changes: list = field(default_factory=list)  # pass-specific records (dataclasses), in the order applied
    summary: dict = field(default_factory=dict)  # totals: params/MACs before and after, counts, ...
    declined: list = field(default_factory=list)  # what the pass considered and did not do, with the reason
    analysis: Any = field(default=None, repr=False)  # fxrf.analyze of graph_module (an Analysis)

    def to_dict(self) -> dict:
        return {"changes": [asdict(c) if is_dataclass(c) else c for c in self.changes], "summary": self.summary}


def private_copy(model: nn.Module, example_input: Any, **trace_kwargs) -> fx.GraphModule:
    """A traced GraphModule that shares nothing with `model` (passes edit this copy, never the user's model)."""
    from fxrf.trace import trace

    from .util import copy_graph_module, keep_modes
    gm = model if isinstance(model, fx.GraphModule) else trace(model, example_input, **trace_kwargs)
    if gm.meta.get("fxrf_capture") != "export":  # (the copy in the model's mode: the modules a pass inserts copy it)
        return keep_modes(copy_graph_module(gm, params="copy"), model)
    from .lift import lift_modules  # an ATen graph: its convs, norms and linears become modules the passes edit
    lifted = keep_modes(lift_modules(copy_graph_module(gm, params="copy")), model)
    lifted.meta["fxrf_capture"] = "export"
    return lifted


def shared_copy(gm: fx.GraphModule, class_name: str | None = None) -> tuple[fx.GraphModule, dict]:
    """A new GraphModule over a copy of gm's graph that shares gm's submodules, parameters and buffers (node meta
    copied shallowly), and the map from gm's nodes to the copy's nodes. For rewrites of a graph whose parameters
    must stay the caller's (torch.compile's graphs); `private_copy` is the one that shares nothing."""
    graph, env = fx.Graph(), {}
    # the code generator too: an exported graph's (_PyTreeCodeGen) rebuilds the model's output structure (a
    # ModelOutput, a dict) from the flat outputs; a fresh Graph's plain one would return the bare leaves
    graph.set_codegen(copy.deepcopy(gm.graph._codegen))
    graph.output(graph.graph_copy(gm.graph, env))
    from .util import keep_modes  # (containers fx.GraphModule makes afresh would be in training mode)
    return keep_modes(fx.GraphModule(gm, graph, class_name or type(gm).__name__), gm), env


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    """Lint, drop dead code and regenerate the Python code of an edited GraphModule. A statement that writes into
    a tensor in place (`z.add_(y)`, `relu_`, `operator.iadd`, a module with inplace=True) is kept even when its
    result is unused: later readers of z see what it wrote."""
    from fxrf.analysis import mutates
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or mutates(n))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
