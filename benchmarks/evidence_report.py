"""docs/accuracy.md's opening (round two) from benchmarks/evidence.py's JSON: the verdict table, then each
section's figures. Round one (benchmarks/accuracy.py's render of docs/accuracy.json) follows it in the same file."""
from __future__ import annotations

import json
import math
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ALPHA = 0.05
TASK_NAMES = {"mnist1d": "MNIST-1D", "digits": "digits", "same_distance": "same-distance k=10"}


def _pm(t: dict) -> str:
    return f"{t['mean']:+.2f} ± {t['ci']:.2f}" if math.isfinite(t.get("ci", float("nan"))) else f"{t['mean']:+.2f}"


def _adj(doc: dict, section: str, task: str, name: str) -> float:
    key = f"{section}|{task}|{name}"
    a = doc.get("adjusted", {})
    return a.get("primary", {}).get(key, a.get("rest", {}).get(key, float("nan")))


def _call(t: dict, p: float, better: str = "supported", worse: str = "contradicted") -> str:
    if t["n"] < 2 or not math.isfinite(p):
        return "not measurable"
    if t["mean"] == 0 and t["sd"] == 0:
        return "no difference (the same layout)"
    if p < ALPHA:
        return better if t["mean"] > 0 else worse
    return "not supported (no difference resolved)"


def _p(p: float) -> str:
    return "-" if not math.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else "<0.001")


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def _sd(xs) -> float:
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def verdicts(doc: dict) -> list:
    """(claim, task, figure, adjusted p, verdict) rows."""
    rows = []
    sec = doc["sections"]
    for task, o in sec.get("organizer", {}).items():
        for name, claim in (("organizer - random layout", "the organizer places convs better than a random "
                                                          "layout with as many convs"),
                            ("organizer - remove-only", "the organizer's insertions add accuracy over its removals"),
                            ("organizer - fewest params", "the organizer beats the fewest-params layout of as many "
                                                          "convs"),
                            ("organizer - width-scaled baseline", "the organizer beats the baseline scaled to "
                                                                  "equal params"),
                            ("organizer - baseline", "the organizer's layout beats the (2, 2, 2, 2) baseline")):
            if name in o["tests"]:
                t, p = o["tests"][name], _adj(doc, "organizer", task, name)
                fig = f"{_pm(t)} points"
                if name == "organizer - random layout":
                    lo, hi = o["percentile_ci"]
                    fig += f"; percentile rank {o['percentile']:.0f} [{lo:.0f}, {hi:.0f}] of {len(o['set'])}"
                if name == "organizer - remove-only" and t["sd"] == 0 and t["mean"] == 0:
                    fig = "the organizer inserts nothing here"
                rows.append((claim, TASK_NAMES[task], fig, p, _call(t, p)))
    for task, i in sec.get("insertions", {}).items():
        s = i["spearman"]["gain within a stage"]
        verdict = ("supported" if s["lo"] > 0 else "contradicted" if s["hi"] < 0 else
                   "not supported (the interval includes 0)")
        rows.append(("a larger gain gives a larger accuracy gain at a fixed stage (Table 2, stage confound removed)",
                     TASK_NAMES[task], f"Spearman {s['rho']:+.2f} [{s['lo']:+.2f}, {s['hi']:+.2f}]", float("nan"),
                     verdict))
        g, st = i["spearman"]["gain"], i["spearman"]["earlier stage"]
        rows.append(("gain predicts the accuracy change better than the stage index",
                     TASK_NAMES[task], f"Spearman gain {g['rho']:+.2f}, earlier stage {st['rho']:+.2f}",
                     float("nan"), "supported" if g["rho"] > st["rho"] and g["lo"] > st["rho"] else
                     "not supported" if g["rho"] <= st["rho"] else "not resolved (intervals overlap)"))
    for task, d in sec.get("decomposer", {}).items():
        for name, claim in (("decompose (LS) - thinner net", "the 3DRF-kept decomposition (least squares, "
                                                             "distilled) beats a thinner standard net at equal MACs"),
                            ("decompose (LS) - Tucker-2", "... beats a Tucker-2 low-rank factorisation at equal MACs"),
                            ("decompose (LS) - torch-pruning L1", "... beats torch-pruning L1 at equal MACs"),
                            ("decompose (LS) - fxrf.prune", "... beats fxrf.prune at equal MACs"),
                            ("decompose (LS) - decompose, scratch", "least-squares transfer + distillation beats "
                                                                    "training the decomposed net from scratch"),
                            ("decompose (LS) - decompose, random init", "... beats random init + the same "
                                                                        "distillation (transfer, not distillation)"),
                            ("decompose (LS) - decompose (SVD)", "least-squares transfer beats SVD transfer "
                                                                 "(both distilled)")):
            if name in d["tests"]:
                t, p = d["tests"][name], _adj(doc, "decomposer", task, name)
                rows.append((claim, TASK_NAMES[task], f"{_pm(t)} points", p, _call(t, p)))
    return rows


def verdict_table(doc: dict) -> str:
    lines = ["| claim | task | figure (mean difference, 95% t-interval over seeds) | Holm p | verdict |",
             "|---|---|---|---|---|"]
    for claim, task, fig, p, v in verdicts(doc):
        lines.append(f"| {claim} | {task} | {fig} | {_p(p)} | **{v}** |")
    return "\n".join(lines)


def _layout(key: str) -> str:
    return key.replace(" scaled ", ", widths ")


def organizer_md(doc: dict, task: str, o: dict) -> list:
    out = [f"### Organizer, {TASK_NAMES[task]}", "",
           f"{o['what']}. {o.get('seeds', doc['seeds'])} paired seeds. Early stopping: at most {o['cap']} epochs, "
           f"patience {o['patience']}; "
           f"{100 * o['stopped_at_cap']:.0f}% of runs kept their last allowed epoch. The organizer (defaults) turns "
           f"(2, 2, 2, 2) into **{tuple(json.loads(o['arms']['organizer'].replace('(', '[').replace(')', ']')))}** "
           f"({', '.join(o['changes']) or 'no change'}); it has {o['count']} convs, and {o['n_equal']} layouts with "
           f"1-4 convs per stage have as many ({len(o['set']) - 1} of them trained here, a fixed random sample where "
           f"there are more).", ""]
    out += ["| layout | role | params | sum of gains | test % (mean ± sd) |", "|---|---|---|---|---|"]
    acc = {k: [r["test"] for r in v] for k, v in o["runs"].items()}
    keys = list(o["set"]) + [k for k in o["arms"].values() if k not in o["set"]]
    for k in sorted(keys, key=lambda k: -_mean(acc[k])):
        role = ", ".join(n for n, v in o["arms"].items() if v == k) or "same count"
        gain = o["gains"].get(k)
        out.append(f"| {_layout(k)} | {role} | {o['params'].get(k, '-')} | "
                   f"{'-' if gain is None else f'{gain:.2f}'} | {_mean(acc[k]):.2f} ± {_sd(acc[k]):.2f} |")
    lo, hi = o["percentile_ci"]
    out += ["", f"Percentile rank of the organizer's layout among the {len(o['set'])} equal-count layouts "
                f"trained (by mean test accuracy): **{o['percentile']:.0f}** (95% bootstrap over seeds [{lo:.0f}, "
                f"{hi:.0f}]). Kendall tau of mean accuracy over those layouts: "
                + ", ".join(f"{k} {v:+.2f}" for k, v in o["kendall"].items()) + ".", "",
            "| comparison (paired over seeds) | difference, points | wins/losses | Holm p |", "|---|---|---|---|"]
    for name, t in o["tests"].items():
        out.append(f"| {name} | {_pm(t)} | {t['wins']}/{t['losses']} | {_p(_adj(doc, 'organizer', task, name))} |")
    return out + [""]


def insertions_md(doc: dict, task: str, i: dict) -> list:
    out = [f"### Insertions (Table 2 without the stage confound), {TASK_NAMES[task]}", "",
           f"{i['what']}. Baseline (1, 1, 2, 2); one conv + BN + ReLU inserted at the end of stage s "
           f"(k: kernel, d: dilation).", "",
           "| stage | k | d | gain | params | Δ test % (mean ± 95% CI) |", "|---|---|---|---|---|---|"]
    for v, d in zip(i["variants"], i["delta"]):
        s, k, dil = json.loads(v.replace("(", "[").replace(")", "]"))
        info = i["info"][v]
        from scipy import stats
        m, sd = _mean(d), _sd(d)
        ci = stats.t.ppf(0.975, len(d) - 1) * sd / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        out.append(f"| {s} | {k} | {dil} | {info['gain']:.3f} | {info['params']} | {m:+.2f} ± {ci:.2f} |")
    out += ["", "| predictor of Δ accuracy | Spearman rho | 95% bootstrap over seeds |", "|---|---|---|"]
    for name, s in i["spearman"].items():
        out.append(f"| {name} | {s['rho']:+.2f} | [{s['lo']:+.2f}, {s['hi']:+.2f}] |")
    out += ["", "Equal params, unequal gain: kernel 3 dilated 2 minus kernel 3, per stage:", "",
            "| stage | gains (d2, d1) | Δ accuracy d2 - d1 |", "|---|---|---|"]
    for s, t in i["dilated - plain"].items():
        out.append(f"| {s} | {t['gain'][0]:.3f}, {t['gain'][1]:.3f} | {_pm(t)} |")
    return out + [""]


def decomposer_md(doc: dict, task: str, d: dict) -> list:
    rows = d["rows"]
    out = [f"### Decomposer at equal MACs, {TASK_NAMES[task]}", "",
           f"{d['what']}. Teacher test accuracy {_mean(d['teacher']):.2f} ± {_sd(d['teacher']):.2f}; target MACs "
           f"{d['target']:.3f} of the teacher's (DW+PW's). Every distilled arm gets the same distillation "
           f"(fxrf.distill, lr 1e-3, T 4, 10% of the batches held out to keep the best state).", "",
           "| arm | MACs | params | after transfer/calibration | after distillation | from scratch |",
           "|---|---|---|---|---|---|"]
    for arm in d["final"]:
        vals = [r[arm] for r in rows]

        def col(key):
            xs = [v[key] for v in vals if key in v]
            return f"{_mean(xs):.2f} ± {_sd(xs):.2f}" if xs else "-"
        out.append(f"| {arm} | {_mean([v['macs'] for v in vals]):.3f} | {_mean([v['params'] for v in vals]):.3f} "
                   f"| {col('calibrated')} | {col('distilled')} | {col('scratch')} |")
    out += ["", "| comparison (final figures, paired over seeds) | difference, points | wins/losses | Holm p |",
            "|---|---|---|---|"]
    for name, t in d["tests"].items():
        out.append(f"| {name} | {_pm(t)} | {t['wins']}/{t['losses']} | {_p(_adj(doc, 'decomposer', task, name))} |")
    return out + [""]


def render(doc: dict) -> str:
    v = doc.get("versions", {})
    secs = doc.get("seconds", {})
    out = ["# Accuracy: does the 3DRF decide better than simple rules?", "",
           "Generated by `benchmarks/evidence.py` (round two) and `benchmarks/accuracy.py` (round one, below); do "
           "not edit by hand.", "",
           "## Round two: verdicts", "",
           f"Mode **{doc['mode']}**, {doc['seeds']} paired seeds, started {doc['started']}, finished "
           f"{doc.get('finished', '?')}; {doc.get('threads', 1)} torch thread(s) per process"
           + (f", {doc['processes']} processes side by side" if doc.get("processes") else "") + ". Versions: "
           + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ". Wall times (s): "
           + ", ".join(f"{k} {s}" for k, s in secs.items()) + ".", "",
           "Reproduce: `python benchmarks/evidence.py` (the wall times above were taken with four processes and other "
           "jobs sharing two cores; `--tasks` and `--json` split a run over processes, `--merge` joins them), "
           "`--quick` for under 3 minutes; `python benchmarks/evidence.py "
           "--render docs/evidence.json` renders this page again.", "",
           "Protocol: every run stops early on a validation split carved from its training data (the test set is "
           "read once, at the state kept); seeds are paired (split, batch order, initialisation); every arm of a "
           "comparison has the same hyperparameters. The primary comparisons, named before the run "
           "(organizer - remove-only and organizer - random layout on each task, decompose (LS) - thinner net on "
           "each task), are Holm-corrected together; every other p-value is Holm-corrected over the whole run. A verdict is "
           f"\"supported\" when the corrected p is below {ALPHA} and the difference is positive.", "",
           verdict_table(doc), "",
           "Not measured in round two: the 3DRF as a zero-cost proxy (round one below: partial tau -0.07 at fixed "
           "params and kind, one seed), an RPW configuration that keeps the 3DRF, and a same-MACs (rather than "
           "same-count) ranking of layouts.", ""]
    out += DEFAULTS
    for task, o in doc["sections"].get("organizer", {}).items():
        out += organizer_md(doc, task, o)
    for task, i in doc["sections"].get("insertions", {}).items():
        out += insertions_md(doc, task, i)
    for task, d in doc["sections"].get("decomposer", {}).items():
        out += decomposer_md(doc, task, d)
    return "\n".join(out) + "\n"


# What changed in fxrf because of the figures above (kept with the renderer so that the page says it next to them).
DEFAULTS = [
    "### What changed in fxrf because of these figures", "",
    "- **The reports say it.** `fxrf optimize` (and `fxrf.optimize(...)`'s summary text) prints an evidence line "
    "under the organizer's and the decomposer's changes (`fxrf.optimize_report.EVIDENCE`): the organizer's layout "
    "was not resolved better than a random one with as many convs and its insertions added nothing resolved over its "
    "removals; at a decomposition's MACs, `fxrf.prune` and a thinner standard net were as accurate or more. "
    "`tests/test_evidence.py` checks those lines against `docs/evidence.json`.",
    "- **Least-squares transfer stays the workflow's transfer** (`fxrf.optimize(calibration=...)`, `fxrf optimize "
    "--calibrate`): with the same short distillation it beat SVD transfer by 24-50 points and random init by 27-70 "
    "points, and training the decomposed net from scratch on the digits (+4.7).",
    "- **Not changed: the organizer's default mode** (greedy, insertions included). Insertion added nothing "
    "resolved, but remove-only was not resolved better either (digits: organizer - remove-only -0.54 ± 1.17, "
    "same-distance +3.56 ± 7.24), so no other default is supported by the figures; the report line says so "
    "instead. On the same-distance task, where the receptive field matters by construction, the organizer's layout "
    "ranked first of the four trained (+11.0 ± 7.4 points over their mean, raw p 0.008, Holm p 0.06): the "
    "one hint in its favour, to be settled with more layouts and seeds.",
    "- **No `Analysis.score`.** At a fixed stage the gain did not predict the accuracy change (Spearman -0.13 on "
    "both tasks), and a dilated insertion (twice the gain, equal params) was never better than the plain one (worse "
    "on MNIST-1D: -1.5 points at stages 0 and 1): there is no 3DRF score with a measured correlation to expose.",
    "- **Pruning over decomposition for accuracy at equal MACs**: docs/pruning.md's finding (fxrf.prune ahead of "
    "the decomposition after calibration) holds here with early stopping and equal distillation: +3.1 points on the "
    "same-distance task, no resolved difference on the digits.", ""]


DOC = os.path.join(ROOT, "docs", "accuracy.md")


def combine(round_two: str, round_one: str) -> str:
    """docs/accuracy.md: round two first, then round one under its own heading (its title dropped)."""
    return round_two + "\n# Round one\n" + round_one.split("\n", 1)[1]


def write(doc: dict, md: str) -> None:
    """Round two, then (for docs/accuracy.md) round one rendered from docs/accuracy.json."""
    text = render(doc)
    round_one = os.path.join(ROOT, "docs", "accuracy.json")
    if os.path.abspath(md) == DOC and os.path.exists(round_one):
        import accuracy
        with open(round_one) as f:
            old = json.load(f)
        text = combine(text, accuracy.render(old, os.path.join(ROOT, "docs", "img"), "img"))
    os.makedirs(os.path.dirname(os.path.abspath(md)), exist_ok=True)
    with open(md, "w") as f:
        f.write(text)
