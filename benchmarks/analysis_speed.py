"""How long fxrf takes to analyse a real network, next to running it once.

Measured, on torchvision resnet50 (random weights, eval mode), at 224 px and at 1024 px:

* ``fxrf.analyze(model, (1, 3, S, S))`` from the ``nn.Module``: symbolic tracing, shape propagation and the
  3DRF walk -- what a user pays for a first look at a model;
* ``fxrf.analyze(gm, (1, 3, S, S))`` from a GraphModule traced once beforehand (``gm = fxrf.trace(model, ...)``,
  outside the timing): shape propagation and the walk only -- what a compiler pass pays when it already holds a
  graph;
* one eager CPU forward (``torch.no_grad()``, batch 1), the yardstick: the 224 px forward is the reference every
  ratio is taken against, the 1024 px forward is printed for scale;
* ``torchscan.summary(model, (3, S, S), receptive_field=True)``, a hook-based tool that gets its receptive fields
  by running a forward (its printout is swallowed).

Why: fxrf never runs the model. Every node's output shape and receptive field follow from closed-form rules over
shapes (kernel, stride, padding, dilation, groups), so the cost of an analysis must depend on the number of nodes in
the graph, not on the number of pixels (the one place resolution leaks in: a stage field's exact tap sets are
boolean rows 2w-1 wide for a w-pixel stage map; the 1.3x target below bounds that). A forward (and so any
hook-based tool) grows with the resolution -- about 20x more pixels at 1024 px than at 224 px. The targets checked
below encode that:

* from the GraphModule, the analysis takes at most 0.1x one 224 px forward;
* from the nn.Module (tracing included), at most 0.5x one 224 px forward;
* at 1024 px, each path takes at most 1.3x its own 224 px time (cost flat in the resolution).

Each measured callable is warmed up (``--warmup`` calls at least, more until two consecutive calls agree within
25%: a CPU forward's first calls are many times slower than the rest), then timed ``--repeat`` times
(``--repeat-slow`` times when the last warm-up call took longer than --slow-s seconds, e.g. the 1024 px forward and
torchscan); the median is the figure, min and max show the spread. The garbage collector stays on (as in real
use) and is run before each item. torch's thread count is left at its default (or set by --threads) and printed.
The warm-up and timing loop is benchmarks/timing.py's, shared with bench_models.py.

    python benchmarks/analysis_speed.py                    # the table, a minute or two on a laptop CPU
    python benchmarks/analysis_speed.py --json speed.json  # also write the figures
    python benchmarks/analysis_speed.py --profile 25       # plus a cProfile of analyze(gm) at 224 px
    OMP_NUM_THREADS=1 python benchmarks/analysis_speed.py --threads 1 --no-torchscan   # all on one thread

Exit status 0 unless --strict is given and a target is missed.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import sys
from typing import Callable

import torch

import fxrf
from report import fmt_ms
from timing import load_average, machine, time_calls, warm_up

SIZES = (224, 1024)
REF = 224  # the forward every ratio is taken against
TORCHSCAN_MISSING = "torchscan not installed (pip install torchscan)"
EXTRA_WARMUP = 5  # further warm-up calls allowed while timings have not settled


def _load() -> float | None:
    load = load_average()
    return None if load is None else load[0]


# (key of the measured item, limit on its ratio, description); ratios are to the 224 px forward
RATIO_TARGETS = [("fxrf_graph_224", 0.1, "analyze(GraphModule) @224 <= 0.1x forward@224"),
                 ("fxrf_module_224", 0.5, "analyze(nn.Module)   @224 <= 0.5x forward@224")]
# (path, limit on time@1024 / time@224, description)
SCALE_TARGETS = [("fxrf_graph", 1.3, "analyze(GraphModule) @1024 <= 1.3x @224"),
                 ("fxrf_module", 1.3, "analyze(nn.Module)   @1024 <= 1.3x @224")]


def measure(fn: Callable[[], object], repeat: int, repeat_slow: int, slow_s: float, warmup: int) -> dict:
    """Warm `fn` up, then time `repeat` calls (`repeat_slow` if the last warm-up call took longer than `slow_s`).

    Warm-up runs at least `warmup` calls and goes on (up to `EXTRA_WARMUP` more) until two consecutive calls agree
    within 25%: a CPU forward's first calls cost many times the steady state (oneDNN primitive creation, allocator
    growth), two calls are not always enough."""
    gc.collect()
    last = warm_up(fn, max(warmup, 1), EXTRA_WARMUP)
    n = repeat_slow if last[-1] > slow_s else repeat
    times = time_calls(fn, max(n, 1))
    return {"n": len(times), "warmup_calls": len(last), "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "times_s": times}


def torchscan_callable(model, size):
    """torchscan.summary with its printout swallowed, or None when torchscan cannot be imported."""
    try:
        import torchscan
    except ImportError:
        return None

    def run():
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            torchscan.summary(model, (3, size, size), receptive_field=True)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=20, help="timed repetitions of a fast item (default 20)")
    p.add_argument("--repeat-slow", type=int, default=5,
                   help="timed repetitions of an item whose warm-up call exceeds --slow-s (default 5)")
    p.add_argument("--slow-s", type=float, default=0.5, help="warm-up time above which an item is slow (0.5 s)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed warm-up calls per item, at least (default 2; more until two agree within 25%%)")
    p.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    p.add_argument("--no-torchscan", action="store_true", help="skip the torchscan rows")
    p.add_argument("--profile", type=int, metavar="N", default=0,
                   help="print the N most expensive functions (cumulative) of analyze(gm) at 224 px")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default 0: torch's default); 1 puts the forward on the analysis' one thread")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import torchvision

    info = machine()
    load_start = _load()
    print(f"machine: processor={info['processor']!r} cpu_count={info['cpu_count']} {info['cpu_model'] or ''} | "
          f"{info['platform']}")
    print(f"python {info['python']}, torch {info['torch']}, torchvision {torchvision.__version__}, "
          f"fxrf {info['fxrf']}; torch threads {torch.get_num_threads()} (interop {info['torch_interop_threads']}, "
          f"{'--threads' if args.threads else 'default, not changed'})")
    print(f"timing: warm-up >= {args.warmup} calls (until stable), then median of {args.repeat} runs "
          f"({args.repeat_slow} for items slower than {args.slow_s} s)", flush=True)

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    rows: dict[str, dict] = {}  # key -> {"label", "size", stats... } or {"label", "size", "note"}

    def add(key, label, size, fn):
        print(f"  measuring {label} @{size} ...", file=sys.stderr, flush=True)
        try:
            rows[key] = {"label": label, "size": size,
                         **measure(fn, args.repeat, args.repeat_slow, args.slow_s, args.warmup)}
        except Exception as e:  # keep going: one broken row must not hide the others
            rows[key] = {"label": label, "size": size, "note": f"failed: {type(e).__name__}: {e}"}

    nodes = {}
    for size in SIZES:
        shape = (1, 3, size, size)
        add(f"fxrf_module_{size}", "fxrf.analyze(nn.Module), trace incl.", size,
            lambda shape=shape: fxrf.analyze(model, shape))
        gm = fxrf.trace(model, shape)  # once, outside the timing
        nodes[size] = len(gm.graph.nodes)
        add(f"fxrf_graph_{size}", "fxrf.analyze(GraphModule)", size, lambda gm=gm, shape=shape: fxrf.analyze(gm, shape))

    for size in SIZES:
        x = torch.randn(1, 3, size, size)

        def forward(x=x):
            with torch.no_grad():
                model(x)
        add(f"forward_{size}", "eager forward, no_grad (reference)" if size == REF else "eager forward, no_grad",
            size, forward)

    for size in SIZES:
        key, label = f"torchscan_{size}", "torchscan.summary(receptive_field)"
        fn = None if args.no_torchscan else torchscan_callable(model, size)
        if args.no_torchscan:
            rows[key] = {"label": label, "size": size, "note": "skipped (--no-torchscan)"}
        elif fn is None:
            rows[key] = {"label": label, "size": size, "note": TORCHSCAN_MISSING}
        else:
            add(key, label, size, fn)

    ref = rows.get(f"forward_{REF}", {}).get("median_s")
    print("\nresnet50 (torchvision, random weights, eval), batch 1; fxrf graph: "
          + ", ".join(f"{n} nodes @{s}" for s, n in nodes.items()))
    head = f"{'item':<38} {'size':>5} {'n':>3} {'median ms':>10} {'min ms':>10} {'max ms':>10} {'x fwd@224':>10}"
    print(head)
    print("-" * len(head))
    order = [f"{k}_{s}" for k in ("fxrf_graph", "fxrf_module", "forward", "torchscan") for s in SIZES]
    for key in order:
        r = rows[key]
        if "note" in r:
            print(f"{r['label']:<38} {r['size']:>5}   {r['note']}")
            continue
        r["ratio_to_forward_224"] = r["median_s"] / ref if ref else None
        ratio = f"{r['ratio_to_forward_224']:10.3f}" if ref else f"{'-':>10}"
        print(f"{r['label']:<38} {r['size']:>5} {r['n']:>3} {fmt_ms(r['median_s'])} {fmt_ms(r['min_s'])} "
              f"{fmt_ms(r['max_s'])} {ratio}")

    print("\ntargets (medians; ratios to the 224 px forward)")
    checks = []
    for key, limit, desc in RATIO_TARGETS:
        value = rows[key].get("ratio_to_forward_224")
        checks.append({"target": desc, "value": value, "limit": limit,
                       "ok": value is not None and value <= limit})
    for path, limit, desc in SCALE_TARGETS:
        lo, hi = rows[f"{path}_{SIZES[0]}"].get("median_s"), rows[f"{path}_{SIZES[1]}"].get("median_s")
        value = hi / lo if lo and hi else None
        checks.append({"target": desc, "value": value, "limit": limit, "ok": value is not None and value <= limit})
    for c in checks:
        shown = f"{c['value']:.3f}x" if c["value"] is not None else "n/a"
        print(f"  {'ok' if c['ok'] else 'MISSED':<7} {c['target']:<46} measured {shown:>9} (limit {c['limit']}x)")
    fwd_hi = rows.get(f"forward_{SIZES[1]}", {}).get("median_s")
    if ref and fwd_hi:
        print(f"  (for scale: the forward itself grows {fwd_hi / ref:.1f}x from {SIZES[0]} to {SIZES[1]} px)")

    # The multi-threaded forward suffers far more from other processes than the single-threaded analysis, so a
    # busy machine flatters the ratios: say so rather than print a quiet "ok".
    load_end = _load()
    info["load_avg_1min"] = {"start": load_start, "end": load_end}
    warnings = []
    if load_start is not None and load_start > 0.25 * (os.cpu_count() or 1):
        warnings.append(f"the machine was busy before the run (1-min load {load_start:.2f} on {os.cpu_count()} "
                        f"CPUs): the forward slows down most, so the ratios are optimistic")
    noisy = [f"{rows[k]['label'].split(',')[0]} @{rows[k]['size']}" for k in order
             if "note" not in rows[k] and rows[k]["max_s"] > 1.5 * rows[k]["min_s"]]
    if noisy:
        warnings.append("max > 1.5x min (noisy, other load?): " + "; ".join(noisy))
    for w in warnings:
        print(f"  WARNING {w}")

    if args.profile:
        import cProfile
        import pstats
        gm = fxrf.trace(model, (1, 3, REF, REF))
        fxrf.analyze(gm, (1, 3, REF, REF))
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            fxrf.analyze(gm, (1, 3, REF, REF))
        prof.disable()
        print(f"\ncProfile of 5x fxrf.analyze(GraphModule) @{REF} (sorted by cumulative time)")
        pstats.Stats(prof, stream=sys.stdout).strip_dirs().sort_stats("cumulative").print_stats(args.profile)

    if args.json:
        doc = {"model": "torchvision.models.resnet50(weights=None).eval()", "machine": info,
               "settings": {"repeat": args.repeat, "repeat_slow": args.repeat_slow, "slow_s": args.slow_s,
                            "warmup": args.warmup, "sizes": list(SIZES), "reference": f"forward_{REF}"},
               "graph_nodes": {str(s): n for s, n in nodes.items()}, "items": rows, "targets": checks,
               "warnings": warnings}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"\nwrote {args.json}")
    return 1 if args.strict and not all(c["ok"] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
