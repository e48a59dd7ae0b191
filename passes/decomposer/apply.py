"""A plan ({conv node: recipe}) made real: the surgery that puts each block in its conv's place (`_apply`), then the
whole build of one result (`_build`: fold the inserted permutations, analyse the new graph, check every stage,
price the blocks, summarise)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch.fx as fx
import torch.nn as nn

from fxrf.analysis import analyze
from fxrf.cost import total

from .. import finish
from ..blocks import Recipe, build, emit, load
from ..fold import fold_in_place
from .options import Run
from .records import KEEP, Declined, Decomposition, Site
from .verdict import _change, _moved, _stage_reports, stage_quality


@dataclass(frozen=True)
class _Replaced:
    """A conv `_apply` replaced, before the analysis of the result gives its BlockChange."""

    site: Site
    recipe: Recipe
    conv: nn.Conv2d  # the original module
    output: str  # the block's last node
    shift: int
    error: float | None  # transfer error (None without transfer)


@dataclass
class _Applied:
    replaced: list = field(default_factory=list)  # _Replaced, graph order
    declined: list = field(default_factory=list)  # Declined
    renamed: dict = field(default_factory=dict)  # conv node -> the node standing for its output
    permutations: list = field(default_factory=list)  # inserted roll / shuffle nodes


def _apply(run: Run, gm: fx.GraphModule, plan: dict, *, transfer: bool) -> _Applied:
    """Edit `gm` (a private copy of the original graph) in place: each planned site's conv becomes its block
    (sites not in `plan` keep their conv). transfer: initialise each block from its conv (transfer.py)."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    out = _Applied()
    grouped_before: set = set()  # stages that already have a rotated (DW+RPW) layer
    for site in run.sites:
        recipe = plan.get(site.node, KEEP)
        if recipe.keeps:
            continue
        conv = gm.get_submodule(site.target)
        reason = recipe.inapplicable(conv)
        if reason:
            out.declined.append(Declined(site.node, recipe.name, reason))
            continue
        shift = 0
        if recipe.kind.rotates:
            shift = recipe.shift(conv) if site.stage in grouped_before else 0
            grouped_before.add(site.stage)
        block, program = build(recipe, conv, run.pattern, shift)
        error = load(block, recipe, conv) if transfer else None
        node = nodes[site.node]
        parent, _, leaf = site.target.rpartition(".")
        (gm.get_submodule(parent) if parent else gm).add_module(leaf, block)  # the Block takes the conv's place
        with graph.inserting_before(node):
            new = emit(graph, site.target, program, node.args[0])
        node.replace_all_uses_with(new[-1])
        graph.erase_node(node)
        out.renamed[site.node] = new[-1].name
        out.permutations += [n.name for n, (op, arg) in zip(new, program) if op == "roll" or arg == "shuffle"]
        out.replaced.append(_Replaced(site, recipe, conv, new[-1].name, shift, error))
    return out


def _build(run: Run, gm: fx.GraphModule, plan: dict, tried: dict) -> Decomposition:
    """Apply `plan` to `gm` (a private copy, edited in place), fold, check every stage, and report (`tried`: the
    auto search's log per stage)."""
    applied = _apply(run, gm, plan, transfer=run.transfer_weights)
    priced = _priced(run, applied) if run.latency is not None else None
    finish(gm)
    folds, fold_summary = [], {"permutations": 0, "folded": 0, "remaining": 0, "remaining_nodes": []}
    if run.fold and applied.permutations:
        inputs = {n.name: n.args[0].name for n in gm.graph.nodes if n.name in applied.permutations}
        folded = fold_in_place(gm, run.example_input, nodes=set(applied.permutations))
        gm, folds, fold_summary = folded.graph_module, folded.changes, folded.summary
        gone = {c.node for c in folds}
        for conv, out in list(applied.renamed.items()):
            while out in gone:  # a folded shuffle was the block's last node: its input stands for it now
                out = inputs[out]
            applied.renamed[conv] = out
    else:
        fold_summary["remaining"] = fold_summary["permutations"] = len(applied.permutations)
        fold_summary["remaining_nodes"] = list(applied.permutations)
    after = analyze(gm, run.example_input)
    changes = [_change(run, d, after, applied.renamed) for d in applied.replaced]
    checks = stage_quality(run.before, run.ends, after, applied.renamed, moved=_moved(applied, run.pattern))
    stages = _stage_reports(run, after, changes, checks, tried=tried)
    cb, ca = run.cost_before, total(after.costs)
    rewritten = [s for s in stages if any(b != "S" for b in s.blocks)]
    summary = {
        "recipe": run.options.name, "params_before": cb.params, "params_after": ca.params, "macs_before": cb.macs,
        "macs_after": ca.macs, "replaced": len(changes), "declined": len(applied.declined),
        "quality": all(s.quality for s in rewritten), "compact": all(s.compact for s in rewritten),
        "permutations_inserted": len(applied.permutations), "permutations_folded": fold_summary["folded"],
        "permutations_remaining": fold_summary["remaining"], "remaining_permutations": fold_summary["remaining_nodes"],
        "stages": [asdict(s) for s in stages], "declined_convs": [asdict(d) for d in applied.declined],
        "selection": run.selection.describe(), "objective": run.objective, "latency": priced,
    }
    return Decomposition(gm, changes, summary, declined=list(applied.declined), analysis=after, folds=list(folds),
                         stages=stages)


def _priced(run: Run, applied: _Applied) -> dict:
    """What the latency model says of the blocks placed: per replaced conv its time and the block's, totals, and
    `sites_ms`, the sum of the times of every eligible conv (kept or replaced)."""
    latency, pattern, sites_ms = run.latency, run.pattern, run.sites_ms  # (sites_ms first: the timing order)
    rows = []
    for d in applied.replaced:
        t_conv = latency.time(KEEP, d.conv, d.site.in_shape, pattern)
        t_block = latency.time(d.recipe, d.conv, d.site.in_shape, pattern, d.shift)
        rows.append({"conv": d.site.node, "recipe": d.recipe.name, "shift": d.shift, "conv_ms": t_conv * 1e3,
                     "block_ms": t_block * 1e3})
    return {"model": repr(latency), "device": latency.key, "batch": latency.batch, "mode": latency.mode,
            "sites": rows, "conv_ms": sum(r["conv_ms"] for r in rows), "block_ms": sum(r["block_ms"] for r in rows),
            "saved_ms": sum(r["conv_ms"] - r["block_ms"] for r in rows), "sites_ms": sites_ms}
