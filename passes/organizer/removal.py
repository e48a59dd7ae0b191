"""Removing a conv: whether its gain can justify it (an exact field), whether the graph stays valid without it
(the unit to erase: conv, norm, activation), and the erasure itself."""
from __future__ import annotations

import torch.fx as fx

from fxrf.analysis import Analysis

from ..surgery import erase_chain
from .budget import round_ms
from .result import Change

__all__ = ["inexact_gain", "removal_plan", "remove"]

_WEIGHT_KINDS = ("conv", "linear")  # fxrf.cost kinds that hold a layer's weights (ends of a branch)


def inexact_gain(a: Analysis, r, cutoff: float) -> str | None:
    """Why the gain of conv `r` (<= cutoff) cannot justify removing it, or None when it can.

    A node without an exact rule gets the conservative field (it sees everything its inputs see), which makes every
    conv after it in the stage look saturated; and a gate's global context can saturate a field the local path
    has not (NodeRecord.local_gain). Either way gain <= cutoff says nothing about the conv itself."""
    stage = a.stages[r.stage] if r.stage is not None else None
    starts = set(stage.inputs) if stage is not None else set()
    unsupported = {name: target for name, target, _ in a.unsupported}
    nodes = a._nodes
    seen, todo = set(), list(nodes[r.name].all_input_nodes)
    while todo:  # the conv's ancestors inside its stage (stage inputs are references: nothing before them counts)
        n = todo.pop()
        if n.name in seen or n.name in starts:
            continue
        seen.add(n.name)
        rec = a.get(n.name)
        if rec is not None and rec.name == n.name and rec.stage != r.stage:
            continue
        if n.name in unsupported:
            return (f"kept: its gain {r.gain:.4f} rests on the conservative field of {n.name} ({unsupported[n.name]}, "
                    f"no exact receptive-field rule) earlier in stage {r.stage}, not on an exact field; register a "
                    f"rule for that op (docs/architecture.md, 'Recipe: add an op') to let the organizer judge it")
        todo += n.all_input_nodes
    if r.local_gain is not None and r.gain <= cutoff < r.local_gain:
        return (f"kept: its gain {r.gain:.4f} rests on gate-induced saturation (a squeeze-excite gate or global "
                f"context earlier in stage {r.stage}); through the local path its gain is {r.local_gain:.4f}")
    return None


def remove(gm: fx.GraphModule, plan, r, costs: dict, *, why: str, time_s: float | None = None) -> Change:
    """Erase the planned unit (conv, norm, activation; `r` the conv's record); its consumers read the unit's input
    instead. costs: the analysis' costs, for what the unit held."""
    unit, src = plan
    names = tuple(n.name for n in unit)
    erase_chain(gm, unit, src)
    return Change("remove", r.stage, r.name, r.gain, why + "; changes the function (retrain)", names, src.name,
                  -sum(costs[n].params for n in names if n in costs), -sum(costs[n].macs for n in names if n in costs),
                  time_ms=None if time_s is None else round_ms(time_s))


def removal_plan(gm: fx.GraphModule, a: Analysis, name: str):
    """(nodes to erase: the conv, its norm and activation; the node their consumers read instead), or why not."""
    nodes = {n.name: n for n in gm.graph.nodes}
    conv = nodes[name]
    kinds = {k: c.kind for k, c in a.costs.items()}
    src = conv.args[0] if conv.args else None
    if not isinstance(src, fx.Node):
        return "its input is not a graph value"
    if len(conv.users) != 1:
        return f"its output has {len(conv.users)} consumers"
    unit = [conv]
    while len(unit[-1].users) == 1:  # the conv's own norm and activation go with it
        u = next(iter(unit[-1].users))
        data = [m for m in u.all_input_nodes if m.op != "get_attr"]
        if kinds.get(u.name) not in ("norm", "activation") or data != [unit[-1]]:
            break
        unit.append(u)
        if kinds[u.name] == "activation":
            break
    shape_in, shape_out = a.record(src.name).shape, a.record(unit[-1].name).shape
    if shape_in != shape_out:
        if len(shape_in) > 1 and len(shape_out) > 1 and shape_in[1] != shape_out[1]:
            return f"it changes the width ({shape_in[1]} -> {shape_out[1]} channels)"
        return f"it changes the shape {tuple(shape_in)} -> {tuple(shape_out)}"
    merge = _branch_merge(unit, src, kinds)
    if merge is not None:
        return f"it is the only conv of a branch that merges at {merge.name} (residual or parallel branch)"
    return unit, src


def _branch_merge(unit, src, kinds):
    """The merge node (add, cat, mul, ...) for which `unit` is the only weight layer on one of its branches."""
    def is_weight(n):
        return kinds.get(n.name) in _WEIGHT_KINDS

    before = set()  # weight-free ancestors of the unit's input: where a branch that skips only this conv can fork
    todo = [src]
    while todo:
        n = todo.pop()
        if n in before:
            continue
        before.add(n)
        if not is_weight(n):
            todo += n.all_input_nodes
    after, merges, todo = set(unit), [], list(unit[-1].users)  # weight-free descendants, and the merges there
    while todo:
        n = todo.pop()
        if n in after or is_weight(n) or n.op == "output":
            continue
        after.add(n)
        if len([m for m in n.all_input_nodes if m.op != "get_attr"]) > 1:
            merges.append(n)
        todo += list(n.users)
    for m in merges:
        for other in m.all_input_nodes:
            if other in after or other.op == "get_attr":
                continue
            seen, todo = set(), [other]  # does `other` reach back to the fork without passing through us?
            while todo:
                n = todo.pop()
                if n in before:
                    return m
                if n not in seen and n not in after:
                    seen.add(n)
                    todo += n.all_input_nodes
    return None
