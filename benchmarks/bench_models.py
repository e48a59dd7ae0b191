"""What the rewrites buy: latency and throughput of the paper's models and their rewrites, eager and compiled.

For each model: params and MACs per image (fxrf.analyze(...).costs, fxrf.cost.total), then latency (median, p10-p90,
min) and throughput at each batch size, eager and under torch.compile with the fxrf backend (inner: inductor), on
CPU or CUDA. Models:

* vgg16 (CIFAR, 313M MACs), vgg16-opt (stage conv counts 4,3,2,3,1: the paper's Table 6 baseline, 370M MACs),
* vgg16-opt/RECIPE for each decomposition recipe applied to VGG16-opt by fxrf.decompose (every conv but the first):
  DW+PW, DW+GPW-g2/4/8, DW+RPW-g2/4/8-o50 ("pending" if fxrf.decompose is not available), and vgg16/DW+PW,
* torchvision resnet18, resnet50 and mobilenet_v2 at 224 px (random weights),
* MODEL/auto-macs and MODEL/auto-latency for each of those four: fxrf.decompose(recipe="auto") with objective "macs"
  and "latency", built per batch size, both priced by the latency model (passes/latency.py: each block timed
  compiled at its site on this device and batch, cached on disk; --latency-cache or $FXRF_CACHE_DIR picks the
  file). Latency-aware is timed in alternation against MACs-aware and against the model at every batch size
  (checked: no slower, NOT_SLOWER), and the latency model's whole-model prediction is set against the measurement.

--roofline MODEL: per distinct site of MODEL and block, MACs, bytes, arithmetic intensity, the compute and memory
bounds at this machine's measured peaks (latency.peaks) and the measured time. --rpw-variants: the ways to do the
DW+RPW channel rotation (torch.roll, slices + cat, an index map, on the producer's output) timed in alternation
against no rotation, with the roofline floor of an unfused rotation.

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
    python benchmarks/bench_models.py --compiled-only --roofline vgg16-opt \
        --models vgg16-opt,vgg16-opt/auto-macs,vgg16-opt/auto-latency  # latency-aware auto and the roofline

--search MODEL: what decompose(torchvision MODEL, objective="latency") costs from cold caches, each run in a new
process (fresh FXRF_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR), with --search-before REF in alternation with git REF's
code. Each auto row's scaled whole-model prediction is checked against +-10% (PREDICTION_TARGET).

    python benchmarks/bench_models.py --search resnet18 --search-before HEAD~5 --batch 1 --threads 1

Exit status 0 unless --strict is given and a target is missed.
"""
from __future__ import annotations

import argparse
import dataclasses
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

from fxrf.passes.latency import peaks

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
    build: Callable[..., nn.Module]  # per_batch: build(batch, device, latency_cache) -> (model, decomposition summary)
    sample: tuple  # one input image (C, H, W)
    base: str | None = None  # the model this one rewrites
    rewrite: str | None = None  # what the rewrite is ("stages", or a decomposition recipe)
    per_batch: bool = False  # recipe="auto" priced by the latency model at each batch size: built per batch


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


def _auto(base: Callable[[], nn.Module], sample: tuple, objective: str) -> Callable:
    """decompose(recipe="auto", objective=...) of the base model; both objectives are priced by the latency model
    of the run's device and batch (compiled), so the predicted latency can be set against the measured one.
    `sample`: the default input; the run's (--px) is passed to build."""
    def build(batch: int, device: str, cache, sample: tuple = sample):
        from fxrf.passes.latency import LatencyModel
        lm = LatencyModel(device, batch, "compile", cache=cache or "default")
        t0 = time.perf_counter()
        result = fxrf.decompose(base().eval(), (1,) + sample, recipe="auto", objective=objective, latency=lm)
        s = result.summary
        info = {"objective": objective, "decompose_s": round(time.perf_counter() - t0, 1), "timings_made": lm.calls,
                "assignment": [list(st.blocks) for st in result.stages if st.blocks], "quality": s["quality"],
                "compact": s["compact"], "latency_model": {k: v for k, v in s["latency"].items() if k != "sites"},
                "latency_sites": s["latency"]["sites"], "verified": s.get("verified")}
        return result.graph_module, info
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
    Spec("resnet18", _torchvision("resnet18"), IMAGENET),
    Spec("resnet50", _torchvision("resnet50"), IMAGENET),
    Spec("mobilenet_v2", _torchvision("mobilenet_v2"), IMAGENET),
    *[Spec(f"{base}/auto-{obj}", _auto(build, sample, obj), sample, base=base, rewrite=f"auto, objective {obj}",
           per_batch=True)
      for base, build, sample in (("vgg16", vgg16_cifar, CIFAR), ("vgg16-opt", _vgg16_opt, CIFAR),
                                  ("resnet18", _torchvision("resnet18"), IMAGENET),
                                  ("resnet50", _torchvision("resnet50"), IMAGENET),
                                  ("mobilenet_v2", _torchvision("mobilenet_v2"), IMAGENET))
      for obj in ("macs", "latency")],
]}
AUTO_BASES = ("vgg16", "vgg16-opt", "resnet18", "resnet50", "mobilenet_v2")
AUTO = tuple(f"{b}/auto-{o}" for b in AUTO_BASES for o in ("macs", "latency"))
# latency-aware against MACs-aware and against the model itself, timed in alternation at every batch size
# (MACs-aware against the model too: its prediction is then checked against a ratio measured in alternation)
OBJECTIVE_PAIRS = tuple(p for b in AUTO_BASES for p in ((f"{b}/auto-latency", f"{b}/auto-macs"),
                                                         (f"{b}/auto-latency", b), (f"{b}/auto-macs", b)))
NOT_SLOWER = 1.03  # latency-aware "not slower": median ratio at most this (the alternating timings' noise here)
PREDICTION_TARGET = 0.10  # |scaled prediction / measured - 1| per row (nn-Meter's mark: 99% of predictions within 10%)


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
        if not args.compiled_only:
            progress(f"{spec.name} {device} b{batch} eager")
            t = timed_calls(model, x, device, args.warmup, args.iters, args.min_iters, budget)
            rows.append({"mode": "eager", **stats(t, batch)})
        if args.no_compile:
            return rows, None
        compiled, backend = _compile(model, args)
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


def _build(spec: Spec, batch, args, doc, progress):
    """(model on the device, its Cost per image, the decomposition's info or None), or None if it cannot be built."""
    try:
        torch.manual_seed(0)
        info = None
        if spec.per_batch:
            progress(f"  {spec.name}: decompose for batch {batch}")
            model, info = spec.build(batch, args.device, args.latency_cache, spec.sample)
            progress(f"  {info['assignment']} ({info['timings_made']} block timings made, {info['decompose_s']} s)")
        else:
            model = spec.build()
        model = model.eval()
        cost = total(fxrf.analyze(model, (1,) + spec.sample).costs)
        return model.to(args.device), cost, info
    except Pending as e:
        print(f"{spec.name}: pending ({e})", file=sys.stderr)
        doc["pending"].append({"model": spec.name, "why": str(e)})
    except Exception as e:
        progress(f"{spec.name}: FAILED to build: {type(e).__name__}: {e}")
        doc["failed"].append({"model": spec.name, "batch": batch, "why": f"build: {type(e).__name__}: {e}"})
    return None


def _pairs(name, batch, compiled, spec, kept, done, doc, args, progress) -> None:
    """Time in alternation every pair whose two members are now compiled at this batch (RPW against GPW at the
    check batch; latency-aware against MACs-aware and against the model at every batch)."""
    pairs = [p for p in OBJECTIVE_PAIRS if name in p] + ([p for p in PAIRS if name in p] if batch == CHECK_BATCH
                                                         else [])
    if not pairs:
        return
    kept[(name, batch)] = compiled
    for a, b in pairs:
        if (a, b, batch) in done or (a, batch) not in kept or (b, batch) not in kept:
            continue
        progress(f"{a} vs {b} b{batch}: {args.pairs} alternating pairs")
        x = torch.randn((batch,) + spec.sample, device=args.device)
        q = paired(kept[(a, batch)], kept[(b, batch)], x, args.device, args.pairs)
        doc["paired"].append({"a": a, "b": b, "device": args.device, "batch": batch, "mode": "compile", **q})
        done.add((a, b, batch))
        progress(f"  ratio {q['ratio']:.3f} ({q['a_ms']:.2f} vs {q['b_ms']:.2f} ms)")
    relevant = OBJECTIVE_PAIRS + (PAIRS if batch == CHECK_BATCH else ())
    for key in [k for k in kept if k[1] == batch]:  # drop what no pair of this run still needs
        if not [p for p in relevant if key[0] in p and (p[0], p[1], batch) not in done
                and all(m in args.names for m in p)]:
            kept.pop(key)


def _compile(model: nn.Module, args) -> tuple:
    """(torch.compile of `model` through the fxrf backend as this run configures it, that backend)."""
    backend = make_backend(log_table=False, inductor=dict(args.inductor), passes=args.passes)
    return torch.compile(model, backend=backend, dynamic=False, mode=args.mode), backend


def _noise(name, model, compiled, spec, batch, doc, args, progress) -> None:
    """The timing noise between two compiled instances of one graph (the same model deep-copied and compiled
    again), timed in alternation like the pairs: what a ratio between two different models cannot resolve."""
    import copy
    twin, _ = _compile(copy.deepcopy(model), args)
    x = torch.randn((batch,) + spec.sample, device=args.device)
    with torch.no_grad():
        timed_calls(twin, x, args.device, args.warmup, 1, 1, 0.0)
    progress(f"{name} vs a second compiled instance of itself b{batch}: {args.pairs} alternating pairs")
    q = paired(compiled, twin, x, args.device, args.pairs)
    doc.setdefault("noise", []).append({"model": name, "device": args.device, "batch": batch, **q})
    progress(f"  ratio {q['ratio']:.3f} ({q['a_ms']:.2f} vs {q['b_ms']:.2f} ms)")


def predictions(results: list, pairs: list = ()) -> list:
    """The latency model's whole-model prediction against the measured latency, per auto rewrite (compiled), from
    the measured base model and the blocks' and convs' times alone at their sites (passes/latency.py): additive =
    base - the sum over the replaced convs of (conv time - block time); scaled = base * (1 - that saving / the sum
    of every eligible conv's time). error = predicted / measured - 1. Where the rewrite and its base were timed
    in alternation (`pairs`), also `paired_error`: the scaled prediction's ratio to the base, (1 - saving / the
    convs' time), against the measured ratio of the pair, which a drift in the machine's load between the two
    models' separate runs does not move."""
    ratio = {(q["a"], q["b"], q["device"], q["batch"]): q["ratio"] for q in pairs}
    by = {(r["model"], r["device"], r["batch"], r["mode"]): r for r in results if "median_ms" in r}
    out = []
    for (name, device, batch, mode), r in by.items():
        lm = r.get("latency_model")
        spec = SPECS.get(name)
        base = by.get((spec.base, device, batch, mode)) if spec and spec.base else None
        if not lm or base is None or mode != lm.get("mode") or not lm.get("sites_ms"):
            continue  # nothing priced (no eligible conv: the rewrite is the model itself)
        pred = base["median_ms"] - lm["saved_ms"]
        sites = lm.get("sites_ms") or 0.0
        scaled = base["median_ms"] * (1 - lm["saved_ms"] / sites) if sites > 0 else base["median_ms"]
        out.append({"model": name, "device": device, "batch": batch, "mode": mode, "base_ms": base["median_ms"],
                    "convs_ms": lm["conv_ms"], "blocks_ms": lm["block_ms"], "all_convs_ms": sites,
                    "predicted_ms": pred, "scaled_ms": scaled, "measured_ms": r["median_ms"],
                    "error": pred / r["median_ms"] - 1, "scaled_error": scaled / r["median_ms"] - 1,
                    "sites_share_of_base": sites / base["median_ms"]})
        measured = ratio.get((name, spec.base, device, batch))
        if measured and sites > 0 and mode == "compile":
            predicted = 1 - lm["saved_ms"] / sites
            out[-1].update(predicted_ratio=predicted, paired_ratio=measured, paired_error=predicted / measured - 1)
    return out


# ------------------------------------------------------------------------------------- the latency search's cost


SEARCH_CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
import torch, torchvision, fxrf
from fxrf.passes.latency import LatencyModel
name, batch, px, verify, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
model = getattr(torchvision.models, name)(weights=None).eval()
lm = LatencyModel("cpu", batch, "compile")
t1 = time.perf_counter()
r = fxrf.decompose(model, (1, 3, px, px), recipe="auto", objective="latency", latency=lm, verify=verify)
t2 = time.perf_counter()
v = r.summary.get("verified") or {}
print(json.dumps({"search_s": t2 - t1, "process_s": t2 - t0, "timings": lm.calls, "fxrf": fxrf.__file__,
                  "workers": getattr(lm, "workers", None),
                  "assignment": [list(s.blocks) for s in r.stages if s.blocks], "chosen": v.get("chosen"),
                  "vs_original": {k: m["vs_original"] for k, m in v.get("models", {}).items()},
                  "scaled_error": {k: m["scaled_error"] for k, m in v.get("models", {}).items()}}))
"""

WARM_CHILD = r"""
import torch
torch.set_num_threads(1)
f = torch.compile(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()), dynamic=False)
with torch.no_grad():
    f(torch.randn(1, 3, 8, 8))
"""


def _tree(ref: str, where: str) -> str:
    """The fxrf sources of git `ref` unpacked under `where`, laid out as the package imports them (fxrf/ and
    fxrf/passes -> passes/); returns the directory to put first on PYTHONPATH."""
    import subprocess
    import tarfile
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    os.makedirs(where, exist_ok=True)
    archive = os.path.join(where, "src.tar")
    subprocess.run(["git", "archive", "-o", archive, ref, "fxrf", "passes"], cwd=root, check=True)
    with tarfile.open(archive) as t:
        t.extractall(where, filter="data")
    os.symlink(os.path.join(where, "passes"), os.path.join(where, "fxrf", "passes"))
    return where


def search_runs(name: str, batches: list, px: int, verify: int, threads: int, runs: int, before: str | None,
                progress, done: Callable[[list], None] = lambda rows: None) -> list:
    """Seconds of decompose(torchvision NAME, objective="latency") from cold caches, each run in a new process:
    a fresh FXRF_CACHE_DIR and a fresh TORCHINDUCTOR_CACHE_DIR holding only what inductor builds once per
    machine (its precompiled headers, from one tiny compile made first, timed apart as `warm_s`). With `before`
    (a git ref), that code's search is run too, in alternation with this one (before, after, before, ...), so both
    see the same machine load. `done(rows)` is called after every run (the JSON is rewritten: an interrupted run
    keeps what it measured)."""
    import shutil
    import subprocess
    import tempfile
    work = tempfile.mkdtemp(prefix="fxrf-search-")
    template = os.path.join(work, "inductor")
    sides = [("after", None)] if before is None else [("before", _tree(before, os.path.join(work, "before"))),
                                                      ("after", None)]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=template, OMP_NUM_THREADS=str(threads), FXRF_PROGRESS="1")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", WARM_CHILD], env=env, check=True, capture_output=True)
    warm_s = time.perf_counter() - t0
    progress(f"search: inductor's once-per-machine build (precompiled headers) {warm_s:.1f} s")
    rows = []
    for batch in batches:
        for i in range(runs):
            for side, path in sides:
                run_dir = tempfile.mkdtemp(dir=work)
                ind = os.path.join(run_dir, "inductor")
                shutil.copytree(template, ind)
                e = dict(env, FXRF_CACHE_DIR=os.path.join(run_dir, "fxrf"), TORCHINDUCTOR_CACHE_DIR=ind)
                if path:
                    e["PYTHONPATH"] = path + os.pathsep + e.get("PYTHONPATH", "")
                load = _load()
                progress(f"search: {name} b{batch} {side} run {i + 1}/{runs} (load {load})")
                # cwd: a temp dir, so that `python -c` (which puts its cwd first on sys.path) imports the fxrf of
                # PYTHONPATH (before) or the installed one (after), never a checkout it happens to run in
                out = subprocess.run([sys.executable, "-c", SEARCH_CHILD, name, str(batch), str(px), str(verify),
                                      str(threads)], env=e, capture_output=True, text=True, cwd=run_dir)
                if out.returncode:
                    raise RuntimeError(f"search child failed: {out.stderr[-2000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if (path is not None) != r["fxrf"].startswith(work):
                    raise RuntimeError(f"the {side} run imported fxrf from {r['fxrf']}")
                r.update(model=name, batch=batch, px=px, side=side, run=i + 1, warm_s=round(warm_s, 1),
                         load_before=load, load_after=_load(), threads=threads,
                         progress=[ln for ln in out.stderr.splitlines() if ln.startswith("fxrf:")])
                rows.append(r)
                done(rows)
                progress(f"  {side}: {r['search_s']:.1f} s search ({r['process_s']:.1f} s process), "
                         f"{r['timings']} timings, {r.get('workers')} compile workers, chose {r['chosen']}, "
                         f"{r['assignment']}")
                shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------------------------- roofline, RPW


ROOFLINE_RECIPES = ("S", "DW+PW") + tuple(f"DW+GPW-g{g}" for g in GROUPS) + tuple(f"DW+RPW-g{g}-o50" for g in GROUPS)


def roofline_rows(name: str, device: str, batches: list, cache, progress) -> list:
    """Per distinct site of `name` (a conv shape) and recipe: MACs, bytes, arithmetic intensity, the bound they
    imply on this device (`peaks`) and the measured time (the latency model, compiled, the same cache)."""
    from fxrf.passes.blocks import model_pattern, parse
    from fxrf.passes.decomposer import eligible_sites
    from fxrf.passes.latency import LatencyModel, roofline
    from fxrf.trace import trace

    spec = SPECS[name]
    model = spec.build().eval()
    gm = trace(model, (1,) + spec.sample)
    a = fxrf.analyze(gm, (1,) + spec.sample)
    pattern = model_pattern(gm)
    sites, seen = [], set()
    for site in eligible_sites(gm, a):
        conv = gm.get_submodule(site.target)
        key = (conv.in_channels, conv.out_channels, site.in_shape)
        if key not in seen:
            seen.add(key)
            sites.append((site, conv))
    pk = peaks(device)
    rows = []
    for batch in batches:
        lm = LatencyModel(device, batch, "compile", cache=cache or "default")
        for site, conv in sites:
            for recipe in ROOFLINE_RECIPES:
                r = parse(recipe)
                if r.inapplicable(conv):
                    continue
                shift = r.shift(conv)
                rl = roofline(r, conv, (batch,) + tuple(site.in_shape[1:]), pk["flops_per_s"], pk["bytes_per_s"],
                              pattern, shift)
                t = lm.time(r, conv, site.in_shape, pattern, shift)
                rows.append({"model": name, "batch": batch, "site": site.node,
                             "conv": f"{conv.in_channels}->{conv.out_channels} @{site.in_shape[2]}px",
                             "recipe": recipe, "macs": rl.macs, "bytes": rl.bytes, "intensity": rl.intensity,
                             "compute_ms": rl.compute_s * 1e3, "memory_ms": rl.memory_s * 1e3, "bound": rl.bound,
                             "bound_ms": rl.bound_s * 1e3, "measured_ms": t * 1e3,
                             "measured_over_bound": t / rl.bound_s})
        progress(f"  roofline b{batch}: {len(rows)} rows ({lm.calls} timings made)")
    return rows


class _Chain(nn.Module):
    """A producer (grouped pointwise conv + BN + ReLU, the previous block's end) then one DW + GPW block, with the
    block's channel rotation done one of several ways (`how`), or none."""

    def __init__(self, c: int, groups: int, shift: int, how: str):
        super().__init__()
        self.how, self.shift = how, shift
        self.p = nn.Sequential(nn.Conv2d(c, c, 1, groups=groups), nn.BatchNorm2d(c), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(c, c, 1, groups=groups), nn.BatchNorm2d(c), nn.ReLU())
        self.register_buffer("index", torch.roll(torch.arange(c), -shift))

    def rotate(self, x):
        if self.how.endswith("roll"):
            return torch.roll(x, -self.shift, 1)
        if self.how.endswith("cat"):
            return torch.cat([x[:, self.shift:], x[:, :self.shift]], 1)
        if self.how.endswith("gather"):
            return x.index_select(1, self.index)
        return x

    def forward(self, x):
        x = self.p(x)
        if self.how.startswith("producer-"):  # rotate the producer's output; dw and its BN rotate their channels
            x = self.rotate(x)
        x = self.dw(x)
        if not self.how.startswith("producer-"):
            x = self.rotate(x)
        return self.pw(x)


RPW_WAYS = ("none", "roll", "cat", "gather", "producer-cat", "producer-gather")


RPW_SHAPES = ((64, 32), (128, 16), (256, 8), (512, 4))  # VGG16-opt's stages: (channels, pixels)


def rpw_variants(device: str, batches: list, progress, pk: dict, groups=(2, 8), rounds: int = 15,
                 shapes=RPW_SHAPES) -> list:
    """The ways to do the DW+RPW rotation, each compiled (inductor, no graph pass), at the VGG16-opt stage shapes
    (channels, pixels): a producer + one block, against the same without a rotation ("none", i.e. DW+GPW). The
    ways of one shape are timed in alternation (`rounds` rounds of one call each, after warm-up), so all see the
    same machine state; the ratio of minima is what is compared. With them, the roofline floor of an unfused
    rotation: one read and one write of the activation at the measured copy bandwidth, as a fraction of "none"."""
    rows = []
    for batch in batches:
        for c, px in shapes:
            x = torch.randn(batch, c, px, px, device=device)
            for g in groups:
                m = c // g
                shift = max(1, round(0.5 * m))
                fns = {}
                for how in RPW_WAYS:
                    torch.manual_seed(0)
                    mod = _Chain(c, g, shift, how).eval().to(device)
                    fn = torch.compile(mod, backend="inductor", dynamic=False)
                    with torch.no_grad():
                        ok = torch.allclose(fn(x), mod(x), atol=1e-4, rtol=1e-4)
                        warm_up(lambda: fn(x), 2, 4, device)
                    fns[how] = (fn, ok)
                times = {how: [] for how in RPW_WAYS}
                with torch.no_grad():
                    for _ in range(rounds):
                        for how, (fn, _) in fns.items():
                            times[how] += time_calls(lambda: fn(x), 1, device=device)
                best = {how: min(t) for how, t in times.items()}
                copy_ms = 2 * x.numel() * 4 / pk["bytes_per_s"] * 1e3
                for how in RPW_WAYS:
                    rows.append({"batch": batch, "channels": c, "px": px, "groups": g, "shift": shift, "way": how,
                                 "ms": best[how] * 1e3, "median_ms": statistics.median(times[how]) * 1e3,
                                 "vs_none": best[how] / best["none"], "matches_eager": fns[how][1],
                                 "copy_floor_ms": copy_ms,
                                 "unfused_floor_ratio": (best["none"] * 1e3 + copy_ms) / (best["none"] * 1e3)})
                progress(f"  rpw b{batch} C{c} {px}px g{g}: " + ", ".join(
                    f"{r['way']} {r['vs_none']:.2f}" for r in rows[-len(RPW_WAYS):]))
    return rows


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


def prediction_checks(preds: list) -> list:
    """Per bench row of an auto rewrite: the latency model's *scaled* whole-model prediction (as decompose's
    summary["verified"] reports it: measured base x (1 - saving / every eligible conv's time)) within
    +-PREDICTION_TARGET of the measured latency; the additive one is given alongside."""
    out = []
    for q in preds:
        where = f"{q['device']}, {'torch.compile' if q['mode'] == 'compile' else 'eager'}, batch {q['batch']}"
        if "paired_error" in q:  # against the ratio measured in alternation with the base: no drift between runs
            err = q["paired_error"]
            what = f"scaled prediction within {PREDICTION_TARGET:.0%} of the measured ratio to the model"
            detail = (f"predicted ratio {q['predicted_ratio']:.3f}, measured {q['paired_ratio']:.3f} (alternating "
                      f"pairs); against separate runs: {q['scaled_error']:+.1%}")
        else:
            err = q["scaled_error"]
            what = f"scaled prediction within {PREDICTION_TARGET:.0%} of the measured latency"
            detail = (f"predicted {q['scaled_ms']:.2f} ms, measured {q['measured_ms']:.2f} ms (additive "
                      f"{q['predicted_ms']:.2f} ms, {q['error']:+.1%}), separate runs")
        out.append({"check": f"{q['model']}: {what} ({where})", "value": round(err, 3), "detail": detail,
                    "ok": abs(err) <= PREDICTION_TARGET})
    return out


def objective_checks(results: list, pairs: list, noise: list = ()) -> list:
    """Latency-aware auto must be no slower than the model it rewrites and than MACs-aware auto, at every batch
    size (compiled): the median ratio of alternating timings, at most NOT_SLOWER, or, where the run measured it,
    at most 1 + the noise between two compiled instances of MACs-aware auto (`_noise`: the resolution of a
    ratio on this machine). Where both are the same assignment (the same graph) it holds by construction, and
    the ratio is a further measure of that noise."""
    out = []
    assign = {(r["model"], r["batch"]): r.get("assignment") for r in results if r.get("assignment") is not None}
    floor = {(q["model"].rsplit("/", 1)[0], q["batch"]): abs(q["ratio"] - 1) for q in noise}
    for q in pairs:
        if (q["a"], q["b"]) not in OBJECTIVE_PAIRS:
            continue
        same = assign.get((q["a"], q["batch"])) == assign.get((q["b"], q["batch"])) and (q["b"], q["batch"]) in assign
        base = q["a"].rsplit("/", 1)[0]
        noisy = floor.get((base, q["batch"]))
        limit = max(NOT_SLOWER, 1 + noisy) if noisy is not None else NOT_SLOWER
        detail = f"{q['a_ms']:.2f} ms vs {q['b_ms']:.2f} ms, {q['n']} alternating pairs; limit {limit:.3f}"
        if noisy is not None:
            detail += f" (two compiled instances of {base}/auto-macs differ by {noisy:.1%} here)"
        if same:
            detail += ("; the same model (the whole-model check kept the MACs choice, or neither objective "
                       "replaced anything): no slower by construction, the ratio is timing noise")
        out.append({"check": f"{q['a']} no slower than {q['b']} ({q['device']}, torch.compile, batch {q['batch']})",
                    "value": round(q["ratio"], 3), "detail": detail, "ok": same or q["ratio"] <= limit})
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
    p.add_argument("--compiled-only", action="store_true", help="compiled only (no eager timings)")
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
    p.add_argument("--roofline", metavar="MODEL", help="per distinct site of MODEL (e.g. vgg16-opt) and recipe: "
                   "MACs, bytes, arithmetic intensity, the bound on this device and the measured time")
    p.add_argument("--rpw-variants", action="store_true",
                   help="time the ways to do the DW+RPW channel rotation against none (compiled)")
    p.add_argument("--latency-cache", metavar="PATH", help="the latency model's cache file (default: "
                   "$FXRF_CACHE_DIR, $XDG_CACHE_HOME/fxrf or ~/.cache/fxrf, latency-v2.json)")
    p.add_argument("--search", metavar="MODEL", help="time decompose(torchvision MODEL, objective='latency') from "
                   "cold caches at each --batch, each run in a new process (e.g. resnet18), and nothing else")
    p.add_argument("--search-before", metavar="REF", help="with --search: also run git REF's code, in alternation")
    p.add_argument("--search-runs", type=int, default=1, help="with --search: runs per side and batch (default 1)")
    p.add_argument("--search-verify", type=int, default=5, help="with --search: decompose's verify (default 5)")
    p.add_argument("--search-workers", type=int, default=None,
                   help="with --search: compile workers (FXRF_COMPILE_WORKERS in each run; default: the library's "
                   "own choice, the CPUs the load leaves idle)")
    p.add_argument("--px", type=int, default=224, help="the height and width of the 224 px models' input, and of "
                   "--search's (default 224; smaller for a quick dry run)")
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
    if args.search:
        return _search_main(args, argv)
    args.iters = args.iters or (10 if args.quick else 30)
    args.budget = args.budget if args.budget is not None else (4.0 if args.quick else 10.0)
    args.inductor = {"freezing": True} if args.freezing else {}
    args.passes = [] if args.passes.strip().lower() == "none" else [x.strip() for x in args.passes.split(",") if x]
    if args.px != IMAGENET[1]:  # the 224 px models at another size (a quick dry run of the code path)
        for k, spec in list(SPECS.items()):
            if spec.sample == IMAGENET:
                SPECS[k] = dataclasses.replace(spec, sample=(3, args.px, args.px))
    names = _names(args)
    args.names = names
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
    kept: dict = {}  # (name, batch) -> compiled model, while a pair it belongs to is still to be timed
    done_pairs: set = set()
    torch._dynamo.reset()
    for i, name in enumerate(names):
        spec = SPECS[name]
        progress(f"({i + 1}/{len(names)}) building {name}")
        for batch in (batches if spec.per_batch else [None]):
            built = _build(spec, batch, args, doc, progress)
            if built is None:
                continue
            model, cost, info = built
            for b in ([batch] if spec.per_batch else batches):
                try:
                    rows, compiled = measure_model(spec, model, args.device, b, args, progress)
                except Exception as e:
                    progress(f"{name} b{b}: FAILED: {type(e).__name__}: {e}")
                    doc["failed"].append({"model": name, "batch": b, "why": f"{type(e).__name__}: {e}"})
                    continue
                for r in rows:
                    doc["results"].append({"model": name, "device": args.device, "batch": b, "params": cost.params,
                                           "macs": cost.macs, **r, **(info or {})})
                    progress(f"  {name} b{b} {r['mode']}: {r['median_ms']:.2f} ms "
                             f"[{r['p10_ms']:.2f}-{r['p90_ms']:.2f}], {r['throughput']:.0f} img/s"
                             + (f", compiled in {r['compile_s']} s" if "compile_s" in r else ""))
                if compiled is not None:
                    _pairs(name, b, compiled, spec, kept, done_pairs, doc, args, progress)
                if compiled is not None and name.endswith("/auto-macs"):
                    _noise(name, model, compiled, spec, b, doc, args, progress)
                _finish(doc, args)
            del model
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if args.roofline:
        progress(f"roofline of {args.roofline}'s sites")
        doc["peaks"] = peaks(args.device)
        doc["roofline"] = roofline_rows(args.roofline, args.device, batches, args.latency_cache, progress)
        _finish(doc, args)
    if args.rpw_variants:
        doc["rpw_variants"] = rpw_variants(args.device, batches, progress, doc.get("peaks") or peaks(args.device))
        _finish(doc, args)
    doc["load_average_end"] = _load()
    _finish(doc, args)
    _report(doc, args)
    missed = [c for c in doc["checks"] if not c["ok"]]
    return 1 if args.strict and missed else 0


def _search_main(args, argv) -> int:
    """--search: the latency search's cost from cold caches (`search_runs`), printed and written to --json."""
    def progress(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    threads = args.threads or 1
    torch.set_num_threads(threads)
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    doc = {"command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
           "machine": machine("cpu"), "load_average_start": _load()}
    def write(rows):
        doc["search"] = rows
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)

    if args.search_workers is not None:
        os.environ["FXRF_COMPILE_WORKERS"] = str(args.search_workers)  # the runs inherit it
    search_runs(args.search, batches, args.px, args.search_verify, threads, args.search_runs, args.search_before,
                progress, write)
    doc["load_average_end"] = _load()
    print(f"decompose({args.search}, objective='latency') from cold caches, {threads} thread(s), "
          f"load {doc['load_average_start']} -> {doc['load_average_end']}")
    print(f"{'side':<7} {'batch':>5} {'run':>3} {'search s':>9} {'process s':>9} {'timings':>7} {'workers':>7}  "
          f"chosen   assignment")
    for r in doc["search"]:
        print(f"{r['side']:<7} {r['batch']:>5} {r['run']:>3} {r['search_s']:>9.1f} {r['process_s']:>9.1f} "
              f"{r['timings']:>7} {str(r.get('workers')):>7}  {str(r['chosen']):<8} {r['assignment']}")
        for line in r["progress"]:
            print(f"        {line}")
    write(doc["search"])
    return 0


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
                           pairs=doc["paired"]) + objective_checks(doc["results"], doc["paired"], doc.get("noise", []))
    doc["predictions"] = predictions(doc["results"], doc.get("paired", []))
    doc["checks"] += prediction_checks(doc["predictions"])
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
