"""The greedy strategy: remove every conv at or below `remove_below`, then insert the conv of highest gain while
its gain exceeds `threshold` and the budgets hold (the module docstring of fxrf.passes.organizer)."""
from __future__ import annotations

from itertools import count

import torch.fx as fx

from fxrf.analysis import Analysis, reanalyze
from fxrf.cost import total
from fxrf.progress import bar

from .budget import ms, round_ms
from .context import NOT_SELECTED, Run, fmt
from .removal import inexact_gain, removal_plan, remove
from .result import Change, Declined
from .sites import sites as stage_sites
from .units import PLACES, insert_unit, score

__all__ = ["remove_saturated", "insert_greedy"]


def remove_saturated(run: Run, gm: fx.GraphModule, a: Analysis | None = None) -> tuple[list, list, Analysis]:
    """Remove convs with gain <= run.cutoff, last first, until a fresh analysis finds none left to remove:
    (changes, declined, the last analysis). a: the analysis of `gm` as it is, if the caller has one.

    Within one analysis the convs are visited in reverse graph order: removing a conv changes the fields of the
    nodes after it only, so the gains of the convs still to visit stay exact.
    """
    changes, cutoff, clock = [], run.cutoff, run.clock
    for _ in bar(count(), "organizer: removing the convs at or below the cutoff", unit="rounds"):
        a = a if a is not None else run.analyze(gm)
        kept: dict = {}  # the convs this pass could not remove, with the reason
        costs = a.costs
        removed = False
        for r in reversed(a.convs()):
            if r.gain is None or r.gain > cutoff:
                continue
            inexact = inexact_gain(a, r, cutoff)
            if inexact is not None:
                kept[r.name] = Declined("remove", r.stage, r.name, r.gain, inexact)
                continue
            if not run.may_change(r.path):
                kept[r.name] = Declined("remove", r.stage, r.name, r.gain, NOT_SELECTED)
                continue
            plan = removal_plan(gm, a, r.name)
            if isinstance(plan, str):
                kept[r.name] = Declined("remove", r.stage, r.name, r.gain, plan)
                continue
            why = ("saturated: its input already sees the whole stage input (gain 0)" if r.gain == 0 else
                   f"gain {r.gain:.4f} <= {cutoff}")
            t = None
            if clock is not None:  # the time the removal saves
                t = clock.conv(gm, plan[0][0], a.record(plan[1].name).shape)
                clock.remove(t, r.name)
            changes.append(remove(gm, plan, r, costs, why=why, time_s=t))
            removed = True
        if not removed:
            return changes, list(kept.values()), a
        a = None  # the graph changed; this analysis goes before the next one is made


def insert_greedy(run: Run, gm: fx.GraphModule, now, a: Analysis | None = None) -> tuple[list, list, Analysis]:
    """Insert one conv at a time where the candidate graphs' analysis gives the highest gain (the cheaper place
    on a tie), while the gain exceeds the threshold and the budgets hold: (changes, declined, the analysis of `gm`
    as it is at the end, or None). `now`: the cost (fxrf.cost.total) of `gm` as it is now; a: its analysis, if the
    caller has one."""
    used = [now.macs, now.params]
    changes, declined = [], []
    closed: set = set()  # (stage, place) that will get nothing more: the graph there does not change any more
    own: set = set()  # the module paths of the convs inserted
    for _ in bar(count(), "organizer: inserting convs, one per round", unit="rounds"):
        a = a if a is not None else run.analyze(gm)
        sites, refused, closing = _open_sites(run, a, closed, own)
        declined += refused
        closed |= closing
        if not sites:
            return changes, declined, (a if run.incremental else None)
        rows = []  # (gain, MACs, stage, place, params): one trial graph per place, every stage at once
        for place in PLACES:
            rows += score(run, gm, {s: x for (s, p), x in sites.items() if p == place}, place, a)
        last, a = a, None  # the graph changes next (or nothing does and the loop ends): the next round analyses it
        for gain, macs, s, place, params in sorted(rows, key=lambda r: (-(r[0] if r[0] is not None else -1),) + r[1:4]):
            site, where = sites[s, place], PLACES[place]
            why, t = _why_not(run, (gain, macs, params), site, used=used, inserted=len(changes))
            if why is not None:
                declined.append(Declined("insert", s, site.point, gain, f"{where}: {why}"))
                closed.add((s, place))
                continue
            nodes = insert_unit(gm, site)
            # the next round's analysis: walked again only downstream of the new unit (None: a whole one)
            a, last = (reanalyze(last, gm, nodes) if run.incremental else None), None
            own.add(nodes[0].target)
            if place == "end":  # a conv inside the block now would come before this one and change its gain
                closed.add((s, "branch"))
            used[0] += macs
            used[1] += params
            if run.clock is not None:
                run.clock.add(t)
            changes.append(Change("insert", s, nodes[0].name, gain,
                                  f"{where}: the highest gain of the next convs, {gain:.4f} > threshold "
                                  f"{run.threshold}" + (f"; {site.note}" if site.note else ""),
                                  tuple(n.name for n in nodes), site.point, params, macs, place,
                                  None if run.clock is None else round_ms(t)))
            break  # the graph changed: the next round reads its analysis
        else:
            return changes, declined, (last if run.incremental else None)


def _open_sites(run: Run, a: Analysis, closed: set, own: set) -> tuple[dict, list, set]:
    """({(stage, place): Site} still open, the stages' reasons for none, the (stage, place) pairs to close)."""
    sites, declined, closing = {}, [], set()
    for stage in a.stages:
        if not run.may_grow(a, stage.index, own):
            if (stage.index, "end") not in closed:
                declined.append(Declined("insert", stage.index, None, None, "include/exclude do not select "
                                                                           "every conv of the stage"))
            closing.update({(stage.index, "end"), (stage.index, "branch")})
            continue
        for place, site in stage_sites(a, stage, run.kernel_size).items():
            if (stage.index, place) in closed:
                continue
            if isinstance(site, str):
                declined.append(Declined("insert", stage.index, None, None, site))
                closing.add((stage.index, place))
            else:
                sites[stage.index, place] = site
    return sites, declined, closing


def _why_not(run: Run, row: tuple, site, *, used: list, inserted: int) -> tuple[str | None, float | None]:
    """(why the candidate (gain, MACs, params) at `site` is not inserted, or None; its time, if timed).
    used: the (MACs, params) of the graph now; inserted: how many convs this run inserted."""
    gain, macs, params = row
    clock, original, limits, t = run.clock, run.original, run.limits, None
    if gain is None or gain <= run.threshold:
        return f"the next conv's gain {fmt(gain)} <= threshold {run.threshold}", t
    if used[0] + macs > limits[0]:
        return (f"the next conv (gain {gain:.4f}) would exceed the MACs budget "
                f"({_ratio(used[0] + macs, original.macs, limits[0], 'MACs')})"), t
    if used[1] + params > limits[1]:
        return (f"the next conv (gain {gain:.4f}) would exceed the params budget "
                f"({_ratio(used[1] + params, original.params, limits[1], 'params')})"), t
    if clock is not None and (late := clock.over(t := clock.site(site))) is not None:
        return f"the next conv (gain {gain:.4f}, {ms(t)}) would exceed the latency budget ({late})", t
    if inserted >= run.max_insertions:
        return f"max_insertions ({run.max_insertions}) reached", t
    return None, t


def _ratio(value, ref, limit, what) -> str:
    return f"{value / ref:.3f}x > {limit / ref:.3f}x of the input model's {what}" if ref else what
