"""The paper's two rules read off analyses: each stage's end nodes and their 3DRF before and after (quality), the
blocks' own 3DRF (compact, `blocks.measure`), and the records that report them (BlockChange, StageReport)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from fxrf.analysis import Analysis, map_size

from ..blocks import measure
from .records import KEEP, BlockChange, RFRow, StageReport


def stage_ends(a: Analysis) -> dict:
    """{stage: names of its end nodes}: maps at the stage's resolution that something outside the stage reads."""
    def inside(name, s):
        r = a.get(name)
        return (r is not None and r.stage == s and r.field is not None and r.field.is_map
                and map_size(r.field, r.shape) == tuple(a.stages[s].resolution))

    ends = {s.index: [] for s in a.stages}
    for node in a.graph_module.graph.nodes:
        r = a.get(node.name)
        if r is None or r.stage is None or not inside(node.name, r.stage):
            continue
        if any(not inside(u.name, r.stage) for u in node.users):
            ends[r.stage].append(node.name)
    return ends


@dataclass(frozen=True)
class StageCheck:
    ok: bool
    ends: tuple
    before: tuple
    after: tuple
    moved: bool = False


def rf_row(rf, c0: int) -> RFRow | None:
    return RFRow(tuple(rf.spatial), rf.channel, rf.channel_mean, c0) if rf is not None else None


def same_rf(a: tuple | None, b: tuple | None, at_least: bool = False) -> bool:
    """Equal 3DRFs (b >= a with at_least): spatial extents, and channel counts as fractions of each stage's input."""
    if a is None or b is None:
        return a is b
    (sa, ca, ma, c0a), (sb, cb, mb, c0b) = a, b
    if at_least:
        return (all(x <= y for x, y in zip(sa, sb)) and ca * c0b <= cb * c0a
                and ma * c0b <= mb * c0a * (1 + 1e-9) + 1e-9)
    return sa == sb and ca * c0b == cb * c0a and math.isclose(ma * c0b, mb * c0a, rel_tol=1e-9, abs_tol=1e-9)


def _moved(applied, pattern) -> dict:
    """{stage: whether its strided blocks reach their convs' 3DRF alone} for the stages a strided block starts
    (`applied`: what apply._apply did)."""
    out: dict = {}
    for d in applied.replaced:
        if d.site.starts_stage:
            shape = d.site.in_shape
            mb, mc = measure(d.recipe, d.conv, shape, pattern), measure(KEEP, d.conv, shape, pattern)
            ok = mb.rf.spatial == mc.rf.spatial and mb.rf.channel == mc.rf.channel
            out[d.site.stage] = out.get(d.site.stage, True) and ok
    return out


def stage_quality(before: Analysis, ends: dict, after: Analysis, renamed: dict, *,
                  moved: dict | None = None) -> dict:
    """{stage: StageCheck} comparing the 3DRF at every end node (`stage_ends(before)`) of each original stage with
    the new graph's (`renamed`: original conv node -> the node that stands for its output now). `moved`: {stage:
    its strided blocks reach their convs' 3DRF alone} for the stages that a strided block now starts."""
    moved = moved or {}
    out = {}
    for s, names in ends.items():
        rows_b, rows_a, pairs = [], [], []
        for name in names:
            rb = before.record(name)
            new = renamed.get(name, name)
            ra = after.get(new)
            c0 = after.stages[ra.stage].channels if ra is not None and ra.stage is not None else None
            rows_b.append(rf_row(rb.rf, before.stages[s].channels))
            rows_a.append(rf_row(ra.rf, c0) if ra is not None and c0 is not None else None)
            pairs.append((name, new))
        ok = all(same_rf(x, y, at_least=s in moved) for x, y in zip(rows_b, rows_a)) and moved.get(s, True)
        out[s] = StageCheck(ok, tuple(pairs), tuple(rows_b), tuple(rows_a), s in moved)
    return out


def _change(run, done, after: Analysis, renamed: dict) -> BlockChange:
    """The record of one replaced conv (`done`: an apply._Replaced), read off the analysis of the new graph."""
    site, recipe, conv, pattern = done.site, done.recipe, done.conv, run.pattern
    before, out = run.before, renamed[site.node]
    mc, mb = measure(KEEP, conv, site.in_shape, pattern), measure(recipe, conv, site.in_shape, pattern)
    layer = None
    if not site.starts_stage:
        ra = after.record(out)
        layer = same_rf(rf_row(before.record(site.node).rf, before.stages[site.stage].channels),
                        rf_row(ra.rf, after.stages[ra.stage].channels) if ra.stage is not None else None)
    return BlockChange(site.node, site.target, site.stage, recipe.name, out, done.shift, mc.rf_text, mb.rf_text,
                       mb.rf.spatial == mc.rf.spatial and mb.rf.channel == mc.rf.channel, layer, mb.compact,
                       mc.params, mb.params, mc.macs, mb.macs, done.error)


def _stage_costs(a: Analysis) -> dict:
    """{stage: (params, macs)} summed over the stage's nodes."""
    out: dict = {}
    costs = a.costs
    for r in a.records:
        c = costs.get(r.name)
        if r.stage is not None and c is not None:
            p, m = out.get(r.stage, (0, 0))
            out[r.stage] = (p + c.params, m + c.macs)
    return out


def _stage_reports(run, after: Analysis, changes: list, checks: dict, *, tried: dict) -> list:
    """A StageReport per stage of the original graph (`checks`: stage_quality's; `tried`: the auto search's log)."""
    cost_a = _stage_costs(after)
    by_conv = {c.conv: c for c in changes}
    reports = []
    for st in run.before.stages:
        ss = [s for s in run.sites if s.stage == st.index]
        blocks = tuple(by_conv[s.node].recipe if s.node in by_conv else "S" for s in ss)
        chk = checks[st.index]
        # the same stage in the new graph: the one its end nodes fall in
        idx_after = {after.record(n).stage for _, n in chk.ends if after.record(n).stage is not None}
        pb, mb = run.stage_cost_before.get(st.index, (0, 0))
        pa, ma = (sum(cost_a.get(i, (0, 0))[0] for i in idx_after), sum(cost_a.get(i, (0, 0))[1] for i in idx_after))
        reports.append(StageReport(
            st.index, tuple(st.resolution), st.channels, tuple(s.node for s in ss), blocks, chk.ok,
            all(by_conv[s.node].compact for s in ss if s.node in by_conv), chk.ends, chk.before, chk.after,
            pb, pa, mb, ma, chk.moved, tried.get(st.index, ())))
    return reports
