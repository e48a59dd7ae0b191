"""objective="latency" with verify > 0: the whole model the latency objective chose, timed against the one the
MACs objective chooses and the unchanged model, compiled, in alternation (`LatencyModel.compare`); the fastest by
the median of per-round ratios is kept, the latency choice only if it beats the MACs choice by VERIFY_MARGIN."""
from __future__ import annotations

import torch.fx as fx

from ..latency import input_shape, paired_ratio
from ..util import copy_graph_module
from .apply import _build
from .options import Run
from .plan import _search
from .records import Decomposition

VERIFY_MARGIN = 0.03  # the latency choice replaces the MACs choice only if measured this much faster


def _verified(run: Run, gm: fx.GraphModule, plan: dict, tried: dict) -> Decomposition:
    """The latency objective's `plan` (and its search log `tried`) built, unless the whole-model check finds the
    MACs choice or the unchanged model faster; summary["verified"] says what was timed and chosen."""
    macs_plan, macs_tried = _search(run, gm, "macs")
    if _same_plan(plan, {}) and _same_plan(macs_plan, {}):
        return _build(run, gm, plan, tried)  # nothing replaced either way: nothing to compare
    options = {"latency": (plan, tried), "macs": (macs_plan, macs_tried), "original": ({}, tried)}
    if _same_plan(macs_plan, plan):
        del options["macs"]
    built = {k: _build(run, copy_graph_module(gm, params="copy"), p, t) for k, (p, t) in options.items()}
    times = run.latency.compare({k: r.graph_module for k, r in built.items()}, input_shape(
        run.before.graph_module, "decompose(objective='latency', verify>0)", "pass verify=0"), run.options.verify)
    pick = _pick(times)
    result = built[pick]
    result.summary["verified"] = _verdict(run, times, pick, built)
    return result


def _pick(times: dict) -> str:
    """The model the whole-model check keeps, by per-round ratios (`paired_ratio`): the MACs choice (the
    deterministic default) unless the latency choice is faster by VERIFY_MARGIN (two timings of one model
    differ by 1-3% here); then the unchanged model if that rewrite is not faster than it."""
    pick = "latency"
    if "macs" in times and paired_ratio(times, "latency", "macs") >= 1 - VERIFY_MARGIN:
        pick = "macs"
    return pick if paired_ratio(times, pick, "original") < 1 else "original"


def _same_plan(a: dict, b: dict) -> bool:
    keep = lambda plan: {k: v.name for k, v in plan.items() if not v.keeps}  # noqa: E731
    return keep(a) == keep(b)


def _verdict(run: Run, times: dict, pick: str, built: dict) -> dict:
    """What the whole-model check measured (per model: its best round, and its time relative to the unchanged
    model's, the median of per-round ratios), and how well the per-block latency model predicted it. Two
    predictions from the measured original and the blocks' times alone (error = predicted / measured - 1):
    additive = measured(original) - sum over the replaced convs of (conv time - block time); scaled =
    measured(original) * (1 - that saving / the sum of the times of every eligible conv), i.e. the block times
    taken as right relative to the convs' and the whole model scaled by them (on a CPU, convs timed alone sum to
    20-30% more than the compiled model, so the additive one overstates the saving)."""
    sites_s = run.sites_ms / 1e3
    base = min(times["original"])
    rows = {}
    for k, ts in times.items():
        t = min(ts)
        saved = built[k].summary["latency"]["saved_ms"] / 1e3
        additive, scaled = base - saved, base * (1 - saved / sites_s) if sites_s > 0 else base
        rows[k] = {"ms": round(t * 1e3, 4), "rounds_ms": [round(x * 1e3, 4) for x in ts],
                   "vs_original": round(paired_ratio(times, k, "original"), 4),
                   "additive_ms": round(additive * 1e3, 4), "scaled_ms": round(scaled * 1e3, 4),
                   "additive_error": round(additive / t - 1, 4) if t > 0 else None,
                   "scaled_error": round(scaled / t - 1, 4) if t > 0 else None,
                   "replaced": built[k].summary["replaced"], "macs": built[k].summary["macs_after"]}
    return {"rounds": run.options.verify, "chosen": pick, "margin": VERIFY_MARGIN, "models": rows,
            "latency_vs_macs": round(paired_ratio(times, "latency", "macs"), 4) if "macs" in times else None,
            "sites_ms": round(sites_s * 1e3, 4), "speedup": round(1 / rows[pick]["vs_original"], 4)
            if rows[pick]["vs_original"] > 0 else None}
