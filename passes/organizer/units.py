"""The unit the organizer inserts (an identity conv, a pass-through norm, the activation repeated), written into a
graph, and the candidates scored: one per stage, all in one trial graph, analysed once."""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx._lazy_graph_module import _LazyGraphModule

from fxrf.analysis import Analysis, extend
from fxrf.cost import node_cost
from fxrf.ops import default_table

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


def score(run: Run, gm: fx.GraphModule, sites: dict, place: str, a: Analysis | None = None) -> list:
    """One candidate conv per stage (`sites`: {stage: Site}), all in one copy of the graph (stages are
    independent: each stage's fields are referenced to its own input): [(gain, MACs, stage, place, params)].

    a: the analysis of `gm`. Each candidate's records then follow from its point's fields there
    (`fxrf.analysis.extend`: a conv and its norm and activation, not a walk of the whole model); without it, or
    where extend cannot vouch for its result, the trial graph is analysed whole (the same records)."""
    if not sites:
        return []
    known, keys = {}, {}
    if a is not None and run.incremental and a._walk is not None:
        for s, site in sites.items():  # a candidate whose point holds the Field it held, in the same stage: its
            keys[s] = (_key(site, place), _point(a, site))  # gain follows from that field: the row it had
            hit = run.scored.get(keys[s][0])
            if hit is not None and hit[0][0] is keys[s][1][0] and hit[0][1] == keys[s][1][1]:
                known[s] = hit[1]
    rows = _score(run, gm, {s: x for s, x in sites.items() if s not in known}, place, a)
    for row in rows:
        if row[2] in keys:
            run.scored[keys[row[2]][0]] = (keys[row[2]][1], row)
    rows = {row[2]: row for row in rows} | known
    return [rows[s] for s in sites]


def _point(a: Analysis, site: Site) -> tuple:
    """(the Field of the site's point referenced to its stage's input, that Stage): all a candidate's gain reads."""
    r = a.get(site.point)
    node = a._walk._by_name.get(site.point)
    return a._walk.envs[1].get(node), (a.stages[r.stage] if r is not None and r.stage is not None else None)


def _key(site: Site, place: str) -> tuple:
    """A candidate as score sees it: the site (its activation by what it calls: a new Activation every round)."""
    act = site.act
    return (place, dataclasses.replace(site, act=None),
            None if act is None else (act.op, act.target, repr(act.args), repr(act.kwargs), act.module))


def _score(run: Run, gm: fx.GraphModule, sites: dict, place: str, a: Analysis | None) -> list:
    if not sites:
        return []
    records = None
    if a is not None and run.incremental:  # the candidates alone, after their points: extend needs no more
        trial, units = _candidates(gm, sites)
        records = {s: extend(a, trial, nodes) for s, nodes in units.items()}
    if records is None or any(r is None for r in records.values()):
        graph = fx.Graph()
        graph.output(graph.graph_copy(gm.graph, {}), type_expr=None)
        # shares the modules; the candidates' modules live on the meta device; lazy: no code generated, none is run
        trial = _LazyGraphModule(gm, graph)
        units = {s: insert_unit(trial, site, meta=True) for s, site in sites.items()}
        t = run.analyze(trial)
        records = {s: {n.name: t.get(n.name) for n in nodes} for s, nodes in units.items()}
        costs = t.costs
    else:
        costs = _costs(trial, [n for nodes in units.values() for n in nodes])
    rows = []
    for s, nodes in units.items():
        mine = [costs[n.name] for n in nodes if n.name in costs]
        rows.append((records[s][nodes[0].name].gain, sum(c.macs for c in mine), s, place,
                     sum(c.params for c in mine)))
    return rows


def _candidates(gm: fx.GraphModule, sites: dict) -> tuple[fx.GraphModule, dict]:
    """A graph of the candidates alone: per site, its point (a placeholder of the point's name and meta, shapes
    included) and the unit after it; and {stage: the unit's nodes}. Copying the whole graph for each round of
    trials cost more than the trials themselves."""
    points = {n.name: n for n in gm.graph.nodes}
    graph = fx.Graph()
    trial = _LazyGraphModule(nn.Module(), graph)
    units = {}
    for s, site in sites.items():
        ph = graph.create_node("placeholder", site.point, name=site.point)
        ph.meta = dict(points[site.point].meta)
        units[s] = insert_unit(trial, site, meta=True)
    graph.output(None)
    return trial, units


def _costs(trial: fx.GraphModule, nodes: list) -> dict:
    """fxrf.cost.model_cost(trial) of the candidates' nodes alone: each reads only the one before, and its
    parameters are its own new module's, so no other node can own them (model_cost counts a tensor once)."""
    table = default_table()
    params = {n.name: sum(p.numel() for p in trial.get_submodule(n.target).parameters())
              if n.op == "call_module" else 0 for n in nodes}
    costs = {n.name: node_cost(trial, n, table, params) for n in nodes}
    return {name: c for name, c in costs.items() if c is not None}
