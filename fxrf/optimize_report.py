"""The report of an optimize run (`fxrf.optimize`, `fxrf optimize`): one line per change, its conv named by module
path, and the before/after table (params, MACs, convs and 3DRF per stage). It reads the passes' results through the
shape every result has (`changes` whose records `describe` themselves, `summary`, `analysis`), never their classes.
"""
from __future__ import annotations

from .report import rf_text, si, stage_summaries


def before_after(before, after) -> dict:
    """Params, MACs, per-stage conv counts and 3DRF of two analyses (the input model and the result)."""
    t = [{k: sum(getattr(c, k) for c in a.costs.values()) for k in ("params", "macs")} for a in (before, after)]
    sb, sa = stage_summaries(before), stage_summaries(after)
    stages = []
    for i in range(max(len(sb), len(sa))):
        b, x = (sb[i] if i < len(sb) else None), (sa[i] if i < len(sa) else None)
        s = (b or x).stage
        stages.append({"index": i, "resolution": list(s.resolution), "v0": s.volume,
                       "convs_before": len(b.convs) if b else 0, "convs_after": len(x.convs) if x else 0,
                       "rf_before": rf_text(b.rf) if b else "-", "rf_after": rf_text(x.rf) if x else "-",
                       "saturated_before": bool(b and b.saturated), "saturated_after": bool(x and x.saturated)})
    return {"params_before": t[0]["params"], "params_after": t[1]["params"], "macs_before": t[0]["macs"],
            "macs_after": t[1]["macs"], "stages": stages}


def _pct(after: int, before: int) -> str:
    return f"{(after - before) / before * 100:+.1f}%" if before else ""


def before_after_table(d: dict) -> list:
    """The before/after dict as aligned text lines."""
    rows = [["", "before", "after", "change"],
            ["params", si(d["params_before"]), si(d["params_after"]), _pct(d["params_after"], d["params_before"])],
            ["MACs", si(d["macs_before"]), si(d["macs_after"]), _pct(d["macs_after"], d["macs_before"])]]
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    srows = [["stage", "w0", "convs", "3DRF before", "3DRF after"]]
    for s in d["stages"]:
        srows.append([str(s["index"]), "x".join(map(str, s["resolution"])),
                      f"{s['convs_before']} -> {s['convs_after']}",
                      s["rf_before"] + ("*" if s["saturated_before"] else ""),
                      s["rf_after"] + ("*" if s["saturated_after"] else "")])
    w = [max(len(r[i]) for r in srows) for i in range(5)]
    lines += [""] + ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in srows]
    lines.append("convs: conv layers in the stage (a decomposed block counts each of its convs)")
    if any(s["saturated_before"] or s["saturated_after"] for s in d["stages"]):
        lines.append("*: saturated (the stage's 3DRF is its whole input)")
    return lines


def optimize_summary(result, dry_run: bool = False) -> str:
    """What an `fxrf.optimize` result holds: per step one line per change, its conv named by module path; how close
    the result computes to the model (calibration), then the before/after table."""
    steps, before, after = result.steps, result.before, result.after
    lines = []
    for key, r in steps.items():
        s = r.summary
        if key == "stages":
            lines.append(f"stages ({s['strategy']}): {s['inserted']} conv(s) inserted, {s['removed']} removed"
                         + ("" if s["function_preserved"] else "; removals change the function (fine-tune after)"))
            if s.get("latency"):
                t = s["latency"]
                lines.append(f"  predicted latency on {t['device']} at batch {t['batch']}: {t['original_ms']:.3f} -> "
                             f"{t['predicted_ms']:.3f} ms (budget {s['latency_budget']:g}x; each conv timed alone)")
        else:
            lines.append(f"kernels ({s['recipe']}): {s['replaced']} conv(s) replaced, {s['declined']} declined; "
                         f"3DRF kept: {'yes' if s['quality'] else 'NO'}, compact: {'yes' if s['compact'] else 'NO'}")
            if s.get("verified"):
                v, lm = s["verified"], s["latency"]
                lines.append(f"  whole model on {lm['device']} at batch {lm['batch']}, compiled, in alternation: "
                             + ", ".join(f"{k} {m['ms']:.3f} ms" for k, m in v["models"].items())
                             + f"; kept: {v['chosen']}")
        lines += ["  " + c.describe(before, r.analysis or after) for c in r.changes]
        sel = s.get("selection") or {}
        if sel.get("include") or sel.get("exclude"):
            lines.append(f"  only convs matching include {sel.get('include') or ['*']}, exclude {sel.get('exclude')}")
    lines += calibration_lines(result.summary)
    lines += latency_lines(result.summary)
    lines += ["", ("planned changes (dry run):" if dry_run else "before and after:")]
    lines += before_after_table(before_after(before, after))
    return "\n".join(lines)


def calibration_lines(summary: dict) -> list:
    """How close the result computes to the model: right after the weight transfer and after calibration, or why
    it needs calibration."""
    c = summary.get("calibration")
    if c is None:
        if summary.get("function_preserved", True):
            return []
        return ["weights: transferred, not calibrated: the result does not yet compute what the model does; "
                "calibrate it (--calibrate DATA, fxrf.optimize(calibration=...)) or fine-tune it"]

    def f(d):
        top1 = f", top-1 agreement {d['top1_agreement'] * 100:.1f}%" if d.get("top1_agreement") is not None else ""
        return f"relative output error {d['relative_error']:.4g}{top1}"

    what = "blocks fitted by least squares, norms re-estimated" if not c.get("norms_only") else "norms re-estimated"
    return [f"calibration ({what}; {c['batches']} batch(es), compared on {c['measured_on']}):",
            f"  after the transfer: {f(c['transfer'])}",
            f"  calibrated:         {f(c['calibrated'])}"]


def latency_lines(summary: dict) -> list:
    """The whole model's measured time beside the result's (fxrf.optimize's measure), and a line of its own when
    the result is slower than the model."""
    t = summary.get("latency")
    if not t:
        return []
    ms = t["ms"]
    lines = [f"measured on {t['device']} at batch {t['batch']} ({t['mode']}, {t['rounds']} rounds in alternation): "
             f"model {ms['model']:.3f} ms, result {ms['result']:.3f} ms: {t['result_vs_model']:.3f}x the model's time "
             f"(two instances of the model differ by {t['noise']:.3f}: the resolution)"]
    if t.get("kept") == "model":
        lines.append(f"kept the model unchanged: {t['why']}")
    elif t["slower"]:
        lines.append(f"SLOWER: the result runs {t['result_vs_model']:.3f}x the model's time on {t['device']} "
                     f"(goal 'speed' keeps only what is measured faster)")
    return lines
