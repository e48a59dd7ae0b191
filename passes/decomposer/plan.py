"""Which convs may change (`eligible_sites`) and, for recipe="auto", what each becomes (`_search`): per stage, the
best assignment whose blocks are compact and whose stage meets quality, "best" being what the objective ranks by
(MACs then params, or the stage's measured time)."""
from __future__ import annotations

from typing import NamedTuple

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxrf.analysis import Analysis, analyze
from fxrf.progress import bar

from .. import finish
from ..blocks import measure
from ..blocks import cost as block_cost
from ..util import call_counts, copy_graph_module, module_of
from .apply import _apply
from .options import Run
from .records import CLOSE, KEEP, Site, Trial
from .verdict import _moved, stage_quality


def eligible_sites(gm: fx.GraphModule, a: Analysis, skip_first: bool = True) -> list[Site]:
    """Standard k x k convs (nn.Conv2d, one group, called once with one input) inside a stage, graph order."""
    modules = dict(gm.named_modules())
    calls = call_counts(gm)
    convs = [n for n in gm.graph.nodes if _is_conv(n, modules)]
    starts = {name for s in a.stages for name in s.inputs}
    sites = []
    for node in convs:
        mod = module_of(node, modules)
        if skip_first and node is convs[0]:
            continue
        if not isinstance(mod, nn.Conv2d) or mod.groups != 1 or tuple(mod.kernel_size) == (1, 1):
            continue
        if calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
            continue
        rec = a.record(node.name)
        if rec.stage is None:
            continue
        shape = tuple(node.args[0].meta["tensor_meta"].shape)
        sites.append(Site(node.name, node.target, rec.stage, shape, node.name in starts))
    return sites


def _is_conv(node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(module_of(node, modules), nn.modules.conv._ConvNd)
    return node.op == "call_function" and node.target in (F.conv1d, F.conv2d, F.conv3d)


class _Assignment(NamedTuple):
    label: str
    recipes: tuple  # a Recipe per eligible conv of the stage, graph order


def _assignments(recipes, n: int) -> list[_Assignment]:
    """A stage's candidates: every recipe throughout; and every grouped recipe closed by one DW+PW block (its
    dense pointwise completes the channel field in one step) or opened by one (a strided first conv must reach its
    own 3DRF alone, see the package doc)."""
    out = [_Assignment("S", (KEEP,) * n)]
    for r in recipes:
        out.append(_Assignment(r.name, (r,) * n))
        if n >= 2 and r.groups > 1:
            out.append(_Assignment(f"{r.name} + DW+PW", (r,) * (n - 1) + (CLOSE,)))
            out.append(_Assignment(f"DW+PW + {r.name}", (CLOSE,) + (r,) * (n - 1)))
    return out


class _Stage(NamedTuple):
    """One stage's share of the search."""

    index: int
    sites: tuple  # its eligible convs, graph order
    convs: tuple  # their modules
    assignments: list  # _assignments for that many convs


class _Option(NamedTuple):
    """An assignment as the objective ranks it."""

    rank: tuple  # sorted ascending; the last item is the position in the candidate list (the tie-break)
    label: str
    used: tuple  # the recipes, KEEP where one cannot apply (or, for latency, is slower than the conv)
    macs: int
    params: int
    time_ms: float | None  # objective="latency": the stage's predicted time
    scope: tuple  # (key, plan): what the quality check applies, and the cache key of its verdicts
    pending: tuple = ()  # objective="latency": (recipe, conv, site, shift) of the blocks whose time in `rank` is
    #                      only a lower bound (LatencyModel.bound): to be timed before this option can be checked


def _usable(assignment: _Assignment, stage: _Stage) -> list:
    return [r if not r.inapplicable(c) else KEEP for r, c in zip(assignment.recipes, stage.convs)]


def _cost(run: Run, stage: _Stage, used) -> tuple[int, int]:
    cs = [block_cost(u, c, s.in_shape, run.pattern) for u, c, s in zip(used, stage.convs, stage.sites)]
    return sum(c.macs for c in cs), sum(c.params for c in cs)


def _search(run: Run, gm: fx.GraphModule, objective: str) -> tuple[dict, dict]:
    """(plan, tried): per stage, the first assignment in the objective's order whose blocks are compact and whose
    stage meets quality (a Trial logged per assignment tried). Quality is read from one analysis of the model with
    an option's `scope` applied, on a copy whose parameters live on the meta device, once per scope and only when a
    stage's search reaches it. objective="latency": a block with a channel permutation (rotated, shuffled) not
    timed yet is ranked by a lower bound of its time (`LatencyModel.bound`) and timed only when an assignment
    using it comes first: the options are then ranked again, so the first one checked is the first by measured
    time, as if everything had been timed."""
    stages = _stages(run)
    labels = _label_plans(stages) if objective == "macs" else None
    quality = _quality(run, gm)
    if objective != "latency":
        return _stage_loop(run, stages, objective, labels, quality)
    lm = run.latency
    # a bar on stderr (fxrf.progress), its block timings counted in it ("timed"); the sites each stage is about
    # to time are compiled ahead, all at once (`LatencyModel.prefetch`)
    with lm.ahead():
        steps = bar(stages, f"latency search ({lm.mode}, {lm.device}, batch {lm.batch})", unit="stages")
        return _stage_loop(run, steps, objective, labels, quality)


def _stage_loop(run: Run, steps, objective: str, labels, quality) -> tuple[dict, dict]:
    plan, tried, lm = {}, {}, run.latency
    for stage in steps:
        log, checked = [], set()

        def verdict(o: _Option, stage=stage) -> bool | None:
            """None: a block is not compact; else whether the stage meets quality (cached per scope)."""
            if not all(measure(u, c, s.in_shape, run.pattern).compact
                       for u, c, s in zip(o.used, stage.convs, stage.sites) if not u.keeps):
                return None
            return True if all(u.keeps for u in o.used) else quality(*o.scope)[stage.index]
        ahead = objective == "latency" and lm.compiles_ahead
        if ahead:
            lm.prefetch(_needed(stage, run.pattern), run.pattern, bounds=True)
        while True:
            options = _timed(run, stage) if objective == "latency" else _costed(run, stage, labels)
            chosen, again = None, False
            ranked = sorted(options, key=lambda o: o.rank)
            for i, o in enumerate(ranked):
                if o.pending:  # its rank is a lower bound: time what it needs, then rank again
                    # the contenders, compiled ahead at once: every option ranked before the next exact one not
                    # yet refused waits for its blocks in turn, unless the timings put that exact one first (then
                    # some of these compiles were spent for nothing)
                    if ahead:  # (finding the next exact option runs quality checks: only when it serves)
                        exact = next((j for j in range(i, len(ranked)) if not ranked[j].pending
                                      and ranked[j].scope[0] not in checked and verdict(ranked[j])), len(ranked))
                        lm.prefetch([(r, c, s.in_shape, sh) for q in ranked[i:exact] for r, c, s, sh in q.pending],
                                    run.pattern)
                    for recipe, conv, site, shift in o.pending:
                        lm.time(recipe, conv, site.in_shape, run.pattern, shift)
                    again = True
                    break
                if o.scope[0] in checked:
                    continue
                checked.add(o.scope[0])
                ok = verdict(o)
                log.append(Trial(o.label, o.macs, o.params, ok, ok is not None, o.time_ms))
                if ok:
                    chosen = o
                    break
            if not again:
                break
        if chosen is not None:
            plan.update({s.node: u for s, u in zip(stage.sites, chosen.used)})
        tried[stage.index] = tuple(log)
    return plan, tried


def _needed(stage: _Stage, pattern) -> list:
    """(recipe, conv, in_shape, shift) of what `_timed` times for `stage` before it can rank: each site's conv,
    and every compact block of every assignment (rotated as `_apply` would emit it, if the blocks before it are
    kept). An estimate for `LatencyModel.prefetch` (which blocks are kept depends on the timings): what it
    misses is compiled when it is timed."""
    out = [(KEEP, c, s.in_shape, 0) for c, s in zip(stage.convs, stage.sites)]
    for assignment in stage.assignments:
        used = _usable(assignment, stage)
        if any(not u.keeps and not measure(u, c, s.in_shape, pattern).compact
               for u, c, s in zip(used, stage.convs, stage.sites)):
            continue
        rotated = False
        for u, c, s in zip(used, stage.convs, stage.sites):
            if not u.keeps:
                out.append((u, c, s.in_shape, u.shift(c) if rotated else 0))
                rotated = rotated or u.kind.rotates
    return out


def _stages(run: Run) -> list[_Stage]:
    """The eligible convs grouped by stage (stages in the order their first conv comes), with their candidates."""
    by_stage: dict = {}
    for s in run.sites:
        by_stage.setdefault(s.stage, []).append(s)
    return [_Stage(i, tuple(ss), tuple(run.convs[s.node] for s in ss), _assignments(run.options.candidates, len(ss)))
            for i, ss in by_stage.items()]


def _quality(run: Run, gm: fx.GraphModule):
    """quality(key, plan) -> {stage: meets quality} with `plan` applied to a meta copy of `gm`, once per key."""
    verdicts: dict = {}

    def quality(key, plan: dict) -> dict:
        if key not in verdicts:
            skel = copy_graph_module(gm, params="meta")
            applied = _apply(run, skel, plan, transfer=False)
            finish(skel)
            checks = stage_quality(run.before, run.ends, analyze(skel, run.example_input), applied.renamed,
                                   moved=_moved(applied, run.pattern))
            verdicts[key] = {k: c.ok for k, c in checks.items()}
        return verdicts[key]
    return quality


def _label_plans(stages: list) -> dict:
    """{label: {conv node: recipe}}: each assignment applied to every stage that has it (stages are independent:
    each has its own reference, so one analysis answers for all of them)."""
    plans: dict = {}
    for stage in stages:
        for label, recipes in stage.assignments:
            plans.setdefault(label, {}).update({s.node: r for s, r in zip(stage.sites, recipes)})
    return plans


def _costed(run: Run, stage: _Stage, labels: dict) -> list[_Option]:
    """objective="macs": every assignment that changes something (and S), ranked by MACs, then params."""
    options = []
    for order, assignment in enumerate(stage.assignments):
        used = _usable(assignment, stage)
        if assignment.label != "S" and all(u.keeps for u in used):
            continue
        macs, params = _cost(run, stage, used)
        options.append(_Option((macs, params, order), assignment.label, tuple(used), macs, params, None,
                               (assignment.label, labels[assignment.label])))
    return options


def _timed(run: Run, stage: _Stage) -> list[_Option]:
    """objective="latency": each compact assignment pruned to the blocks the latency model times faster than the
    conv they replace (with the DW+RPW rotation as `_apply` would emit it: none for the first rotated block of a
    stage), S elsewhere; ranked by the stage's predicted time, then MACs. Pruning changes the assignment, so each
    pruned one is checked on its own: its scope is this stage alone. A rotated or shuffled block not timed yet
    counts at a lower bound of its time (`LatencyModel.bound`): a bound at or above the conv's prunes it for
    sure; below, the block is kept provisionally and listed in the option's `pending`."""
    ss, convs, pattern = stage.sites, stage.convs, run.pattern
    conv_s = [run.latency.time(KEEP, c, s.in_shape, pattern) for c, s in zip(convs, ss)]
    options, seen = [], set()
    for order, assignment in enumerate(stage.assignments):
        used = _usable(assignment, stage)
        if any(not u.keeps and not measure(u, c, s.in_shape, pattern).compact for u, c, s in zip(used, convs, ss)):
            continue  # not compact: no pruning can make it so, and timing it would be wasted
        pruned, times, rotated, pending = [], [], False, []
        for u, c, s, t_conv in zip(used, convs, ss, conv_s):
            t = t_conv
            if not u.keeps:
                shift = u.shift(c) if rotated else 0
                t_block, exact = run.latency.bound(u, c, s.in_shape, pattern, shift)
                if t_block < t_conv:
                    t = t_block
                    rotated = rotated or u.kind.rotates
                    if not exact:
                        pending.append((u, c, s, shift))
                else:
                    u = KEEP
            pruned.append(u)
            times.append(t)
        key = tuple(u.name for u in pruned)
        if key in seen:
            continue
        seen.add(key)
        slower = [s.node for s, a, b in zip(ss, used, pruned) if not a.keeps and b.keeps]
        label = f"{assignment.label} (S where slower: {', '.join(slower)})" if slower else assignment.label
        macs, params = _cost(run, stage, pruned)
        scope = ((stage.index, key), {s.node: u for s, u in zip(ss, pruned)})
        t = sum(times)
        options.append(_Option((t, macs, order), label, tuple(pruned), macs, params, round(t * 1e3, 4), scope,
                               tuple(pending)))
    return options
