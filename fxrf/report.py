"""Reports of an Analysis: the JSON document (docs/schema.md) and a table for the terminal."""
from __future__ import annotations

import math


def _rf(rf, with_mean=True):
    if rf is None:
        return None
    d = {"height": rf.height, "width": rf.width, "channel": rf.channel}
    if len(rf.spatial) != 2:
        d["spatial"] = list(rf.spatial)
    if with_mean:
        d["channel_mean"] = round(rf.channel_mean, 4)
        d["volume"] = rf.volume
    return d


COST_CONVENTION = ("macs: multiply-accumulates of conv, linear and matmul (FLOPs = 2 x MACs; fvcore's count); "
                   "extra_macs: norms, activations, pooling and elementwise ops as ptflops counts them")


def _cost_sum(costs) -> dict:
    return {"params": sum(c.params for c in costs), "macs": sum(c.macs for c in costs),
            "extra_macs": sum(c.extra_macs for c in costs)}


def to_dict(a) -> dict:
    """The JSON document (docs/schema.md): model, input, alpha, stages, one entry per tensor node, cost, and the
    ops analysed conservatively."""
    costs = a.costs
    per_stage: dict = {}
    for r in a.records:
        if r.name in costs:
            per_stage.setdefault(r.stage, []).append(costs[r.name])
    nodes = []
    for r in a.records:
        c = costs.get(r.name)
        nodes.append({"name": r.name, "op": r.op, "target": r.target, "shape": list(r.shape), "stage": r.stage,
                      "kernel": r.kernel, "rf": _rf(r.rf), "gain": None if r.gain is None else round(r.gain, 6),
                      "input_rf": _rf(r.input_rf, with_mean=False),
                      "params": c.params if c else 0, "macs": c.macs if c else 0})
    return {
        "model": a.model,
        "input_shape": list(a.input_shape),
        "alpha": a.alpha,
        "stages": [{"index": s.index, "resolution": list(s.resolution), "channels": s.channels, "volume": s.volume,
                    "input": s.inputs[0], "inputs": list(s.inputs), **_cost_sum(per_stage.get(s.index, []))}
                   for s in a.stages],
        "nodes": nodes,
        "cost": {"convention": COST_CONVENTION, "total": _cost_sum(costs.values())},
        "unsupported": [{"name": n, "target": t, "reason": why} for n, t, why in a.unsupported],
    }


def table(a, width: int = 100) -> str:
    """Per stage: w_0, c_0, V_0; per conv: kernel type, spatial/channel 3DRF, volume, gain."""
    lines = [f"{a.model}  input {tuple(a.input_shape)}  alpha {a.alpha:g}"]
    head = f"{'node':<28} {'kernel':<9} {'shape':<18} {'HxW':>9} {'ch':>6} {'volume':>12} {'gain':>8}"
    by_stage: dict = {}
    for r in a.convs():
        by_stage.setdefault(r.stage, []).append(r)
    for s in a.stages:
        res = "x".join(map(str, s.resolution))
        lines.append("")
        lines.append(f"stage {s.index}: w0 {res}  c0 {s.channels}  V0 {s.volume:,}  input {', '.join(s.inputs)[:40]}")
        convs = by_stage.get(s.index, [])
        if not convs:
            lines.append("  (no convs)")
            continue
        lines.append("  " + head)
        for r in convs:
            hw = f"{r.rf.height}x{r.rf.width}" if r.rf else "-"
            ch = str(r.rf.channel) if r.rf else "-"
            vol = f"{r.rf.volume:,}" if r.rf else "-"
            g = "start" if r.gain is None else f"{r.gain:.4f}"
            shape = "x".join(map(str, r.shape[1:]))
            lines.append(f"  {_clip(r.name, 28):<28} {r.kernel:<9} {shape:<18} {hw:>9} {ch:>6} {vol:>12} {g:>8}")
    if a.unsupported:
        lines.append("")
        lines.append(f"{len(a.unsupported)} node(s) without an exact rule, analysed conservatively:")
        for n, t, why in a.unsupported:
            lines.append(f"  {n}: {t} ({why})")
    return "\n".join(lines)


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else "…" + s[-(n - 1):]
