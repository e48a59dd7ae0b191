"""fxrf.passes: the rewrite passes.

Every pass takes a model (an nn.Module or a GraphModule) and an example input, and returns a `PassResult` whose
`graph_module` is a new, runnable GraphModule; the input model is never modified (its parameters, buffers and
graph are deep-copied first). Passes re-run the analysis on what they build instead of patching records.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import torch.fx as fx
import torch.nn as nn


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    changes: list = field(default_factory=list)  # pass-specific records (dataclasses), in the order applied
    summary: dict = field(default_factory=dict)  # totals: params/MACs before and after, counts, ...

    def to_dict(self) -> dict:
        return {"changes": [asdict(c) if is_dataclass(c) else c for c in self.changes], "summary": self.summary}


def private_copy(model: nn.Module, example_input: Any, **trace_kwargs) -> fx.GraphModule:
    """A traced GraphModule that shares nothing with `model` (passes edit this copy, never the user's model)."""
    from fxrf.trace import trace
    gm = model if isinstance(model, fx.GraphModule) else trace(model, example_input, **trace_kwargs)
    gm = copy.deepcopy(gm)
    if type(gm).__mro__[1] is not fx.GraphModule:  # fxrf.trace's lazily compiled kind: results get a plain one,
        gm = fx.GraphModule(gm, gm.graph, gm.__class__.__name__)  # which every torch version saves and loads
    return gm


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    """Lint, drop dead code and regenerate the Python code of an edited GraphModule."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
