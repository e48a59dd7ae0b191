"""fxrf.prune against the decomposer and torch-pruning at equal MACs: accuracy first, then latency.

Accuracy (digits and MNIST-1D, the teachers of benchmarks/workflow.py and benchmarks/accuracy.py): per seed, the
teacher is trained, then four students at one MACs target -- the MACs of `fxrf.decompose(teacher, recipe="DW+PW")`,
or half the teacher's MACs where the decomposer replaces nothing (it rewrites nn.Conv2d only: MNIST-1D's nets are
1-D) -- are built from it:

  prune        fxrf.prune(teacher, macs=target, importance="l1", calibration=training batches)
  decompose    fxrf.optimize(teacher, kernels="DW+PW", calibration=the same batches): SVD transfer, least-squares
               fit of each block's last conv, batch norms re-estimated
  tp-l1        torch-pruning's MetaPruner with MagnitudeImportance(p=1), the classifier ignored, one uniform
               pruning_ratio found by bisection to the same MACs, then the batch norms re-estimated
               (fxrf.training.calibrate.recalibrate_bn) on the same batches
  prune-random fxrf.prune(..., importance="random"): the control that says what the L1 choice buys
  prune, BN only  fxrf.prune(teacher, macs=target, importance="l1") without calibration, then the batch norms
               re-estimated as for tp-l1: fxrf's channel choice against torch-pruning's under one calibration, and
               (against prune) what fxrf.prune's own calibration (least-squares refit + norms) adds

Each is evaluated on the test split right after calibration and after the same distillation (fxrf.distill against
the teacher, the same epochs, lr, weight decay, temperature and kd weight for every student, a fresh loader with
the same seed for every student; the state kept is chosen on a validation split carved from the training data,
never on the test set). Seeds are paired (one teacher and data split per seed, shared by the four students):
the differences prune - decompose, prune - tp-l1 and prune - prune-random are tested per seed (paired t test and
sign test).

Latency (VGG16-CIFAR at 32x32, torchvision resnet50 at 224x224, random weights): the original, the decomposer's
recipe "auto" (objective "macs"), torch-pruning L1 and fxrf.prune at the MACs of that decomposition, and a second
instance of the original (whose ratio to the first is the noise), eager and compiled (torch.compile, inductor),
on one thread, timed in alternation: each round times every model in turn (the order rotated each round), the
figure of a model is the median over rounds of its time / the original's time in the same round.

    python benchmarks/prune_compare.py --quick                 # < 3 min: 2 seeds, short training, VGG16 b1 eager
    python benchmarks/prune_compare.py                         # accuracy (20 seeds, ~8 min) and latency (~30 min)
    python benchmarks/prune_compare.py --skip-latency          # accuracy only
    python benchmarks/prune_compare.py --skip-accuracy --rounds 15 --no-compile

MACs are counted by fxrf.analyze for every arm (one counter; torch-pruning's own count_ops_and_params counts
norms, activations and pools too and would put the arms at different MACs).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from importlib import metadata

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fxrf  # noqa: E402
from fxrf.cost import total  # noqa: E402
from fxrf.training.calibrate import recalibrate_bn  # noqa: E402
from fxrf.training.datasets import digits, loaders, mnist1d, same_distance  # noqa: E402
from fxrf.training.distill import distill, evaluate, train  # noqa: E402

from accuracy import vgg  # noqa: E402  (benchmarks/accuracy.py's VGG-style nets)
from timing import load_average, machine, time_calls, warm_up  # noqa: E402
from workflow import DigitsCNN  # noqa: E402  (docs/workflow.md's model)

# ------------------------------------------------------------------------------------------------ configuration

CAL_BATCHES = 8  # batches every arm's calibration sees (fxrf.optimize's CALIBRATION_BATCHES)
HOLDOUT = 2  # the batches after those, which fxrf.optimize holds out to report its calibration
# the one distillation every student gets (fxrf.distill's defaults, written out so that they are the same for all)
DISTILL = {"lr": 1e-3, "weight_decay": 0.0, "temperature": 4.0, "kd_weight": 0.5, "validation": 0.1}
ARMS = ("prune", "decompose", "tp-l1", "prune-random", "prune, BN only")
COMPARE = (("prune", "decompose"), ("prune", "tp-l1"), ("prune", "prune-random"), ("prune, BN only", "tp-l1"),
           ("prune", "prune, BN only"))

def same_distance_cnn(w: int = 16) -> nn.Module:
    """Five 3x3 convs in three stages (receptive field 21 px), a global max pool and a linear head: for the
    same-distance task at k=10 on 24x24 maps (a pair 13 px end to end), where this net sits near 80%."""
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
    return nn.Sequential(*block(1, w), *block(w, w), nn.MaxPool2d(2), *block(w, 2 * w), *block(2 * w, 2 * w),
                         nn.MaxPool2d(2), *block(2 * w, 4 * w), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(4 * w, 2))


TASKS = {
    "digits": {"what": "scikit-learn 8x8 digits upsampled to 16x16, 500 training images, 1,297 test images; "
                       "teacher: benchmarks/workflow.py's DigitsCNN (7 convs, 16-64 channels)",
               "model": lambda: DigitsCNN(), "shape": (1, 1, 16, 16), "batch": 32,
               "data": lambda seed: digits(n_train=500, size=16, seed=seed)},
    "mnist1d": {"what": "MNIST-1D, 1,000 training signals, 4,000 test signals; teacher: benchmarks/accuracy.py's "
                        "1-D VGG (6 Conv1d, 8-32 channels)",
                "model": lambda: vgg("1d")[0], "shape": (1, 1, 40), "batch": 32,
                "data": lambda seed: mnist1d(n_train=1000, n_test=4000, seed=seed)},
    "same_distance": {"what": "fxrf.training.datasets.same_distance at k=10 (24x24, two 3x3 codes of 4 and a "
                              "distractor), 4,000 training images, 2,000 test images; teacher: a 5-conv CNN "
                              "(16-64 channels, receptive field 21 px)",
                      "model": lambda: same_distance_cnn(), "shape": (1, 1, 24, 24), "batch": 64,
                      "data": lambda seed: same_distance(10, n_train=4000, n_test=2000, seed=seed)},
}
MODES = {
    "quick": {"seeds": 2, "teacher_epochs": {"digits": 8, "mnist1d": 8, "same_distance": 3}, "distill_epochs": 1,
              "latency": {"vgg16_cifar": (1,)}, "rounds": 3, "compile": False},
    "full": {"seeds": 20, "teacher_epochs": {"digits": 20, "mnist1d": 20, "same_distance": 12}, "distill_epochs": 3,
             "latency": {"vgg16_cifar": (1, 32), "resnet50": (1, 8)}, "rounds": 15, "compile": True},
}


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


def macs_of(model: nn.Module, shape: tuple) -> int:
    return total(fxrf.analyze(model, shape).costs).macs


def params_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ torch-pruning


def classifier_of(model: nn.Module) -> str:
    """The path of the model's last nn.Linear: the classifier torch-pruning must not prune."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise SystemExit("no nn.Linear classifier to ignore")
    return names[-1]


def tp_l1(model: nn.Module, shape: tuple, target: float, steps: int = 20):
    """torch-pruning's MetaPruner (MagnitudeImportance(p=1), the classifier ignored, one uniform ratio for every
    group) at the smallest pruning_ratio whose fxrf-counted MACs are at most `target` x the model's (bisection).
    Returns (pruned copy, ratio, MACs fraction)."""
    import torch_pruning as tp
    x = torch.randn(shape)
    base = macs_of(model, shape)
    cls = classifier_of(model)

    def build(ratio):
        m = copy.deepcopy(model).eval()
        pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, ignored_layers=[m.get_submodule(cls)])
        pruner.step()
        return m

    lo, hi = 0.0, 0.99
    got = {}
    for _ in range(steps):
        mid = (lo + hi) / 2
        got[mid] = macs_of(build(mid), shape) / base
        if got[mid] > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-4:
            break
    m = build(hi)
    return m, hi, macs_of(m, shape) / base


# ------------------------------------------------------------------------------------------------------ accuracy


def acc(model: nn.Module, loader) -> float:
    return 100.0 * evaluate(model.eval(), loader)


def one_seed(task: str, seed: int, mode: dict) -> dict:
    cfg = TASKS[task]
    shape = cfg["shape"]
    split = cfg["data"](seed)

    def fresh():  # the same loader (data, batches, order) for every student: the students are paired
        return loaders(split, batch_size=cfg["batch"], seed=seed)

    tr, te = fresh()
    torch.manual_seed(seed)
    teacher = cfg["model"]()
    t0 = time.perf_counter()
    train(teacher, tr, mode["teacher_epochs"][task], seed=seed, progress=False)
    teacher.eval()
    row = {"seed": seed, "teacher": acc(teacher, te), "teacher_s": time.perf_counter() - t0}
    base_macs, base_params = macs_of(teacher, shape), params_of(teacher)
    d = fxrf.decompose(teacher, shape, recipe="DW+PW", transfer_weights=False)
    target = d.summary["macs_after"] / base_macs if d.changes else 0.5
    row.update(target=target, target_from="DW+PW's MACs" if d.changes else "0.5: the decomposer replaces no conv here")
    tr, _ = fresh()
    calib = [x for x, _ in tr][:CAL_BATCHES + HOLDOUT]  # inputs only: the calibrations use no labels

    students, built = {}, {}
    t0 = time.perf_counter()
    students["prune"] = fxrf.prune(teacher, shape, macs=target, importance="l1", calibration=calib,
                                   calibration_batches=CAL_BATCHES, seed=seed).model
    built["prune"] = time.perf_counter() - t0
    if d.changes:
        t0 = time.perf_counter()
        students["decompose"] = fxrf.optimize(teacher, shape, kernels="DW+PW", calibration=calib,
                                              calibration_batches=CAL_BATCHES, holdout_batches=HOLDOUT).model
        built["decompose"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    m, ratio, _ = tp_l1(teacher, shape, target)
    students["tp-l1"] = recalibrate_bn(m, calib, batches=CAL_BATCHES)
    built["tp-l1"] = time.perf_counter() - t0
    row["tp_ratio"] = ratio
    t0 = time.perf_counter()
    students["prune-random"] = fxrf.prune(teacher, shape, macs=target, importance="random", calibration=calib,
                                          calibration_batches=CAL_BATCHES, seed=seed).model
    built["prune-random"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    students["prune, BN only"] = recalibrate_bn(fxrf.prune(teacher, shape, macs=target, importance="l1").model,
                                                calib, batches=CAL_BATCHES)
    built["prune, BN only"] = time.perf_counter() - t0

    for arm, s in students.items():
        tr, te = fresh()
        r = distill(s, teacher, tr, epochs=mode["distill_epochs"], seed=seed, progress=False, **DISTILL)
        row[arm] = {"macs": macs_of(s, shape) / base_macs, "params": params_of(s) / base_params,
                    "calibrated": acc(s, te), "distilled": acc(r.model, te), "kept_epoch": r.kept_epoch,
                    "build_s": built[arm], "distill_s": r.seconds}
    log(f"  {task} seed {seed}: teacher {row['teacher']:.2f}, target {target:.3f} MACs; " + ", ".join(
        f"{a} {row[a]['calibrated']:.1f}->{row[a]['distilled']:.1f}" for a in ARMS if a in row))
    return row


def paired_test(a, b) -> dict:
    """a - b per seed: mean, sd, 95% t half-width, paired t test p, sign test (wins, losses, ties, p)."""
    from scipy import stats
    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    out = {"n": n, "mean": float(d.mean()), "sd": float(d.std(ddof=1)) if n > 1 else float("nan")}
    out["ci"] = float(stats.t.ppf(0.975, n - 1) * out["sd"] / math.sqrt(n)) if n > 1 else float("nan")
    out["t_p"] = float(stats.ttest_rel(a, b).pvalue) if n > 1 and out["sd"] > 0 else float("nan")
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    out.update(wins=wins, losses=losses, ties=n - wins - losses)
    out["sign_p"] = float(stats.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
    return out


def verdict(t: dict, a: str, b: str) -> str:
    if not math.isfinite(t["ci"]):
        return "not measurable (one seed)"
    lo, hi = t["mean"] - t["ci"], t["mean"] + t["ci"]
    if lo > 0:
        return f"{a} better"
    if hi < 0:
        return f"{b} better"
    return "not resolved (the interval includes 0)"


def accuracy_section(mode: dict, seeds: list, tasks=None) -> dict:
    out = {}
    for task in tasks or TASKS:
        log(f"accuracy: {task}")
        t0 = time.perf_counter()
        rows = [one_seed(task, s, mode) for s in seeds]
        arms = [a for a in ARMS if all(a in r for r in rows)]
        summary = {}
        for a in arms:
            summary[a] = {k: (float(np.mean([r[a][k] for r in rows])), float(np.std([r[a][k] for r in rows], ddof=1))
                              if len(rows) > 1 else 0.0) for k in ("calibrated", "distilled", "macs", "params")}
        tests = {}
        for a, b in COMPARE:
            if a in arms and b in arms:
                for phase in ("calibrated", "distilled"):
                    t = paired_test([r[a][phase] for r in rows], [r[b][phase] for r in rows])
                    t["verdict"] = verdict(t, a, b)
                    tests[f"{a} - {b} ({phase})"] = t
        teacher = [r["teacher"] for r in rows]
        out[task] = {"what": TASKS[task]["what"], "rows": rows, "arms": arms, "summary": summary, "tests": tests,
                     "teacher": (float(np.mean(teacher)), float(np.std(teacher, ddof=1)) if len(rows) > 1 else 0.0),
                     "target": (float(np.mean([r["target"] for r in rows])), rows[0]["target_from"]),
                     "seconds": time.perf_counter() - t0}
    return out


def print_accuracy(acc_doc: dict, mode: dict, seeds: list) -> None:
    print(f"\n### Accuracy at equal MACs ({len(seeds)} paired seeds; test accuracy %, mean ± sd over seeds)\n")
    print(f"Teacher trained {mode['teacher_epochs']} epochs (AdamW 3e-3, wd 5e-4, batch 32); every student "
          f"calibrated on the same {CAL_BATCHES} training batches of 32, then distilled {mode['distill_epochs']} "
          f"epoch(s) against its teacher (fxrf.distill: AdamW lr {DISTILL['lr']}, wd {DISTILL['weight_decay']}, "
          f"T {DISTILL['temperature']}, kd weight {DISTILL['kd_weight']}, the state kept picked on "
          f"{int(100 * DISTILL['validation'])}% of the training data held out).")
    for task, t in acc_doc.items():
        print(f"\n**{task}**: {t['what']}. Teacher {t['teacher'][0]:.2f} ± {t['teacher'][1]:.2f} %. MACs target "
              f"{t['target'][0]:.3f} x the teacher's ({t['target'][1]}); {t['seconds']:.0f} s.\n")
        print("| student | MACs (x teacher) | params (x teacher) | after calibration | after distillation |")
        print("|---|---|---|---|---|")
        for a in ARMS:
            if a not in t["summary"]:
                print(f"| {a} | n/a | n/a | n/a (the decomposer replaces no conv here) | n/a |")
                continue
            s = t["summary"][a]
            print(f"| {a} | {s['macs'][0]:.3f} | {s['params'][0]:.3f} | {s['calibrated'][0]:.2f} ± "
                  f"{s['calibrated'][1]:.2f} | {s['distilled'][0]:.2f} ± {s['distilled'][1]:.2f} |")
        print("\n| paired difference (points) | mean ± sd | 95% CI | t test p | sign test (+/-/=, p) | verdict |")
        print("|---|---|---|---|---|---|")
        for name, x in t["tests"].items():
            print(f"| {name} | {x['mean']:+.2f} ± {x['sd']:.2f} | [{x['mean'] - x['ci']:+.2f}, "
                  f"{x['mean'] + x['ci']:+.2f}] | {x['t_p']:.2g} | {x['wins']}/{x['losses']}/{x['ties']}, "
                  f"{x['sign_p']:.2g} | {x['verdict']} |")


# ------------------------------------------------------------------------------------------------------- latency


def _vgg16_cifar():
    from fxrf.models import vgg16_cifar
    return vgg16_cifar()


def _resnet50():
    import torchvision
    return torchvision.models.resnet50(weights=None)


LATENCY_MODELS = {"vgg16_cifar": (_vgg16_cifar, (3, 32, 32)), "resnet50": (_resnet50, (3, 224, 224))}


def latency_models(name: str) -> tuple:
    """{label: model} at the MACs of decompose(recipe="auto"), and their MACs / params rows."""
    factory, chw = LATENCY_MODELS[name]
    shape = (1, *chw)
    torch.manual_seed(0)
    model = factory().eval()
    base = macs_of(model, shape)
    t0 = time.perf_counter()
    d = fxrf.decompose(model, shape, recipe="auto")
    info = {"decompose_s": time.perf_counter() - t0, "replaced": len(d.changes)}
    target = d.summary["macs_after"] / base
    t0 = time.perf_counter()
    tp_model, ratio, _ = tp_l1(model, shape, target)
    info["tp_s"], info["tp_ratio"] = time.perf_counter() - t0, ratio
    t0 = time.perf_counter()
    p = fxrf.prune(model, shape, macs=target)
    info["prune_s"], info["prune_amount"] = time.perf_counter() - t0, p.amount
    models = {"original": model, "original (2nd instance)": copy.deepcopy(model),
              "decompose(auto)": d.graph_module.eval(), "tp-l1": tp_model.eval(), "fxrf.prune": p.model.eval()}
    rows = {k: {"macs": macs_of(m, shape) / base, "params": params_of(m) / params_of(model)}
            for k, m in models.items()}
    return models, rows, {"target": target, "macs": base, "params": params_of(model), **info}


def time_alternating(fns: dict, x: torch.Tensor, rounds: int) -> dict:
    """{label: [seconds of round 1, 2, ...]}: every callable warmed up (timing.warm_up), then per round each timed
    in turn (the order rotated by one each round) -- the median of its calls in that round (timing.time_calls: up
    to 20 calls, stopping after 0.5 s once 3 are in)."""
    labels = list(fns)
    with torch.no_grad():
        for k in labels:
            warm_up(lambda: fns[k](x), min_calls=3, extra=8)
        times = {k: [] for k in labels}
        for r in range(rounds):
            order = labels[r % len(labels):] + labels[:r % len(labels)]
            for k in order:
                times[k].append(statistics.median(time_calls(lambda: fns[k](x), 20, min_n=3, budget_s=0.5)))
    return times


def ratio_stats(times: dict, a: str, b: str) -> dict:
    """Per-round time(a) / time(b): median, and the 10th-90th percentile of the rounds."""
    r = sorted(x / y for x, y in zip(times[a], times[b]))
    q = np.percentile(r, [10, 90]).tolist()
    return {"median": statistics.median(r), "p10": q[0], "p90": q[1]}


def latency_section(mode: dict, rounds: int, compile_: bool, only: list | None) -> dict:
    from fxrf.passes.latency import compiled  # torch.compile with inductor as fxrf deploys a model
    out = {}
    for name, batches in mode["latency"].items():
        if only and name not in only:
            continue
        log(f"latency: {name}: building the models")
        models, rows, info = latency_models(name)
        out[name] = {"info": info, "rows": rows, "batches": {}}
        chw = LATENCY_MODELS[name][1]
        for batch in batches:
            x = torch.randn(batch, *chw)
            res = {}
            for m in (("eager", "compile") if compile_ else ("eager",)):
                t0 = time.perf_counter()
                if m == "eager":
                    fns = dict(models)
                else:  # each compiled on its own (the 2nd instance too); the first call compiles
                    # the original, its 2nd instance, tp-l1 and fxrf.prune share one class (one forward): without a
                    # reset and a higher limit, dynamo would stop compiling it after 8 entries and run it eager
                    torch._dynamo.reset()
                    cfg = torch._dynamo.config
                    name_ = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
                    setattr(cfg, name_, max(getattr(cfg, name_), 64))
                    fns = {k: compiled(v, x) for k, v in models.items()}
                    with torch.no_grad():
                        for k, f in fns.items():
                            c0 = time.perf_counter()
                            f(x)
                            log(f"  {name} b{batch}: compiled {k} in {time.perf_counter() - c0:.0f} s")
                load0 = load_average()
                log(f"  {name} b{batch} {m}: {rounds} rounds in alternation")
                times = time_alternating(fns, x, rounds)
                res[m] = {"ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
                          "vs_original": {k: ratio_stats(times, k, "original") for k in times},
                          "times": times, "load": [load0, load_average()], "seconds": time.perf_counter() - t0}
                noise = res[m]["vs_original"]["original (2nd instance)"]
                log(f"  {name} b{batch} {m}: noise {noise['median']:.3f} ({time.perf_counter() - t0:.0f} s)")
            out[name]["batches"][batch] = res
            del fns
    return out


def print_latency(lat: dict, rounds: int, compile_: bool) -> None:
    print(f"\n### Latency at the MACs of decompose(auto) (CPU, 1 thread, {rounds} rounds in alternation)\n")
    print("Speedup = the original's time / the model's time in the same round, median over the rounds "
          "[10th-90th percentile of the rounds]. The 2nd instance of the original is the noise: its speedup "
          "should be 1.00.\n")
    for name, d in lat.items():
        i = d["info"]
        print(f"**{name}**: decompose(auto) replaced {i['replaced']} convs, MACs target {i['target']:.3f} x "
              f"({i['macs'] / 1e6:.0f} M MACs, {i['params'] / 1e6:.2f} M params at batch 1); torch-pruning ratio "
              f"{i['tp_ratio']:.3f}, fxrf.prune amount {i['prune_amount']:.3f}.\n")
        modes = ("eager", "compile") if compile_ else ("eager",)
        head = "| model | MACs (x) | params (x) |"
        sep = "|---|---|---|"
        for b in d["batches"]:
            for m in modes:
                head += f" b{b} {m} ms | b{b} {m} speedup |"
                sep += "---|---|"
        print(head)
        print(sep)
        for k, r in d["rows"].items():
            line = f"| {k} | {r['macs']:.3f} | {r['params']:.3f} |"
            for b, res in d["batches"].items():
                for m in modes:
                    if m not in res:
                        line += " - | - |"
                        continue
                    s = res[m]["vs_original"][k]
                    line += (f" {res[m]['ms'][k]:.1f} | {1 / s['median']:.2f} "
                             f"[{1 / s['p90']:.2f}-{1 / s['p10']:.2f}] |")
            print(line)
        print()


# ---------------------------------------------------------------------------------------------------------- main


def versions() -> dict:
    import subprocess
    out = {}
    for pkg in ("torch", "torch-pruning", "torchvision", "numpy", "scipy", "scikit-learn", "fxrf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    try:  # the commit the figures were made at (a tree with changes not committed: marked "+changes")
        here = os.path.dirname(os.path.abspath(__file__))
        git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=here, timeout=10).stdout
        out["git"] = git("rev-parse", "--short", "HEAD").strip() + (
            "+changes" if git("status", "--porcelain", "--untracked-files=no").strip() else "")
    except (OSError, subprocess.SubprocessError):
        out["git"] = None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="< 3 min: 2 seeds, short training, VGG16 b1 eager only")
    p.add_argument("--seeds", type=int, help="paired seeds for the accuracy part (default 20; --quick 2)")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--tasks", help=f"comma-separated subset of {','.join(TASKS)} (default: all)")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--latency-models", help="comma-separated subset of vgg16_cifar,resnet50")
    p.add_argument("--rounds", type=int, help="latency rounds in alternation (default 15; --quick 3)")
    p.add_argument("--no-compile", action="store_true", help="latency: eager only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write every figure here (default out/prune_compare[_quick].json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mode = MODES["quick" if args.quick else "full"]
    seeds = list(range(args.seeds if args.seeds is not None else mode["seeds"]))
    rounds = args.rounds or mode["rounds"]
    compile_ = mode["compile"] and not args.no_compile
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    json_path = args.json or os.path.join(root, "out", f"prune_compare{'_quick' if args.quick else ''}.json")
    doc = {"argv": sys.argv[1:], "versions": versions(), "machine": machine(), "mode": "quick" if args.quick
           else "full", "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    start = time.perf_counter()

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1, default=str)

    v = doc["versions"]
    print(f"fxrf at {v['git']}, torch {v['torch']}, torch-pruning {v['torch-pruning']}, "
          f"torchvision {v['torchvision']}, "
          f"{torch.get_num_threads()} thread(s), {doc['machine']['cpu_model']} ({doc['machine']['cpu_count']} "
          f"cores), load average at start {load_average()}")
    if not args.skip_accuracy:
        doc["accuracy"] = accuracy_section(mode, seeds, args.tasks.split(",") if args.tasks else None)
        doc["accuracy_s"] = time.perf_counter() - start
        save()
        print_accuracy(doc["accuracy"], mode, seeds)
        print(f"\n(accuracy part: {doc['accuracy_s']:.0f} s)")
    if not args.skip_latency:
        t0 = time.perf_counter()
        only = args.latency_models.split(",") if args.latency_models else None
        doc["latency"] = latency_section(mode, rounds, compile_, only)
        doc["latency_s"] = time.perf_counter() - t0
        save()
        print_latency(doc["latency"], rounds, compile_)
        print(f"(latency part: {doc['latency_s']:.0f} s; load average at the end {load_average()})")
    doc["seconds"] = time.perf_counter() - start
    save()
    print(f"total {doc['seconds']:.0f} s; figures in {os.path.relpath(json_path, root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
