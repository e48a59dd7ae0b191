"""What the rewrites buy: latency and throughput of the paper's models and their rewrites, eager and compiled.

For each model: params and MACs per image (fxrf.analyze(...).costs, fxrf.cost.total), then latency (median, p10-p90,
min) and throughput at each batch size, eager and under torch.compile with the fxrf backend (inner: inductor), on
CPU or CUDA. Models:

* vgg16 (CIFAR, 313M MACs), vgg16-opt (stage conv counts 4,3,2,3,1: the paper's Table 6 baseline, 370M MACs),
* vgg16-opt/RECIPE for each decomposition recipe applied to VGG16-opt by fxrf.decompose (every conv but the first):
  DW+PW, DW+GPW-g2/4/8, DW+RPW-g2/4/8-o50 ("pending" if fxrf.decompose is not available), and vgg16/DW+PW,
* torchvision resnet50 and mobilenet_v2 at 224 px (random weights).

Per rewrite (a model with a base: vgg16-opt's base is vgg16, a recipe's base is the model it was applied to), at
each batch size and mode: the ideal speedup is the MACs reduction, MACs(base) / MACs(rewrite); the realized speedup
is latency(base) / latency(rewrite), both medians; `realized` = realized speedup / ideal speedup (1.0: every MAC
saved is time saved). Targets (CPU, torch.compile, batch 32), printed as ok / MISSED:

* DW+PW on CIFAR VGG16(-opt) realizes at least half of its MACs reduction as speedup (realized >= 0.5);
* DW+RPW-gG-o50 is within 5% of DW+GPW-gG's latency at the same G (the channel rotation costs next to nothing).

Timing (benchmarks/timing.py, shared with analysis_speed.py; the tables, Markdown and plot: benchmarks/report.py):
model.eval() under torch.no_grad(); warm-up calls (the compiled model's first call, which compiles, is
timed apart as compile_s), then timed calls until --iters calls or --budget seconds (at least --min-iters). CPU:
time.perf_counter around each call; CUDA: CUDA events around each call, synchronised, after warm-up, with
torch.backends.cudnn.benchmark = True. Each (model, batch) is measured eager then compiled, and each batch size
compiles its own graph (dynamic=False). DW+RPW-gG-o50 and DW+GPW-gG, whose latencies the check compares at a 5%
tolerance, are also timed in alternation at batch 32 (--pairs calls each, compiled): the ratio of those medians is
what the check uses, since two separate runs drift apart by more than 5% on a busy machine. The JSON is rewritten
after every measurement, so an interrupted run keeps what it measured.

    python benchmarks/bench_models.py --quick                          # 5 models, batch 1 and 32, CPU
    python benchmarks/bench_models.py --json out/bench.json --plot out/bench.png
    python benchmarks/bench_models.py --device cuda --batch 1,32,128 --models vgg16,vgg16-opt/DW+PW
    python benchmarks/bench_models.py --list                           # the model names

Exit status 0 unless --strict is given and a target is missed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

import fxrf
from fxrf.backend import make_backend
from fxrf.compiler import DEFAULT_GRAPH_PASSES
from fxrf.cost import total
from fxrf.models import vgg16_cifar, vgg_cifar
from report import markdown, plot, print_tables  # noqa: F401  (benchmarks/report.py: also this script's API)
from timing import load_average, machine, time_calls, warm_up

CIFAR = (3, 32, 32)
IMAGENET = (3, 224, 224)
GROUPS = (2, 4, 8)
RECIPES = ("DW+PW",) + tuple(f"DW+GPW-g{g}" for g in GROUPS) + tuple(f"DW+RPW-g{g}-o50" for g in GROUPS)
QUICK = ("vgg16", "vgg16-opt", "vgg16-opt/DW+PW", "vgg16-opt/DW+GPW-g4", "vgg16-opt/DW+RPW-g4-o50")
CHECK_DEVICE, CHECK_MODE, CHECK_BATCH = "cpu", "compile", 32  # where the targets are stated
TARGET = (CHECK_DEVICE, CHECK_MODE, CHECK_BATCH)
REALIZED_TARGET = 0.5  # DW+PW: realized speedup / MACs reduction
RPW_TOLERANCE = 1.05  # latency(RPW) / latency(GPW) at the same G
PAIRS = tuple((f"vgg16-opt/DW+RPW-g{g}-o50", f"vgg16-opt/DW+GPW-g{g}") for g in GROUPS)  # timed in alternation
EXTRA_WARMUP = 8  # warm-up calls allowed beyond --warmup while timings have not settled


@dataclass(frozen=True)
class Spec:
    name: str
    build: Callable[[], nn.Module]
    sample: tuple  # one input image (C, H, W)
    base: str | None = None  # the model this one rewrites
    rewrite: str | None = None  # what the rewrite is ("stages", or a decomposition recipe)


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build():
        import torchvision
        return getattr(torchvision.models, name)(weights=None)
    return build


def _decomposed(base: Callable[[], nn.Module], recipe: str) -> Callable[[], nn.Module]:
    def build():
        decompose = getattr(fxrf, "decompose", None)
        if decompose is None:
            raise Pending("fxrf.decompose is not available")
        try:
            result = decompose(base().eval(), (1,) + CIFAR, recipe=recipe)
        except (ImportError, NotImplementedError) as e:
            raise Pending(f"fxrf.decompose: {type(e).__name__}: {e}") from e
        return result.graph_module
    return build


class Pending(Exception):
    """A model that cannot be built yet (its pass is not written): reported as pending, not as a failure."""


def _vgg16_opt() -> nn.Module:
    return vgg_cifar(stage_convs=(4, 3, 2, 3, 1))


SPECS: dict[str, Spec] = {s.name: s for s in [
    Spec("vgg16", vgg16_cifar, CIFAR),
    Spec("vgg16-opt", _vgg16_opt, CIFAR, base="vgg16", rewrite="stages 4,3,2,3,1"),
    Spec("vgg16/DW+PW", _decomposed(vgg16_cifar, "DW+PW"), CIFAR, base="vgg16", rewrite="DW+PW"),
    *[Spec(f"vgg16-opt/{r}", _decomposed(_vgg16_opt, r), CIFAR, base="vgg16-opt", rewrite=r) for r in RECIPES],
    Spec("resnet50", _torchvision("resnet50"), IMAGENET),
    Spec("mobilenet_v2", _torchvision("mobilenet_v2"), IMAGENET),
]}


# ------------------------------------------------------------------------------------------------- measuring


def timed_calls(fn, x, device: str, warmup: int, iters: int, min_iters: int, budget_s: float) -> list:
    """Seconds per call of fn(x): `warmup` untimed calls at least (none if 0), more (up to EXTRA_WARMUP) until two
    consecutive calls agree within 25%, then up to `iters` timed calls (stopping after `budget_s` seconds once
    `min_iters` are in)."""
    if warmup:
        warm_up(lambda: fn(x), max(warmup, 2), EXTRA_WARMUP, device)
    return time_calls(lambda: fn(x), iters, device=device, min_n=min_iters, budget_s=budget_s)


def stats(times: list, batch: int) -> dict:
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    med = statistics.median(times)
    return {"n": len(times), "median_ms": med * 1e3, "p10_ms": q[0] * 1e3, "p90_ms": q[-1] * 1e3,
            "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3, "throughput": batch / med}


def measure_model(spec: Spec, model: nn.Module, device: str, batch: int, args, progress) -> list:
    """Eager and compiled rows for one model at one batch size."""
    x = torch.randn((batch,) + spec.sample, device=device)
    rows = []
    budget = args.budget
    with torch.no_grad():
        progress(f"{spec.name} {device} b{batch} eager")
        t = timed_calls(model, x, device, args.warmup, args.iters, args.min_iters, budget)
        rows.append({"mode": "eager", **stats(t, batch)})
        if args.no_compile:
            return rows, None
        backend = make_backend(log_table=False, inductor=dict(args.inductor), passes=args.passes)
        compiled = torch.compile(model, backend=backend, dynamic=False, mode=args.mode)
        progress(f"{spec.name} {device} b{batch} compile")
        t0 = time.perf_counter()
        out = compiled(x)
        if device == "cuda":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        err = (out.float() - model(x).float()).abs().max().item()
        t = timed_calls(compiled, x, device, args.warmup, args.iters, args.min_iters, budget)
        reports = backend.reports
        rows.append({"mode": "compile", **stats(t, batch), "compile_s": round(compile_s, 2),
                     "max_abs_err_vs_eager": err, "graphs": len(reports),
                     "report_macs_per_image": sum(r.macs for r in reports) // batch if reports else None})
    return rows, compiled


def paired(fa, fb, x, device: str, pairs: int) -> dict:
    """Latency of fa and fb timed in alternation (a, b, a, b, ...): both see the same machine state, so the ratio of
    two close latencies is not swamped by drift (other processes, clocks). Both are warm already."""
    ta, tb = [], []
    with torch.no_grad():
        for _ in range(pairs):
            for fn, out in ((fa, ta), (fb, tb)):
                out.extend(timed_calls(fn, x, device, 0, 1, 1, 0.0))
    ma, mb = statistics.median(ta), statistics.median(tb)
    return {"n": pairs, "a_ms": ma * 1e3, "b_ms": mb * 1e3, "ratio": ma / mb,
            "ratio_of_mins": min(ta) / min(tb)}


def _load() -> list | None:
    load = load_average()
    return None if load is None else [round(x, 2) for x in load]


# ------------------------------------------------------------------------------------------------ the analysis


def rewrites(results: list) -> list:
    """One row per (rewrite, device, batch, mode): MACs reduction, realized speedup, their ratio."""
    by = {(r["model"], r["device"], r["batch"], r["mode"]): r for r in results if "median_ms" in r}
    out = []
    for (name, device, batch, mode), r in by.items():
        spec = SPECS.get(name)
        base = by.get((spec.base, device, batch, mode)) if spec and spec.base else None
        if base is None:
            continue
        ideal = base["macs"] / r["macs"]
        speedup = base["median_ms"] / r["median_ms"]
        saved_macs = 1 - r["macs"] / base["macs"]
        saved_time = 1 - r["median_ms"] / base["median_ms"]
        out.append({"model": name, "base": spec.base, "rewrite": spec.rewrite, "device": device, "batch": batch,
                    "mode": mode, "macs_reduction": round(ideal, 3), "speedup": round(speedup, 3),
                    "realized": round(speedup / ideal, 3),
                    "time_saved_per_mac_saved": round(saved_time / saved_macs, 3) if saved_macs > 0 else None})
    return out


def checks(results: list, device: str = CHECK_DEVICE, mode: str = CHECK_MODE, batch: int = CHECK_BATCH,
           pairs: list = ()) -> list:
    rw = {r["model"]: r for r in rewrites(results) if (r["device"], r["mode"], r["batch"]) == (device, mode, batch)}
    lat = {r["model"]: r["median_ms"] for r in results
           if "median_ms" in r and (r["device"], r["mode"], r["batch"]) == (device, mode, batch)}
    where = f"{device}, {'torch.compile' if mode == 'compile' else 'eager'}, batch {batch}"
    out = []
    for name in ("vgg16/DW+PW", "vgg16-opt/DW+PW"):
        if name in rw:
            v = rw[name]["realized"]
            out.append({"check": f"{name} realizes >= {REALIZED_TARGET} of its MACs reduction ({where})",
                        "value": v, "detail": f"speedup {rw[name]['speedup']:.2f}x of an ideal "
                                              f"{rw[name]['macs_reduction']:.2f}x", "ok": v >= REALIZED_TARGET})
    for g in GROUPS:
        r, gp = f"vgg16-opt/DW+RPW-g{g}-o50", f"vgg16-opt/DW+GPW-g{g}"
        pair = next((q for q in pairs if (q["a"], q["b"], q["device"], q["batch"]) == (r, gp, device, batch)), None)
        if pair is not None:  # timed in alternation: the better estimate of a ratio near 1
            v, detail = pair["ratio"], (f"{pair['a_ms']:.2f} ms vs {pair['b_ms']:.2f} ms, {pair['n']} alternating "
                                        f"pairs; separate runs: {lat[r]:.2f} vs {lat[gp]:.2f} ms"
                                        if r in lat and gp in lat else f"{pair['n']} alternating pairs")
        elif r in lat and gp in lat:
            v, detail = lat[r] / lat[gp], f"{lat[r]:.2f} ms vs {lat[gp]:.2f} ms, separate runs"
        else:
            continue
        out.append({"check": f"DW+RPW-g{g}-o50 within {RPW_TOLERANCE - 1:.0%} of DW+GPW-g{g} latency ({where})",
                    "value": round(v, 3), "detail": detail, "ok": v <= RPW_TOLERANCE})
    return out


# ---------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", default="1,32", help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--models", help=f"comma-separated names (see --list); 'quick' = {','.join(QUICK)}")
    p.add_argument("--quick", action="store_true", help="the quick models and fewer iterations")
    p.add_argument("--iters", type=int, help="timed calls per measurement at most (default 30, --quick 10)")
    p.add_argument("--min-iters", type=int, default=5, help="timed calls at least (default 5)")
    p.add_argument("--budget", type=float, help="seconds of timed calls per measurement (default 10, --quick 4)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default 3)")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--pairs", type=int, default=30,
                   help="alternating calls per model when timing DW+RPW against DW+GPW (default 30)")
    p.add_argument("--mode", default=None, help="torch.compile mode (default: none)")
    p.add_argument("--freezing", action="store_true", help="inductor freezing (constant weights, inference only)")
    p.add_argument("--passes", default=",".join(DEFAULT_GRAPH_PASSES),
                   help="the fxrf backend's graph passes, comma-separated, or 'none' (default: %(default)s, "
                        "as fxrf.compile)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--cold", action="store_true",
                   help="disable inductor's caches, so compile_s is a cold compile (default: caches on)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON (rewritten after every measurement)")
    p.add_argument("--plot", metavar="PATH", help="write a plot (PNG) of speedup vs MACs reduction and latencies")
    p.add_argument("--markdown", metavar="PATH", help="also write the tables as Markdown (docs/benchmarks.md)")
    p.add_argument("--from-json", metavar="PATH", help="measure nothing: print (and --markdown/--plot) a saved run")
    p.add_argument("--list", action="store_true", help="print the model names and exit")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    args = p.parse_args(argv)
    if args.list:
        for s in SPECS.values():
            print(f"{s.name:<26} input {'x'.join(map(str, s.sample))}" + (f"  rewrite of {s.base}: {s.rewrite}"
                                                                           if s.base else ""))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cold:
        import torch._inductor.config as inductor_config
        inductor_config.force_disable_caches = True
    if args.from_json:
        with open(args.from_json) as f:
            doc = json.load(f)
        doc.setdefault("paired", [])
        _report(doc, args)
        return 0
    args.iters = args.iters or (10 if args.quick else 30)
    args.budget = args.budget if args.budget is not None else (4.0 if args.quick else 10.0)
    args.inductor = {"freezing": True} if args.freezing else {}
    args.passes = [] if args.passes.strip().lower() == "none" else [x.strip() for x in args.passes.split(",") if x]
    names = _names(args)
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    if args.device == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is visible")
        torch.backends.cudnn.benchmark = True

    def progress(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    doc = {"command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
           "machine": machine(args.device), "load_average_start": _load(),
           "config": {"device": args.device, "batches": batches, "iters": args.iters, "min_iters": args.min_iters,
                      "budget_s": args.budget, "warmup": args.warmup, "mode": args.mode, "inductor": args.inductor,
                      "backend_passes": args.passes, "threads": torch.get_num_threads(), "cold": args.cold,
                      "compile": not args.no_compile},
           "models": names, "results": [], "rewrites": [], "paired": [], "checks": [], "pending": [], "failed": []}
    m = doc["machine"]
    progress(f"{m.get('cpu_model')} x{m['cpu_count']} ({m['torch_threads']} torch threads), torch {m['torch']}"
             + (f", {m['gpu']}" if "gpu" in m else "") + f"; {len(names)} models x batch {batches}")
    kept: dict = {}  # compiled pair members waiting for their partner
    torch._dynamo.reset()
    for i, name in enumerate(names):
        spec = SPECS[name]
        progress(f"({i + 1}/{len(names)}) building {name}")
        try:
            torch.manual_seed(0)
            model = spec.build().eval()
            a = fxrf.analyze(model, (1,) + spec.sample)
            cost = total(a.costs)
            model = model.to(args.device)
        except Pending as e:
            print(f"{name}: pending ({e})", file=sys.stderr)
            doc["pending"].append({"model": name, "why": str(e)})
            continue
        except Exception as e:
            progress(f"{name}: FAILED to build: {type(e).__name__}: {e}")
            doc["failed"].append({"model": name, "why": f"build: {type(e).__name__}: {e}"})
            continue
        for batch in batches:
            try:
                rows, compiled = measure_model(spec, model, args.device, batch, args, progress)
            except Exception as e:
                progress(f"{name} b{batch}: FAILED: {type(e).__name__}: {e}")
                doc["failed"].append({"model": name, "batch": batch, "why": f"{type(e).__name__}: {e}"})
                continue
            if compiled is not None and batch == CHECK_BATCH and any(name in q for q in PAIRS):
                kept[name] = compiled
                for a, b in PAIRS:
                    if a in kept and b in kept:
                        progress(f"{a} vs {b} b{batch}: {args.pairs} alternating pairs")
                        x = torch.randn((batch,) + spec.sample, device=args.device)
                        q = paired(kept.pop(a), kept.pop(b), x, args.device, args.pairs)
                        doc["paired"].append({"a": a, "b": b, "device": args.device, "batch": batch,
                                              "mode": "compile", **q})
                        progress(f"  ratio {q['ratio']:.3f} ({q['a_ms']:.2f} vs {q['b_ms']:.2f} ms)")
            for r in rows:
                doc["results"].append({"model": name, "device": args.device, "batch": batch, "params": cost.params,
                                       "macs": cost.macs, **r})
                progress(f"  {name} b{batch} {r['mode']}: {r['median_ms']:.2f} ms "
                         f"[{r['p10_ms']:.2f}-{r['p90_ms']:.2f}], {r['throughput']:.0f} img/s"
                         + (f", compiled in {r['compile_s']} s" if "compile_s" in r else ""))
            _finish(doc, args)
        del model
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    doc["load_average_end"] = _load()
    _finish(doc, args)
    _report(doc, args)
    missed = [c for c in doc["checks"] if not c["ok"]]
    return 1 if args.strict and missed else 0


def _report(doc: dict, args) -> None:
    print_tables(doc, TARGET)
    if args.plot and doc["rewrites"]:
        plot(doc, args.plot, TARGET)
        print(f"plot written to {args.plot}", file=sys.stderr)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(doc) + "\n")
        print(f"markdown written to {args.markdown}", file=sys.stderr)


def _finish(doc: dict, args) -> None:
    doc["rewrites"] = rewrites(doc["results"])
    doc["checks"] = checks(doc["results"], device=CHECK_DEVICE if args.device == "cpu" else args.device,
                           pairs=doc["paired"])
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


def _names(args) -> list:
    if args.models:
        names = []
        for n in args.models.split(","):
            n = n.strip()
            names += list(QUICK) if n == "quick" else list(SPECS) if n == "all" else [n]
    else:
        names = list(QUICK) if args.quick else list(SPECS)
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(SPECS)}")
    return list(dict.fromkeys(names))


if __name__ == "__main__":
    sys.exit(main())
