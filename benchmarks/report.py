"""How the benchmark scripts render their figures: fixed-width text for the terminal, Markdown for docs/, a plot.

bench_models.py renders a run (its JSON document) with `print_tables`, `markdown` and `plot`; analysis_speed.py
formats its milliseconds with `fmt_ms`.
"""
from __future__ import annotations

import sys


def fmt_ms(s: float) -> str:
    """Seconds as milliseconds in 10 characters: one decimal from 0.1 s up, two below."""
    return f"{s * 1e3:10.1f}" if s >= 0.1 else f"{s * 1e3:10.2f}"


def _si(n) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def print_tables(doc: dict, target: tuple, out=sys.stdout) -> None:
    """The run as text: one table per (device, batch), the rewrites, the pairs, pending and failed models, the
    checks (`target`: the (device, mode, batch) the checks are stated for)."""
    results = [r for r in doc["results"] if "median_ms" in r]
    for device in sorted({r["device"] for r in results}):
        for batch in sorted({r["batch"] for r in results if r["device"] == device}):
            print(f"\n## {device}, batch {batch}  (latency per call in ms: median [p10-p90]; throughput in images/s)",
                  file=out)
            print(f"{'model':<26}{'params':>9}{'MACs/img':>10}  {'eager ms':>22}{'img/s':>9}  "
                  f"{'compiled ms':>22}{'img/s':>9}{'compile':>9}", file=out)
            for name in doc["models"]:
                e = _row(results, name, device, batch, "eager")
                c = _row(results, name, device, batch, "compile")
                if e is None and c is None:
                    continue
                any_ = e or c
                print(f"{name:<26}{_si(any_['params']):>9}{_si(any_['macs']):>10}  {_lat(e):>22}{_thr(e):>9}  "
                      f"{_lat(c):>22}{_thr(c):>9}{(str(c['compile_s']) + ' s') if c else '-':>9}", file=out)
    rw = doc["rewrites"]
    if rw:
        print("\n## rewrites: ideal = MACs reduction, speedup = latency(base) / latency(rewrite), "
              "realized = speedup / ideal", file=out)
        print(f"{'rewrite':<26}{'base':<11}{'device':<7}{'batch':>6} {'mode':<8}{'ideal':>8}{'speedup':>9}"
              f"{'realized':>10}", file=out)
        for r in sorted(rw, key=lambda r: (r["device"], r["batch"], r["mode"], doc["models"].index(r["model"]))):
            print(f"{r['model']:<26}{r['base']:<11}{r['device']:<7}{r['batch']:>6} {r['mode']:<8}"
                  f"{r['macs_reduction']:>7.2f}x{r['speedup']:>8.2f}x{r['realized']:>10.2f}", file=out)
    if doc["paired"]:
        print("\n## timed in alternation (compiled): median latency of a / median latency of b", file=out)
        for q in doc["paired"]:
            print(f"{q['a']} / {q['b']} ({q['device']}, batch {q['batch']}, {q['n']} pairs): "
                  f"{q['a_ms']:.2f} / {q['b_ms']:.2f} ms = {q['ratio']:.3f} (ratio of minima {q['ratio_of_mins']:.3f})",
                  file=out)
    for line in extra_text(doc):
        print(line, file=out)
    if doc["pending"]:
        print("\n## pending", file=out)
        for p in doc["pending"]:
            print(f"{p['model']}: pending ({p['why']})", file=out)
    for f in doc["failed"]:
        print(f"FAILED {f['model']}: {f['why']}", file=out)
    print("\n## checks", file=out)
    if not doc["checks"]:
        print(f"(none: the targets are stated for {target[0]}, torch.compile, batch {target[2]}, "
              f"which this run did not measure)", file=out)
    for c in doc["checks"]:
        print(f"{'ok' if c['ok'] else 'MISSED':<7}{c['check']}: {c['value']} ({c['detail']})", file=out)


def markdown(doc: dict) -> str:
    """The run as Markdown: machine, command, one table per (device, batch), the rewrites, the pairs, the checks."""
    m, c = doc["machine"], doc["config"]
    lines = [f"Command: `{doc['command']}`", "",
             f"Machine: {m.get('cpu_model')}, {m['cpu_count']} cores ({m.get('cpu_capability')}), "
             f"{c.get('threads', m['torch_threads'])} torch thread(s)"
             + (f"; GPU {m['gpu']} ({m['gpu_memory_gib']} GiB), CUDA {m['cuda']}, cuDNN {m['cudnn']}" if "gpu" in m
                else "")
             + f"; Python {m['python']}, torch {m['torch']}, torchvision {m.get('torchvision', '?')}; "
               f"{m['platform']}. Load average at start {doc.get('load_average_start')}, "
               f"at end {doc.get('load_average_end')}.", "",
             f"Timing: {c['warmup']}+ warm-up calls, then up to {c['iters']} timed calls or {c['budget_s']} s "
             f"(at least {c['min_iters']}); compile: torch.compile(backend=fxrf, inner inductor, mode "
             f"{c['mode'] or 'default'}, dynamic=False), graph passes {c.get('backend_passes')}, inductor options "
             f"{c['inductor'] or 'default'}, caches {'off (cold compiles)' if c.get('cold') else 'on'}.", ""]
    results = [r for r in doc["results"] if "median_ms" in r]
    for device in sorted({r["device"] for r in results}):
        for batch in sorted({r["batch"] for r in results if r["device"] == device}):
            lines += [f"#### {device}, batch {batch}", "",
                      "| model | params | MACs/img | eager ms, median [p10-p90] | eager img/s "
                      "| compiled ms, median [p10-p90] | compiled img/s | compile s |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for name in doc["models"]:
                e = _row(results, name, device, batch, "eager")
                cc = _row(results, name, device, batch, "compile")
                if e is None and cc is None:
                    continue
                any_ = e or cc
                lines.append(f"| {name} | {_si(any_['params'])} | {_si(any_['macs'])} | {_lat(e)} | {_thr(e)} "
                             f"| {_lat(cc)} | {_thr(cc)} | {cc['compile_s'] if cc else '-'} |")
            lines.append("")
    if doc["rewrites"]:
        lines += ["#### Rewrites: realized speedup against the MACs reduction", "",
                  "ideal = MACs(base) / MACs(rewrite); speedup = median latency(base) / median latency(rewrite); "
                  "realized = speedup / ideal.", "",
                  "| rewrite | base | device | batch | mode | ideal | speedup | realized |",
                  "|---|---|---|---:|---|---:|---:|---:|"]
        for r in sorted(doc["rewrites"], key=lambda r: (r["device"], -r["batch"], r["mode"] != "compile",
                                                         doc["models"].index(r["model"]))):
            lines.append(f"| {r['model']} | {r['base']} | {r['device']} | {r['batch']} | {r['mode']} "
                         f"| {r['macs_reduction']:.2f}x | {r['speedup']:.2f}x | {r['realized']:.2f} |")
        lines.append("")
    if doc.get("paired"):
        lines += ["#### Timed in alternation (compiled): DW+RPW against DW+GPW, latency-aware auto against the others",
                  "",
                  "| a | b | device | batch | pairs | a ms | b ms | a / b | ratio of minima |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for q in doc["paired"]:
            lines.append(f"| {q['a']} | {q['b']} | {q['device']} | {q['batch']} | {q['n']} | {q['a_ms']:.2f} "
                         f"| {q['b_ms']:.2f} | {q['ratio']:.3f} | {q['ratio_of_mins']:.3f} |")
        lines.append("")
    lines += extra_markdown(doc)
    for p in doc["pending"]:
        lines.append(f"- {p['model']}: pending ({p['why']})")
    for f in doc["failed"]:
        lines.append(f"- FAILED {f['model']}: {f['why']}")
    if doc["checks"]:
        lines += ["#### Checks", ""] + [f"- **{'ok' if q['ok'] else 'MISSED'}** {q['check']}: {q['value']} "
                                        f"({q['detail']})" for q in doc["checks"]] + [""]
    return "\n".join(lines)


def _row(results, name, device, batch, mode):
    return next((r for r in results if (r["model"], r["device"], r["batch"], r["mode"]) == (name, device, batch, mode)),
                None)


def _lat(r) -> str:
    if r is None:
        return "-"
    return f"{r['median_ms']:.2f} [{r['p10_ms']:.2f}-{r['p90_ms']:.2f}]"


def _thr(r) -> str:
    return "-" if r is None else f"{r['throughput']:.0f}"


def plot(doc: dict, path: str, target: tuple) -> None:
    """Realized speedup against the MACs reduction per rewrite (the points of `target`'s mode at the largest
    batch named), and the median latencies per model at the largest batch; one row of two panels per device."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rw = doc["rewrites"]
    results = [r for r in doc["results"] if "median_ms" in r]
    devices = sorted({r["device"] for r in results})
    fig, axes = plt.subplots(len(devices), 2, figsize=(13, 5.2 * len(devices)), squeeze=False)
    for row, device in zip(axes, devices):
        ax = row[0]
        pts = [r for r in rw if r["device"] == device]
        top = max([r["macs_reduction"] for r in pts] + [r["speedup"] for r in pts] + [2.0]) * 1.3
        lo = min([r["macs_reduction"] for r in pts] + [r["speedup"] for r in pts] + [1.0]) / 1.3
        ax.plot([lo, top], [lo, top], color="0.5", lw=1, label="speedup = MACs reduction (ideal)")
        ax.plot([lo, top], [lo / 2, top / 2], color="0.5", lw=1, ls="--", label="half the MACs reduction")
        styles = {("eager", 1): ("o", "tab:blue"), ("eager", 32): ("o", "tab:orange"),
                  ("compile", 1): ("s", "tab:green"), ("compile", 32): ("s", "tab:red")}
        for (mode, batch) in sorted({(r["mode"], r["batch"]) for r in pts}):
            sel = [r for r in pts if (r["mode"], r["batch"]) == (mode, batch)]
            marker, color = styles.get((mode, batch), ("^", None))
            ax.scatter([r["macs_reduction"] for r in sel], [r["speedup"] for r in sel], marker=marker, color=color,
                       label=f"{'torch.compile' if mode == 'compile' else 'eager'}, batch {batch}", zorder=3)
            if (mode, batch) == (target[1], max(r["batch"] for r in pts)):
                for r in sel:
                    ax.annotate(r["model"].split("/")[-1], (r["macs_reduction"], r["speedup"]), fontsize=7,
                                xytext=(4, -3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, top)
        ax.set_ylim(lo / 2, top)
        ax.set_xlabel("MACs reduction vs base (ideal speedup)")
        ax.set_ylabel("realized speedup vs base (median latency)")
        ax.set_title(f"{device}: what the rewrites buy")
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(True, which="both", alpha=0.3)
        ax = row[1]
        batch = max(r["batch"] for r in results if r["device"] == device)
        names = [n for n in doc["models"] if _row(results, n, device, batch, "eager") or
                 _row(results, n, device, batch, "compile")]
        ys = range(len(names))
        for off, mode, color in ((-0.2, "eager", "tab:orange"), (0.2, "compile", "tab:red")):
            vals = [(_row(results, n, device, batch, mode) or {}).get("median_ms", 0) for n in names]
            ax.barh([y + off for y in ys], vals, height=0.4, color=color,
                    label="torch.compile (fxrf -> inductor)" if mode == "compile" else "eager")
            for y, v in zip(ys, vals):
                if v:
                    ax.text(v, y + off, f" {v:.1f}", va="center", fontsize=6)
        allv = [r["median_ms"] for r in results if r["device"] == device and r["batch"] == batch]
        ax.set_yticks(list(ys))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(min(allv) / 2, max(allv) * 3)
        ax.set_xlabel(f"median latency per call, ms (batch {batch})")
        ax.set_title(f"{device}, batch {batch}")
        ax.legend(fontsize=7)
        ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------- auto objectives, predictions, roofline, RPW


def _auto_rows(doc) -> list:
    seen, out = set(), []
    for r in doc["results"]:
        if r.get("assignment") is not None and (r["model"], r["batch"]) not in seen:
            seen.add((r["model"], r["batch"]))
            out.append(r)
    return out


def _verified(v) -> str:
    if not v:
        return "-"
    return v["chosen"] + " (" + ", ".join(f"{k} {m['ms']:.2f}" for k, m in v["models"].items()) + ")"


def _tables(doc) -> list:
    """(title, header, rows) of the objective, prediction, roofline and RPW sections present in the run."""
    out = []
    auto = _auto_rows(doc)
    if auto:
        out.append(("recipe=\"auto\": what each objective chose (stage by stage; S: kept), priced by the latency "
                    "model (compiled, this device and batch)",
                    ["model", "batch", "MACs/img", "assignment (stages separated by /)", "sum conv ms", "sum block ms", "timings made",
                     "quality", "whole-model check: kept (ms of each, compiled, in alternation)"],
                    [[r["model"], r["batch"], _si(r["macs"]), " / ".join(" ".join(b) for b in r["assignment"]),
                      f"{r['latency_model']['conv_ms']:.2f}", f"{r['latency_model']['block_ms']:.2f}",
                      r["timings_made"], r["quality"], _verified(r.get("verified"))] for r in auto]))
    if doc.get("noise"):
        out.append(("timing noise: a model against a second compiled instance of itself (deep copy, compiled "
                    "again), in alternation; what a ratio between two models cannot resolve here",
                    ["model", "batch", "pairs", "a ms", "b ms", "a / b"],
                    [[q["model"], q["batch"], q["n"], f"{q['a_ms']:.2f}", f"{q['b_ms']:.2f}", f"{q['ratio']:.3f}"]
                     for q in doc["noise"]]))
    if doc.get("predictions"):
        out.append(("latency model against the measured model, from the measured base and the convs' and blocks' "
                    "times alone at their sites: additive = base - sum over the replaced convs of (conv time - block "
                    "time); scaled = base * (1 - that saving / sum of every eligible conv's time); error = "
                    "predicted / measured - 1",
                    ["model", "batch", "mode", "base ms", "all convs ms", "replaced convs ms", "blocks ms",
                     "additive ms", "error", "scaled ms", "error", "measured ms", "all convs / base"],
                    [[q["model"], q["batch"], q["mode"], f"{q['base_ms']:.2f}", f"{q.get('all_convs_ms', 0):.2f}",
                      f"{q['convs_ms']:.2f}", f"{q['blocks_ms']:.2f}", f"{q['predicted_ms']:.2f}",
                      f"{q['error']:+.1%}", f"{q.get('scaled_ms', 0):.2f}", f"{q.get('scaled_error', 0):+.1%}",
                      f"{q['measured_ms']:.2f}", f"{q['sites_share_of_base']:.2f}"] for q in doc["predictions"]]))
    if doc.get("roofline"):
        pk = doc.get("peaks") or {}
        out.append((f"roofline per site and block (compiled; peaks measured here: "
                    f"{pk.get('flops_per_s', 0) / 1e9:.1f} GFLOP/s fp32 matmul {pk.get('matmul_n')}, "
                    f"{pk.get('bytes_per_s', 0) / 1e9:.1f} GB/s copy of {pk.get('copy_mib')} MiB; bytes: every conv "
                    f"and copy reads its input and weights and writes its output once, norms/activations fused)",
                    ["batch", "site", "block", "MACs", "MB", "FLOP/B", "compute ms", "memory ms", "bound",
                     "measured ms", "measured / bound"],
                    [[q["batch"], q["conv"], q["recipe"], _si(q["macs"]), f"{q['bytes'] / 1e6:.2f}",
                      f"{q['intensity']:.1f}", f"{q['compute_ms']:.3f}", f"{q['memory_ms']:.3f}", q["bound"],
                      f"{q['measured_ms']:.3f}", f"{q['measured_over_bound']:.1f}"] for q in doc["roofline"]]))
    if doc.get("rpw_variants"):
        out.append(("DW+RPW rotation, each way compiled alone: a producer (grouped 1x1 + BN + ReLU) and one DW + "
                    "grouped-PW block, the ways of one shape timed in alternation; ms = minimum; vs none = ms / ms "
                    "without rotation (DW+GPW); unfused floor = (none + one read and one write of the activation at "
                    "the copy bandwidth) / none",
                    ["batch", "channels", "px", "G", "shift", "way", "ms", "median ms", "vs none", "unfused floor",
                     "= eager"],
                    [[q["batch"], q["channels"], q["px"], q["groups"], q["shift"], q["way"], f"{q['ms']:.3f}",
                      f"{q.get('median_ms', q['ms']):.3f}",
                      f"{q['vs_none']:.3f}", f"{q['unfused_floor_ratio']:.3f}", q["matches_eager"]]
                     for q in doc["rpw_variants"]]))
    return out


def extra_text(doc) -> list:
    lines = []
    for title, header, rows in _tables(doc):
        cells = [[str(c) for c in r] for r in [header] + rows]
        w = [max(len(r[i]) for r in cells) for i in range(len(header))]
        lines += ["", f"## {title}"] + ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in cells]
    return lines


def extra_markdown(doc) -> list:
    lines = []
    for title, header, rows in _tables(doc):
        lines += [f"#### {title[0].upper() + title[1:]}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]
    return lines
