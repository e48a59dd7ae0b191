"""The report of an optimize run (`fxrf.optimize`, `fxrf optimize`): one line per change, its conv named by module
path, and the before/after table (params, MACs, measured latency eager and compiled when timed, convs and 3DRF
per stage). It reads the passes' results through the
shape every result has (`changes` whose records `describe` themselves, `summary`, `analysis`), never their classes.
"""
from __future__ import annotations

from .report import rf_text, si, stage_summaries


MODE_NAMES = {"eager": "eager", "compile": "compiled"}  # LatencyModel's modes as the report writes them
# What docs/accuracy.md's round two (benchmarks/evidence.py: early stopping on a validation split, 10 paired seeds,
# equal-cost controls, Holm-corrected) measured about each step, printed under the step so that nobody takes a
# rewrite's accuracy on the paper's word. Keep in step with that page's verdict table.
EVIDENCE = {
    "stages": "evidence (docs/accuracy.md): on three small tasks this organizer's layouts were not resolved better "
              "than a random layout with as many convs (best case +11.0 +- 7.4 points, Holm p 0.06), and its "
              "insertions added nothing resolved over its removals; train and compare the layout before keeping it",
    "kernels": "evidence (docs/accuracy.md): at a DW+PW decomposition's MACs, fxrf.prune (--prune macs=F) was as "
               "accurate or more (same-distance task: +3.1 points) and a thinner standard net trained from scratch "
               "as accurate or more (digits: +2.4); keep these blocks where they are measured faster",
}


def before_after(before, after, latency: dict | None = None) -> dict:
    """Params, MACs, per-stage conv counts and 3DRF of two analyses (the input model and the result), each stage's
    input (w0 x c0, what its 3DRF is measured against) in both, and with `latency` (fxrf.optimize's
    summary["latency"]) the measured milliseconds of both, per mode."""
    t = [{k: sum(getattr(c, k) for c in a.costs.values()) for k in ("params", "macs")} for a in (before, after)]
    sb, sa = stage_summaries(before), stage_summaries(after)
    stages = []
    for i in range(max(len(sb), len(sa))):
        b, x = (sb[i] if i < len(sb) else None), (sa[i] if i < len(sa) else None)
        s = (b or x).stage
        stages.append({"index": i, "resolution": list(s.resolution), "v0": s.volume,
                       "convs_before": len(b.convs) if b else 0, "convs_after": len(x.convs) if x else 0,
                       "rf_before": rf_text(b.rf) if b else "-", "rf_after": rf_text(x.rf) if x else "-",
                       "saturated_before": bool(b and b.saturated), "saturated_after": bool(x and x.saturated),
                       "input_before": _input_text(b), "input_after": _input_text(x)})
    d = {"params_before": t[0]["params"], "params_after": t[1]["params"], "macs_before": t[0]["macs"],
         "macs_after": t[1]["macs"], "stages": stages}
    if latency:
        d["latency"] = _latency_columns(latency)
    return d


def _input_text(summary) -> str:
    """A stage's input as 'HxWxC' (w0 then c0): the reference its 3DRF is measured against; '-' for no stage."""
    if summary is None:
        return "-"
    s = summary.stage
    return "x".join(map(str, s.resolution)) + f"x{s.channels}"


def _latency_columns(t: dict) -> dict:
    """Per mode: the model's and the returned model's milliseconds, the change (the paired per-round ratio, not a
    ratio of medians), the noise; plus where and how it was measured."""
    modes = t.get("modes") or {t["mode"]: t}
    kept = t.get("kept") == "model"  # the model came back: "after" is the model itself
    out = {"device": t["device"], "batch": t["batch"], "rounds": t["rounds"], "deployed": t["mode"],
           "kept": t.get("kept", "result"), "modes": {}}
    for mode, m in modes.items():
        out["modes"][mode] = {"ms_before": m["ms"]["model"], "ms_after": m["ms"]["model" if kept else "result"],
                              "ratio": 1.0 if kept else m["result_vs_model"], "noise": m["noise"]}
    return out


def _pct(after: int, before: int) -> str:
    return f"{(after - before) / before * 100:+.1f}%" if before else ""


def before_after_table(d: dict) -> list:
    """The before/after dict as aligned text lines."""
    rows = [["", "before", "after", "change"],
            ["params", si(d["params_before"]), si(d["params_after"]), _pct(d["params_after"], d["params_before"])],
            ["MACs", si(d["macs_before"]), si(d["macs_after"]), _pct(d["macs_after"], d["macs_before"])]]
    lat = d.get("latency")
    for mode, m in (lat or {}).get("modes", {}).items():
        rows.append([f"latency {MODE_NAMES.get(mode, mode)} (ms)", f"{m['ms_before']:.3f}", f"{m['ms_after']:.3f}",
                     f"{(m['ratio'] - 1) * 100:+.1f}%"])
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    if lat:
        noise = ", ".join(f"{MODE_NAMES.get(k, k)} {m['noise'] * 100:.1f}%" for k, m in lat["modes"].items())
        lines += [f"latency: on {lat['device']} at batch {lat['batch']}, median of {lat['rounds']} round(s) in "
                  f"alternation; change: the per-round ratio", f"  noise (two instances of the model): {noise}"
                  + ("; the model came back, so after = before" if lat["kept"] == "model" else "")]
    srows = [["stage", "w0", "convs", "3DRF before", "3DRF after"]]
    moved = False
    for s in d["stages"]:
        changed = s.get("input_after", "-") not in ("-", s.get("input_before", "-"))
        moved |= changed
        srows.append([str(s["index"]), "x".join(map(str, s["resolution"])),
                      f"{s['convs_before']} -> {s['convs_after']}",
                      s["rf_before"] + ("*" if s["saturated_before"] else ""),
                      s["rf_after"] + ("*" if s["saturated_after"] else "")
                      + (f" (of {s['input_after']}, was {s['input_before']})" if changed else "")])
    w = [max(len(r[i]) for r in srows) for i in range(5)]
    lines += [""] + ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in srows]
    lines.append("convs: conv layers in the stage (a decomposed block counts each of its convs)")
    if moved:
        lines += ["3DRF: measured against the stage's input (w0 x channels) in each model; (of ..., was ...): that "
                  "stage's input changed", "  (pruned channels, or a strided conv decomposed that moves the stage "
                  "boundary), so its two 3DRFs have different references"]
    else:
        lines.append("3DRF: measured against the stage's input (w0 x channels), the same in both models")
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
        if key == "prune":
            lines.append(f"prune ({s['importance']}, rate {s['amount']:.3g}): {s['removed_channels']} channel(s) "
                         f"removed in {len(r.changes)} famil{'y' if len(r.changes) == 1 else 'ies'}; "
                         f"{len(r.declined)} place(s) keep their channels (PruneResult.declined)")
        elif key == "stages":
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
        if key in EVIDENCE and r.changes:
            lines.append("  " + EVIDENCE[key])
        sel = s.get("selection") or {}
        if sel.get("include") or sel.get("exclude"):
            lines.append(f"  only convs matching include {sel.get('include') or ['*']}, exclude {sel.get('exclude')}")
    ch = result.summary.get("choice")
    if ch:
        lines.append(f"chose {ch['chosen']}: timed with the model in alternation ({MODE_NAMES.get(ch['mode'], ch['mode'])}"
                     f", {ch['device']}, batch {ch['batch']}, {ch['rounds']} rounds): "
                     + ", ".join(f"{k} {v:.3f}x" for k, v in ch["ratios"].items())
                     + f" the model's time (noise {ch['noise']:.3f})")
    lines += calibration_lines(result.summary)
    lines += latency_lines(result.summary)
    lines += ["", ("planned changes (dry run):" if dry_run else "before and after:")]
    lines += before_after_table(before_after(before, after, result.summary.get("latency")))
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

    what = ("thinned layers refit by least squares, norms re-estimated" if c.get("pruned") else
            "blocks fitted by least squares, norms re-estimated" if not c.get("norms_only") else "norms re-estimated")
    return [f"calibration ({what}; {c['batches']} batch(es), compared on {c['measured_on']}):",
            f"  after the transfer: {f(c['transfer'])}",
            f"  calibrated:         {f(c['calibrated'])}"]


def latency_lines(summary: dict) -> list:
    """The whole model's measured time beside the result's, per mode (fxrf.optimize's measure); what goal="speed"
    decided; and a line of its own when what is returned is slower than the input in a mode, beyond the noise."""
    t = summary.get("latency")
    if not t:
        return []
    modes = t.get("modes") or {t["mode"]: t}
    lines = [f"measured on {t['device']} at batch {t['batch']} ({t['rounds']} rounds in alternation, "
             f"{MODE_NAMES.get(t['mode'], t['mode'])} deployed):"]
    for mode, m in modes.items():
        ms = m["ms"]
        lines.append(f"  {MODE_NAMES.get(mode, mode)}: model {ms['model']:.3f} ms, result {ms['result']:.3f} ms: "
                     f"{m['result_vs_model']:.3f}x the model's time (two instances of the model differ by "
                     f"{m['noise']:.3f}: the resolution)")
    if t.get("kept") == "model":
        lines.append(f"kept the model unchanged: {t['why']}")
    slow = t.get("slower_modes", [m for m, d in modes.items() if d.get("slower")])
    if slow:
        lines.append("slower than the input: " + "; ".join(
            f"{MODE_NAMES.get(m, m)} {modes[m]['result_vs_model']:.3f}x its time (noise {modes[m]['noise']:.3f})"
            for m in slow) + f", on {t['device']} at batch {t['batch']}"
            + ("" if summary.get("goal") == "speed" else " (--goal speed / goal='speed' keeps only what is "
                                                       "measured faster)"))
    return lines
