"""The paper's rule (strategy="paper"): a fixed number of convs, moved by swaps to where the 3DRF gain is highest
(docs/organizer.md, "The paper strategy")."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import count

import torch.fx as fx

from fxrf.cost import total
from fxrf.progress import bar

from ..util import copy_graph_module
from .budget import ms, round_ms
from .context import Run, convs_per_stage, fmt
from .removal import inexact_gain, removal_plan, remove
from .result import Change, Declined
from .sites import sites as stage_sites
from .units import PLACES, insert_unit, score

__all__ = ["swap_paper"]


@dataclass(frozen=True)
class _Victim:
    """The removable conv of lowest gain, planned on a trial copy of the graph with it already removed."""

    record: object  # its NodeRecord
    trial: fx.GraphModule  # the graph without it
    removal: Change  # its removal, as made on `trial`
    time_s: float | None  # latency_budget: its time alone (None: not timed)


def swap_paper(run: Run, work: fx.GraphModule, a=None) -> tuple[list, list]:
    """Swap the removable conv of lowest gain for the candidate conv of highest gain while the candidate's gain is
    higher; one swap removes one conv and inserts one, so the number of convs never changes: (changes, declined).

    The candidates are scored in a copy of the graph with the conv already removed, so a candidate in the same
    stage gets the gain it will have there. Ties: the later conv goes first (on a stage of identical convs, the
    last position), the cheaper candidate comes first. Positions are counted over the convs that have a gain (a
    conv that starts a stage, strided, has none): each stage keeps at least one of them, and a stage without one
    gets none, since its first conv's gain would be measured against a 1x1x1 field (large by construction).
    The budgets only skip candidates: the best candidate that fits them is the one compared with the conv removed.
    a: the analysis of `work` as it is, if the caller has one.
    """
    a = a if a is not None else run.analyze(work)
    now = total(a.costs)
    used = (now.macs, now.params)
    changes, own, clock = [], set(), run.clock
    for _ in bar(count(), "organizer (paper): swapping convs, one per round", unit="rounds"):
        a = a if a is not None else run.analyze(work)
        victim, kept = _victim(run, a, work, own)
        if victim is None:
            return changes, kept + [Declined("insert", None, None, None, "paper: no conv can be removed (every stage "
                                                                        "keeps one; the others would break the graph)")]
        v = victim.record
        sites, reasons, t = _candidate_sites(run, victim.trial, own)
        rows = []
        for place in PLACES:
            rows += score(run, victim.trial, {s: x for (s, p), x in sites.items() if p == place}, place, t)
        t = None
        rows = sorted((row for row in rows if row[0] is not None), key=lambda row: (-row[0],) + row[1:4])
        base = (used[0] + victim.removal.macs, used[1] + victim.removal.params)
        lat_base = None if clock is None else clock.now - (victim.time_s or 0.0)
        over, best, t_best = [], None, None  # the candidates of higher gain than `best` that break a budget, and why
        for row in rows:
            why = None
            if base[0] + row[1] > run.limits[0] or base[1] + row[4] > run.limits[1]:
                why = "the swap would exceed the MACs or params budget"
            elif clock is not None:
                t_best = clock.site(sites[row[2], row[3]])
                late = clock.over(t_best, lat_base)
                if late is not None:
                    why = (f"the swap ({ms(t_best)} in, {ms(victim.time_s) if victim.time_s is not None else 'untimed'}"
                           f" out) would exceed the latency budget ({late})")
            if why is None:
                best = row
                break
            over.append((row, why))
        stop = None
        if best is None or not best[0] > v.gain:
            stop = (f"paper: the best candidate's gain {fmt(best[0] if best else None)} <= {v.gain:.4f}, the "
                    f"lowest gain of the removable convs ({v.name}): nothing to swap")
        elif len(changes) // 2 >= run.max_insertions:
            stop = f"paper: max_insertions ({run.max_insertions}) swaps reached"
        if stop is not None:
            declined = kept + reasons
            for (g, macs, s, place, params), why in (x for x in over if best is None or x[0][0] > best[0]):
                declined.append(Declined("insert", s, sites[s, place].point, g,
                                         f"{PLACES[place]}: paper: gain {g:.4f}, but {why}"))
            declined.append(Declined("insert", best[2] if best else None, sites[best[2], best[3]].point if best
                                     else None, best[0] if best else None, stop))
            return changes, declined
        gain, macs, s, place, params = best
        site = sites[s, place]
        plan = removal_plan(work, a, v.name)  # the same plan on the working graph
        changes.append(remove(work, plan, v, a.costs, time_s=victim.time_s,
                              why=f"paper: the lowest gain of the removable convs ({v.gain:.4f}), swapped for a "
                                  f"conv in stage {s} with gain {gain:.4f}"))
        a = None  # the graph changed: the next round analyses it
        nodes = insert_unit(work, site)
        own.add(nodes[0].target)
        if clock is not None:  # removal first, as checked: now = (now - t_victim) + t_best
            clock.remove(victim.time_s, v.name)
            clock.add(t_best)
        changes.append(Change("insert", s, nodes[0].name, gain,
                              f"{PLACES[place]}: paper: the highest gain of the candidates, {gain:.4f} > "
                              f"{v.gain:.4f} of {v.name} (removed)" + (f"; {site.note}" if site.note else ""),
                              tuple(n.name for n in nodes), site.point, params, macs, place,
                              None if clock is None else round_ms(t_best)))
        used = (base[0] + macs, base[1] + params)


def _victim(run: Run, a, work: fx.GraphModule, own: set) -> tuple[_Victim | None, list]:
    """The removable conv of lowest gain (in a stage that keeps another conv with a gain), removed from a trial
    copy of `work`; and the convs of lower gain kept, with why."""
    counts = convs_per_stage(a, with_gain=True)
    order = {r.name: i for i, r in enumerate(a.records)}
    low = sorted((r for r in a.convs() if r.gain is not None and r.stage is not None and counts[r.stage] > 1
                  and run.may_change(r.path, own)), key=lambda r: (r.gain, -order[r.name]))
    kept = []
    for r in low:
        inexact = inexact_gain(a, r, 0.0)
        if inexact is not None:
            kept.append(Declined("remove", r.stage, r.name, r.gain, f"paper: {inexact}"))
            continue
        trial = copy_graph_module(work, params="shared")  # same node names, shared modules: a graph to try on
        plan = removal_plan(trial, a, r.name)
        if isinstance(plan, str):
            kept.append(Declined("remove", r.stage, r.name, r.gain, f"paper: kept, {plan}"))
            continue
        t = None if run.clock is None else run.clock.conv(trial, plan[0][0], a.record(plan[1].name).shape)
        removal = remove(trial, plan, r, a.costs, why="")
        trial.recompile()
        return _Victim(r, trial, removal, t), kept
    return None, kept


def _candidate_sites(run: Run, trial: fx.GraphModule, own: set) -> tuple[dict, list, object]:
    """({(stage, place): Site} in the graph without the victim, the stages' reasons for none, its analysis)."""
    t = run.analyze(trial)
    sites, reasons = {}, []
    positions = convs_per_stage(t, with_gain=True)
    for stage in t.stages:
        if not run.may_grow(t, stage.index, own):
            reasons.append(Declined("insert", stage.index, None, None, "paper: include/exclude do not select "
                                                                       "every conv of the stage"))
            continue
        if not positions[stage.index]:
            reasons.append(Declined("insert", stage.index, None, None, "paper: the stage has no conv with a gain "
                                    "(no position 1 to add to)"))
            continue
        for place, site in stage_sites(t, stage, run.kernel_size).items():
            if isinstance(site, str):
                reasons.append(Declined("insert", stage.index, None, None, f"paper: {site}"))
            else:
                sites[stage.index, place] = site
    return sites, reasons, t
