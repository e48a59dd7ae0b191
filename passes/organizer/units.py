"""The unit the organizer inserts (an identity conv, a pass-through norm, the activation repeated), written into a
graph, and the candidates scored: one per stage, all in one trial graph, analysed once."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from ..surgery import add_modules, free_prefix, insert_after
from ..util import identity_norm
from .context import Run
from .sites import Site

__all__ = ["PLACES", "insert_unit", "score"]

PLACES = {"end": "after the stage's last block", "branch": "inside the stage's last block, before its last conv"}


def insert_unit(gm: fx.GraphModule, site: Site, *, meta: bool = False) -> list:
    """Insert conv (+norm) (+act) after `site.point` under a new `stage{i}_extra{k}`; its consumers read the new
    unit. Returns the new nodes (meta: the modules on the meta device, to score without weights)."""
    prefix = free_prefix(gm, f"stage{site.stage}_extra")
    modules = _unit_modules(site, meta)
    add_modules(gm, prefix, modules, training=site.training)
    calls = [("call_module", f"{prefix}.{name}", (), {}) for name in modules]
    if site.act is not None and site.act.module is None:  # a functional activation: the same call again
        calls.append((site.act.op, site.act.target, site.act.args, site.act.kwargs))
    point = next(n for n in gm.graph.nodes if n.name == site.point)
    return insert_after(gm, point, calls)


def _unit_modules(site: Site, meta: bool) -> dict:
    """The new modules: a Dirac (identity) conv, a pass-through batch norm, a copy of the activation."""
    device = torch.device("meta") if meta else site.device
    conv = site.conv(device)
    with torch.no_grad():
        nn.init.dirac_(conv.weight)
        if conv.bias is not None:
            conv.bias.zero_()
    out = {"conv": conv}
    if site.norm is not None:  # eval: (x - 0) / sqrt((1 - eps) + eps) * 1 + 0 == x
        out["norm"] = identity_norm(site.norm, site.width, dims=site.dims, device=device, dtype=site.dtype)
    if site.act is not None and site.act.module is not None:
        out["act"] = copy.deepcopy(site.act.module)
    for m in out.values():
        m.train(site.training)
    return out


def score(run: Run, gm: fx.GraphModule, sites: dict, place: str) -> list:
    """One candidate conv per stage (`sites`: {stage: Site}), all in one copy of the graph (stages are
    independent: each stage's fields are referenced to its own input), analysed once:
    [(gain, MACs, stage, place, params)]."""
    if not sites:
        return []
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}), type_expr=None)
    trial = fx.GraphModule(gm, graph)  # shares the modules; the candidates' modules live on the meta device
    units = {s: insert_unit(trial, site, meta=True) for s, site in sites.items()}
    t = run.analyze(trial)
    costs = t.costs
    rows = []
    for s, nodes in units.items():
        mine = [costs[n.name] for n in nodes if n.name in costs]
        rows.append((t.record(nodes[0].name).gain, sum(c.macs for c in mine), s, place, sum(c.params for c in mine)))
    return rows
