"""Accuracy evidence: does the 3DRF predict accuracy, and can a rewritten model get its accuracy back?

Every figure of docs/accuracy.md comes from this one script, on data that needs no download (fxrf.training.datasets):
MNIST-1D for 1-D networks (nn.Conv1d, the 3DRF with d = 1) and scikit-learn's 8x8 digits, bilinearly upsampled to
16x16 (room for four stages of 2x2 pooling), for 2-D networks.

- Table 2 analogue: a VGG-style baseline (four stages, 1, 1, 2, 2 convs); variant (i, k) adds one k x k conv at
  the end of stage i. Seeds are paired (the same data split, loader order and seed for the baseline and every
  variant), so each seed gives one accuracy difference per variant.
- Table 3 analogue: the baseline against `fxrf.organize_stages` outputs (each setting), trained from scratch.
- Table 6 analogue (2-D: the decomposer rewrites nn.Conv2d): the decomposer's recipes on the organized model,
  (a) trained from scratch and (b) initialised from the trained organized model by the best transfer (SVD,
  + batch-norm re-estimation, or the least-squares block fit of fxrf.training.calibrate; the one closest to the
  teacher on the training data) and distilled for a fifth of the epochs.
- Proxy check: random 1-D architectures trained briefly; Kendall tau of accuracy against 3DRF scores, params
  and MACs.

    python benchmarks/accuracy.py --quick          # a few minutes: 2 seeds, fewer variants and epochs
    python benchmarks/accuracy.py                  # the full run (about 30 min on one thread)
    python benchmarks/accuracy.py --render out/accuracy.json --md docs/accuracy.md   # re-render only

The JSON (seeds, library versions, wall times, every per-seed figure) is written after every section, so an
interrupted run still renders what it finished.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from importlib import metadata

import numpy as np
import torch
import torch.nn as nn

import fxrf
from fxrf.cost import total
from fxrf.training.datasets import digits, loaders, mnist1d
from fxrf.training.distill import distill, evaluate, kl_to_teacher, train

# ---------------------------------------------------------------------------------------------- configuration

# Training-set sizes are chosen so that the baselines sit well below saturation (about 86% on MNIST-1D with
# 1,000 training signals, 92-93% on the digits with 100 training images; with 8,000 MNIST-1D signals a plain
# 3-stage net reaches ~98.5% and every difference drowns in the last percent), and so that the full run fits in
# about 30 minutes on one CPU thread.
NETS = {
    "1d": {"dims": 1, "layout": (1, 1, 2, 2), "widths": (8, 16, 32, 32), "res": 40, "batch": 128,
           "data": "MNIST-1D, 1,000 training signals (100 per class), 4,000 test signals"},
    "2d": {"dims": 2, "layout": (1, 1, 2, 2), "widths": (8, 16, 32, 32), "res": 16, "batch": 32,
           "data": "8x8 digits upsampled to 16x16, 100 training images (10 per class), 1,697 test images"},
}
MODES = {
    "quick": {"seeds": 2, "kernels": (3,), "epochs": {"1d": 8, "2d": 20}, "t6_seeds": 1,
              "recipes": ("DW+PW", "DW+GPW-g4", "DW+RPW-g4-o50"), "proxy_archs": 6, "proxy_epochs": 5,
              "bootstrap": 500},
    "full": {"seeds": 5, "kernels": (3, 5), "epochs": {"1d": 20, "2d": 40}, "t6_seeds": 5,
             "recipes": ("DW+PW", "DW+GPW-g2", "DW+GPW-g4", "DW+RPW-g2-o50", "DW+RPW-g4-o50"), "proxy_archs": 30,
             "proxy_epochs": 10, "bootstrap": 2000},
}
ORGANIZER_SETTINGS = (("defaults", {}), ("macs_budget=1.5", {"macs_budget": 1.5}))
CALIBRATION_BATCHES = 8
DISTILL_FRACTION = 5  # (b) distils for epochs // 5


def dataset(net: str, seed: int):
    if net == "1d":
        return mnist1d(n_train=1000, n_test=4000, seed=seed)
    return digits(n_train=100, seed=seed, size=16)


# ------------------------------------------------------------------------------------------------------ models


def vgg(net: str, layout=None, insert: tuple | None = None, widths=None, kernel=3, kind="standard",
        classes: int = 10):
    """VGG-style: per stage, `layout[s]` conv(k) + BN + ReLU, then 2x max pooling; flatten, one linear layer.
    insert=(stage, k): one more k x k conv at the end of that stage. Returns (model, index of the inserted conv
    in the Sequential or None). kind: "standard", "dwpw" (depthwise k + BN + ReLU + pointwise 1x1) or
    "grouped" (two groups) for every conv but the first."""
    cfg = NETS[net]
    dims, res = cfg["dims"], cfg["res"]
    layout, widths = layout or cfg["layout"], widths or cfg["widths"]
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    bn = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    pool = nn.MaxPool1d if dims == 1 else nn.MaxPool2d
    layers, c, where = [], 1, None
    for s, (n, w) in enumerate(zip(layout, widths)):
        ks = [kernel] * n
        if insert is not None and insert[0] == s:
            ks.append(insert[1])
        for i, k in enumerate(ks):
            if insert is not None and insert[0] == s and i == len(ks) - 1:
                where = len(layers)
            if kind == "dwpw" and c > 1:
                layers += [conv(c, c, k, padding=k // 2, groups=c), bn(c), nn.ReLU(), conv(c, w, 1)]
            else:
                g = 2 if kind == "grouped" and c > 1 and c % 2 == 0 and w % 2 == 0 else 1
                layers.append(conv(c, w, k, padding=k // 2, groups=g))
            layers += [bn(w), nn.ReLU()]
            c = w
        layers.append(pool(2))
        res //= 2
    layers += [nn.Flatten(), nn.Linear(c * res ** dims, classes)]
    return nn.Sequential(*layers), where


def input_shape(net: str) -> tuple:
    cfg = NETS[net]
    return (1, 1) + (cfg["res"],) * cfg["dims"]


def reinit(model: nn.Module, seed: int) -> nn.Module:
    """Fresh parameters (PyTorch's default initialisation) from `seed`: training from scratch."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
    return model


def costs(model: nn.Module, net: str) -> dict:
    c = total(fxrf.analyze(model, input_shape(net)).costs)
    return {"params": c.params, "macs": c.macs}


def fit(net: str, model: nn.Module, seed: int, epochs: int) -> dict:
    """Train from the model's current weights; test accuracy and wall time."""
    split = dataset(net, seed)
    tr, te = loaders(split, batch_size=NETS[net]["batch"], seed=seed)
    r = train(model, tr, epochs, seed=seed, progress=False)
    return {"accuracy": evaluate(model, te), "seconds": r.seconds}


# ------------------------------------------------------------------------------------------------- statistics


def t_interval(xs) -> tuple:
    """Mean and 95% t-interval half-width."""
    from scipy import stats
    xs = np.asarray(xs, dtype=float)
    if len(xs) < 2:
        return float(xs.mean()), float("nan")
    return float(xs.mean()), float(stats.t.ppf(0.975, len(xs) - 1) * xs.std(ddof=1) / math.sqrt(len(xs)))


def spearman_bootstrap(gains, deltas, reps: int, seed: int = 0) -> dict:
    """Spearman rho between the gains and the mean accuracy difference of each variant; 95% percentile interval
    from resampling the seeds (the same resampled seeds for every variant: the design is paired)."""
    from scipy import stats
    d = np.asarray(deltas, dtype=float)  # [variants, seeds]
    rho = float(stats.spearmanr(gains, d.mean(1)).statistic)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(reps):
        idx = rng.integers(0, d.shape[1], d.shape[1])
        r = stats.spearmanr(gains, d[:, idx].mean(1)).statistic
        if np.isfinite(r):
            boots.append(r)
    lo, hi = (np.percentile(boots, [2.5, 97.5]).tolist() if boots else (float("nan"), float("nan")))
    return {"rho": rho, "lo": lo, "hi": hi, "reps": len(boots)}


def kendall_bootstrap(score, acc, reps: int, seed: int = 0) -> dict:
    from scipy import stats
    score, acc = np.asarray(score, float), np.asarray(acc, float)
    tau = float(stats.kendalltau(score, acc).statistic)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(reps):
        idx = rng.integers(0, len(acc), len(acc))
        r = stats.kendalltau(score[idx], acc[idx]).statistic
        if np.isfinite(r):
            boots.append(r)
    lo, hi = np.percentile(boots, [2.5, 97.5]).tolist() if boots else (float("nan"), float("nan"))
    return {"tau": tau, "lo": lo, "hi": hi}


def verdict(lo: float, hi: float) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "not measurable"
    if lo > 0:
        return "supported"
    if hi < 0:
        return "contradicted"
    return "not resolved at this scale (the interval includes 0)"


# ------------------------------------------------------------------------------------------------- Table 2


def table2(net: str, mode: dict, log) -> dict:
    seeds, epochs = list(range(mode["seeds"])), mode["epochs"][net]
    stages = len(NETS[net]["layout"])
    variants = [None] + [(s, k) for k in mode["kernels"] for s in range(stages)]
    rows = []
    base_model, _ = vgg(net)
    base_cost = costs(base_model, net)
    for v in variants:
        model, where = vgg(net, insert=v)
        gain = None
        if v is not None:
            a = fxrf.analyze(model, input_shape(net))
            node = next(n for n in a.graph_module.graph.nodes if n.op == "call_module" and n.target == str(where))
            gain = a.record(node.name).gain
        row = {"variant": "baseline" if v is None else f"stage {v[0]} + conv k{v[1]}" if NETS[net]["dims"] == 1
               else f"stage {v[0]} + conv {v[1]}x{v[1]}", "stage": None if v is None else v[0],
               "kernel": None if v is None else v[1], "gain": gain, **costs(model, net), "runs": []}
        for seed in seeds:
            torch.manual_seed(seed)
            m, _ = vgg(net, insert=v)
            row["runs"].append({"seed": seed, **fit(net, m, seed, epochs)})
            log(f"  t2 {net} {row['variant']:>16} seed {seed}: {row['runs'][-1]['accuracy']:.4f} "
                f"({row['runs'][-1]['seconds']:.1f} s)")
        rows.append(row)
    base = [r["accuracy"] for r in rows[0]["runs"]]
    for row in rows:
        accs = [r["accuracy"] for r in row["runs"]]
        row["mean"], row["std"] = float(np.mean(accs)), float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
        row["deltas"] = [a - b for a, b in zip(accs, base)]
        row["delta"], row["delta_ci"] = t_interval(row["deltas"])
    var = rows[1:]
    corr = spearman_bootstrap([r["gain"] for r in var], [r["deltas"] for r in var], mode["bootstrap"])
    corr["verdict"] = verdict(corr["lo"], corr["hi"])
    return {"net": net, "data": NETS[net]["data"], "layout": NETS[net]["layout"], "widths": NETS[net]["widths"],
            "epochs": epochs, "seeds": seeds, "baseline_cost": base_cost, "rows": rows, "spearman": corr}


# ------------------------------------------------------------------------------------------------- Table 3


def organizer_settings() -> list:
    """The organizer's settings to compare; a `strategy` argument, where the organizer has one, adds its values."""
    import inspect

    from fxrf.passes.organizer import organize_stages
    out = list(ORGANIZER_SETTINGS)
    if "strategy" in inspect.signature(organize_stages).parameters:
        out = [(f"greedy, {label}", kw) for label, kw in out] + [("paper", {"strategy": "paper"})]
    return out


def table3(net: str, mode: dict, t2: dict, log, keep: dict) -> dict:
    seeds, epochs = t2["seeds"], t2["epochs"]
    base_runs = t2["rows"][0]["runs"]
    base, _ = vgg(net)
    base.eval()
    rows = [{"setting": "baseline", "layout": None, **t2["baseline_cost"], "runs": base_runs, "same_as": None}]
    trained: dict = {}
    for label, kw in organizer_settings():
        t0 = time.perf_counter()
        r = fxrf.organize_stages(base, input_shape(net), **kw)
        layout = r.summary["stage_convs"]
        rows[0]["layout"] = rows[0]["layout"] or r.summary["convs_per_stage_before"]  # counted the same way
        row = {"setting": label, "layout": layout, **costs(r.graph_module, net), "organize_seconds":
               time.perf_counter() - t0, "changes": [f"{c.kind} stage {c.stage} (gain {c.gain:.3f})"
                                                      for c in r.changes], "same_as": None, "runs": []}
        same = next((x for x in rows if x["layout"] == layout), None)
        if same is not None:  # the same architecture: its accuracies stand
            row["same_as"], row["runs"] = same["setting"], same["runs"]
            trained[label] = trained.get(same["setting"])
        else:
            models = []
            for seed in seeds:
                m = reinit(copy.deepcopy(r.graph_module), seed)
                row["runs"].append({"seed": seed, **fit(net, m, seed, epochs)})
                models.append(m)
                log(f"  t3 {net} {label:>16} seed {seed}: {row['runs'][-1]['accuracy']:.4f}")
            trained[label] = (r.graph_module, models)
        rows.append(row)
    for row in rows:
        accs = [x["accuracy"] for x in row["runs"]]
        row["mean"], row["std"] = float(np.mean(accs)), float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
        row["delta"], row["delta_ci"] = t_interval([a["accuracy"] - b["accuracy"]
                                                    for a, b in zip(row["runs"], base_runs)])
    keep[net] = trained
    return {"net": net, "seeds": seeds, "epochs": epochs, "rows": rows,
            "strategy_argument": any(kw.get("strategy") for _, kw in organizer_settings())}


# ------------------------------------------------------------------------------------------------- Table 6


def _decomposable_per_stage(result) -> list:
    return [len(s.convs) for s in result.stages]


def table6(mode: dict, t3: dict, keep: dict, log) -> dict:
    from fxrf.training.calibrate import fit_blocks, recalibrate_bn
    net = "2d"
    epochs, seeds = t3["epochs"], t3["seeds"][:mode["t6_seeds"]]
    # the organized model whose stages hold the most decomposable convs: DW+RPW differs from DW+GPW only where a
    # stage has two grouped layers (the first grouped layer of a stage is not rotated)
    best, best_n = None, -1
    for row in t3["rows"][1:]:
        entry = keep[net].get(row["setting"])
        if entry is None:
            continue
        d = fxrf.decompose(entry[0], input_shape(net), recipe="DW+PW", transfer_weights=False)
        n = max(_decomposable_per_stage(d))
        if n > best_n:
            best, best_n = row, n
    gm, teachers = keep[net][best["setting"]]
    shape = input_shape(net)
    out = {"net": net, "organized": best["setting"], "layout": best["layout"], "epochs": epochs, "seeds": seeds,
           "distill_epochs": max(1, epochs // DISTILL_FRACTION), "rows": []}
    out["rows"].append({"recipe": "S (organized)", "params": best["params"], "macs": best["macs"],
                        "quality": True, "scratch": [{"seed": r["seed"], "accuracy": r["accuracy"],
                                                      "seconds": r["seconds"]} for r in best["runs"][:len(seeds)]]})
    for recipe in mode["recipes"]:
        shape_only = fxrf.decompose(gm, shape, recipe=recipe, transfer_weights=False, fold=False)
        row = {"recipe": recipe, "params": shape_only.summary["params_after"],
               "macs": shape_only.summary["macs_after"], "quality": shape_only.summary["quality"],
               "stage_quality": [s.quality for s in shape_only.stages],
               "shifts": [c.shift for c in shape_only.changes if hasattr(c, "shift")],
               "permutations": shape_only.summary["permutations_remaining"], "scratch": [], "transfer": []}
        for i, seed in enumerate(seeds):
            m = reinit(copy.deepcopy(shape_only.graph_module), seed)
            row["scratch"].append({"seed": seed, **fit(net, m, seed, epochs)})
            teacher = teachers[i].eval()
            split = dataset(net, seed)
            tr, te = loaders(split, batch_size=NETS[net]["batch"], seed=seed)
            t0 = time.perf_counter()
            d = fxrf.decompose(teacher, shape, recipe=recipe, transfer_weights=True, fold=False)
            t_svd = time.perf_counter() - t0
            cands = {"svd": d.graph_module.eval()}
            t0 = time.perf_counter()
            cands["svd+bn"] = recalibrate_bn(d.graph_module, tr, batches=CALIBRATION_BATCHES).eval()
            t_bn = time.perf_counter() - t0
            t0 = time.perf_counter()
            cal = fit_blocks(teacher, d, tr, batches=CALIBRATION_BATCHES)
            cands["lsq"] = cal.graph_module.eval()
            t_lsq = time.perf_counter() - t0
            rec = {"seed": seed, "teacher": evaluate(teacher, te), "svd_seconds": t_svd, "bn_seconds": t_bn,
                   "lsq_seconds": t_lsq, "lsq_error_before": cal.summary["mean_error_before"],
                   "lsq_error_after": cal.summary["mean_error_after"]}
            kls = {}
            for name, cm in cands.items():
                rec[f"acc_{name}"] = evaluate(cm, te)
                kls[name] = kl_to_teacher(cm, teacher, tr, temperature=1.0)
                rec[f"kl_{name}"] = kls[name]
            pick = min(kls, key=kls.get)  # closest to the teacher on the training data: no test labels used
            r = distill(cands[pick], teacher, tr, epochs=out["distill_epochs"], seed=seed, progress=False)
            rec.update({"picked": pick, "accuracy": evaluate(r.model, te), "distill_seconds": r.seconds,
                        "seconds": t_svd + {"svd": 0, "svd+bn": t_bn, "lsq": t_lsq}[pick] + r.seconds})
            row["transfer"].append(rec)
            log(f"  t6 {recipe:>14} seed {seed}: scratch {row['scratch'][-1]['accuracy']:.4f}, after transfer "
                f"svd {rec['acc_svd']:.4f} bn {rec['acc_svd+bn']:.4f} lsq {rec['acc_lsq']:.4f} -> {pick}, "
                f"distilled {rec['accuracy']:.4f}")
        out["rows"].append(row)
    for row in out["rows"]:
        for key in ("scratch", "transfer"):
            if row.get(key):
                accs = [x["accuracy"] for x in row[key]]
                row[f"{key}_mean"] = float(np.mean(accs))
                row[f"{key}_std"] = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
                row[f"{key}_seconds"] = float(np.mean([x["seconds"] for x in row[key]]))
        if row.get("transfer"):
            for name in ("svd", "svd+bn", "lsq"):
                row[f"acc_{name}_mean"] = float(np.mean([x[f"acc_{name}"] for x in row["transfer"]]))
    return out


# ----------------------------------------------------------------------------------------------------- proxy


def random_arch(rng: random.Random) -> dict:
    depth = [rng.choice((1, 2, 3)) for _ in range(4)]
    widths = sorted(rng.choice((8, 16, 24, 32)) for _ in range(4))
    return {"layout": depth, "widths": widths, "kernel": rng.choice((3, 5, 7)),
            "kind": rng.choice(("standard", "dwpw", "grouped"))}


def scores(model: nn.Module, net: str) -> dict:
    """3DRF scores of an architecture. coverage: the mean over stages of the 3DRF volume at the stage's last conv
    over V_0 (how much of its input a stage ends up seeing); gain_sum: the sum of the gains of the convs that are
    not the first of their stage (a stage's first conv grows from a single voxel: its gain measures nothing)."""
    a = fxrf.analyze(model, input_shape(net))
    convs = [r for r in a.convs() if r.stage is not None]
    coverage, gain_sum = [], 0.0
    for st in a.stages:
        mine = [r for r in convs if r.stage == st.index]
        if not mine:
            continue
        coverage.append(mine[-1].rf.volume / st.volume)
        gain_sum += sum(r.gain for r in mine[1:] if r.gain is not None)
    c = total(a.costs)
    return {"coverage": float(np.mean(coverage)), "gain_sum": gain_sum, "params": c.params, "macs": c.macs}


def proxy(mode: dict, log) -> dict:
    net = "1d"
    rng = random.Random(2024)
    archs, seen = [], set()
    while len(archs) < mode["proxy_archs"]:
        a = random_arch(rng)
        key = json.dumps(a, sort_keys=True)
        if key not in seen:
            seen.add(key)
            archs.append(a)
    rows = []
    for i, a in enumerate(archs):
        torch.manual_seed(i)
        model, _ = vgg(net, layout=a["layout"], widths=a["widths"], kernel=a["kernel"], kind=a["kind"])
        row = {**a, **scores(model, net)}
        row.update(fit(net, model, 0, mode["proxy_epochs"]))
        rows.append(row)
        log(f"  proxy {i:2d} {a}: acc {row['accuracy']:.4f} coverage {row['coverage']:.3f} "
            f"gain_sum {row['gain_sum']:.3f}")
    acc = [r["accuracy"] for r in rows]
    taus = {k: kendall_bootstrap([r[k] for r in rows], acc, mode["bootstrap"])
            for k in ("coverage", "gain_sum", "params", "macs")}
    return {"net": net, "epochs": mode["proxy_epochs"], "rows": rows, "kendall": taus,
            "space": "4 stages (40, 20, 10, 5), 1-3 convs each, widths sorted from {8, 16, 24, 32}, kernel "
                     "3/5/7, kind standard / depthwise+pointwise / 2 groups (the first conv standard)"}


# ---------------------------------------------------------------------------------------------------- runner


def versions(extra=()) -> dict:
    """Python, platform, torch, threads, the packages the figures depend on (and `extra` ones), the git commit."""
    out = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "threads": torch.get_num_threads()}
    for pkg in ("numpy", "scipy", "scikit-learn", "mnist1d", "tqdm", "fxrf") + tuple(extra):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    try:
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                                    text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                                    timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["git"] = ""
    out["git"] = out["git"] or os.environ.get("FXRF_COMMIT")  # a run from an exported tree names its commit so
    return out


def run(mode_name: str, sections, json_path: str, log) -> dict:
    mode = MODES[mode_name]
    doc = {"mode": mode_name, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in mode.items()},
           "nets": {k: {kk: vv for kk, vv in v.items()} for k, v in NETS.items()}, "versions": versions(),
           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "sections": {}, "seconds": {},
           "complete": False}
    keep: dict = {}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        os.replace(tmp, json_path)

    start = time.perf_counter()
    for net in ("1d", "2d"):
        if "t2" in sections or "t3" in sections or ("t6" in sections and net == "2d"):
            log(f"table 2 ({net})")
            t0 = time.perf_counter()
            doc["sections"][f"t2_{net}"] = table2(net, mode, log)
            doc["seconds"][f"t2_{net}"] = time.perf_counter() - t0
            save()
        if "t3" in sections or ("t6" in sections and net == "2d"):
            log(f"table 3 ({net})")
            t0 = time.perf_counter()
            doc["sections"][f"t3_{net}"] = table3(net, mode, doc["sections"][f"t2_{net}"], log, keep)
            doc["seconds"][f"t3_{net}"] = time.perf_counter() - t0
            save()
    if "t6" in sections:
        log("table 6 (2d)")
        t0 = time.perf_counter()
        doc["sections"]["t6"] = table6(mode, doc["sections"]["t3_2d"], keep, log)
        doc["seconds"]["t6"] = time.perf_counter() - t0
        save()
    if "proxy" in sections:
        log("proxy check (1d)")
        t0 = time.perf_counter()
        doc["sections"]["proxy"] = proxy(mode, log)
        doc["seconds"]["proxy"] = time.perf_counter() - t0
        save()
    doc["seconds"]["total"] = time.perf_counter() - start
    doc["complete"] = True
    doc["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    save()
    return doc


# ---------------------------------------------------------------------------------------------------- render


def pct(x, digits=1):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.{digits}f}"


def pm(mean, std, digits=1):
    return f"{pct(mean, digits)} ± {pct(std, digits)}"


def fmt_int(n):
    return f"{n:,}"


def plots(doc: dict, img_dir: str) -> dict:
    """The figures; returns {name: file name}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(img_dir, exist_ok=True)
    out = {}

    def save(fig, key, name):
        fig.tight_layout()
        out[key] = name
        fig.savefig(os.path.join(img_dir, name), dpi=110)
        plt.close(fig)
    secs = doc["sections"]
    nets = [n for n in ("1d", "2d") if f"t2_{n}" in secs]
    if nets:
        fig, axes = plt.subplots(1, len(nets), figsize=(5.5 * len(nets), 4), squeeze=False)
        for ax, net in zip(axes[0], nets):
            rows = secs[f"t2_{net}"]["rows"][1:]
            for k, marker in ((3, "o"), (5, "s")):
                rs = [r for r in rows if r["kernel"] == k]
                if rs:
                    ax.errorbar([r["gain"] for r in rs], [100 * r["delta"] for r in rs],
                                yerr=[100 * (r["delta_ci"] if math.isfinite(r["delta_ci"]) else 0) for r in rs],
                                fmt=marker, capsize=3, label=f"+{k}-tap conv")
                    for r in rs:
                        ax.annotate(f"s{r['stage']}", (r["gain"], 100 * r["delta"]), textcoords="offset points",
                                    xytext=(4, 4), fontsize=8)
            ax.axhline(0, color="grey", lw=0.8)
            sp = secs[f"t2_{net}"]["spearman"]
            ax.set_title(f"{net}: Spearman {sp['rho']:.2f} [{sp['lo']:.2f}, {sp['hi']:.2f}]")
            ax.set_xlabel("3DRF gain of the inserted conv")
            ax.set_ylabel("Δ accuracy vs baseline (points, 95% CI)")
            ax.legend(fontsize=8)
        save(fig, "t2", "accuracy_table2.png")
    if "t6" in secs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for row in secs["t6"]["rows"]:
            m = row["macs"] / 1e3
            ax.scatter([m], [100 * row["scratch_mean"]], marker="o", color="C0")
            if row.get("transfer"):
                ax.scatter([m], [100 * row["transfer_mean"]], marker="^", color="C1")
            ax.annotate(row["recipe"].replace(" (organized)", ""), (m, 100 * row["scratch_mean"]),
                        textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.scatter([], [], marker="o", color="C0", label="(a) from scratch")
        ax.scatter([], [], marker="^", color="C1", label="(b) transfer + distillation")
        ax.set_xlabel("MACs (thousands, per image)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Table 6 analogue (digits 16x16)")
        ax.legend(fontsize=8)
        save(fig, "t6", "accuracy_table6.png")
    if "proxy" in secs:
        rows = secs["proxy"]["rows"]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, key, label in ((axes[0], "coverage", "3DRF coverage score"), (axes[1], "params", "parameters"),
                               (axes[2], "macs", "MACs")):
            for kind, color in (("standard", "C0"), ("dwpw", "C1"), ("grouped", "C2")):
                rs = [r for r in rows if r["kind"] == kind]
                ax.scatter([r[key] for r in rs], [100 * r["accuracy"] for r in rs], color=color, label=kind, s=18)
            t = secs["proxy"]["kendall"][key]
            ax.set_title(f"Kendall tau {t['tau']:.2f} [{t['lo']:.2f}, {t['hi']:.2f}]")
            ax.set_xlabel(label)
            if key != "coverage":
                ax.set_xscale("log")
        axes[0].set_ylabel("test accuracy (%)")
        axes[0].legend(fontsize=8)
        save(fig, "proxy", "accuracy_proxy.png")
    return out


def render(doc: dict, img_dir: str, img_link: str) -> str:
    secs, secs_t = doc["sections"], doc["seconds"]
    figs = plots(doc, img_dir)
    v = doc["versions"]
    L = []
    w = L.append
    w("# Accuracy: does the 3DRF predict it, and can a rewritten model get it back?\n")
    w("Generated by `benchmarks/accuracy.py` from its JSON (`--render`); do not edit by hand. "
      f"Mode **{doc['mode']}**, started {doc['started']}" + (f", finished {doc['finished']}" if doc.get("finished")
                                                            else " (**incomplete**: the sections below finished)")
      + ".\n")
    w(f"Versions: Python {v['python']}, torch {v['torch']}, numpy {v['numpy']}, scipy {v['scipy']}, "
      f"scikit-learn {v['scikit-learn']}, mnist1d {v['mnist1d']}; fxrf commit {v.get('git')}; "
      f"{v['threads']} torch thread(s); {v['platform']}.\n")
    w("Wall times (s): " + ", ".join(f"{k} {s:.0f}" for k, s in secs_t.items()) + " (one CPU thread; the "
      "machine may have been shared with other jobs).\n")
    w("Reproduce: `python benchmarks/accuracy.py` (this full run; `--quick` for a few minutes: 2 seeds, fewer "
      "variants and epochs), which writes `out/accuracy.json` and this page; `python benchmarks/accuracy.py "
      "--render docs/accuracy.json --md docs/accuracy.md` renders the committed JSON again. Needs scikit-learn, "
      "mnist1d, scipy and matplotlib.\n")
    w("## Data and networks\n")
    w("No download: MNIST-1D is generated by the `mnist1d` package's own generator (fixed seed 42, a pool of "
      "10,000 signals, cached under the user's cache directory); the 8x8 digits ship inside scikit-learn. Both "
      "splits are stratified per seed (`fxrf.training.datasets`). Each net is VGG-style: per stage conv + BN + ReLU, 2x "
      "max pooling after each stage, one linear classifier; every run trains with AdamW (lr 3e-3, weight decay "
      "5e-4, cosine decay), batch 128 (1-D) / 32 (2-D).\n")
    for net, cfg in doc["nets"].items():
        w(f"- **{net}**: {cfg['data']}; layout {tuple(cfg['layout'])} convs per stage, widths "
          f"{tuple(cfg['widths'])}, input {cfg['res']}" + ("" if cfg["dims"] == 1 else f"x{cfg['res']}") + ".")
    w("\nWhy these sizes: with 8,000 training signals a plain 3-stage conv1d net reaches about 98.5% on MNIST-1D "
      "and the digits at 1,000+ images reach 98-99%; differences of a conv then sit in the last percent, inside "
      "the seed noise. 1,000 signals / 100 images keep the baselines near 86% / 92%, where a better or worse "
      "architecture can show, and keep the full run near 30 minutes on one thread.\n")
    for net in ("1d", "2d"):
        t2 = secs.get(f"t2_{net}")
        if not t2:
            continue
        w(f"## Table 2 analogue ({net}): one more conv at the end of stage i\n")
        w(f"{len(t2['seeds'])} paired seeds (split, order and initialisation shared by the baseline and every "
          f"variant), {t2['epochs']} epochs. Δ: mean of the per-seed differences, 95% t-interval. Gain: "
          f"`fxrf.analyze(variant).record(inserted conv).gain` (alpha 3).\n")
        w("| variant | gain | params | MACs | accuracy % (mean ± std) | Δ accuracy (points, 95% CI) |")
        w("|---|---|---|---|---|---|")
        for r in t2["rows"]:
            gain = "-" if r["gain"] is None else f"{r['gain']:.3f}"
            d = "-" if r["variant"] == "baseline" else f"{100 * r['delta']:+.2f} ± {100 * r['delta_ci']:.2f}"
            w(f"| {r['variant']} | {gain} | {fmt_int(r['params'])} | {fmt_int(r['macs'])} | "
              f"{pm(r['mean'], r['std'], 2)} | {d} |")
        sp = t2["spearman"]
        c = contrast(t2)
        w(f"\nAbove vs at-or-below the organizer's threshold (gain {THRESHOLD}): per seed, the mean Δ of the "
          f"{c['high']} variants above minus that of the {c['low']} at or below: **{100 * c['mean']:+.2f} ± "
          f"{100 * c['ci']:.2f} points** (95% t-interval over the seeds).")
        w(f"\nSpearman rank correlation between gain and Δ accuracy over the {len(t2['rows']) - 1} variants: "
          f"**{sp['rho']:.2f}** (95% bootstrap interval over seeds [{sp['lo']:.2f}, {sp['hi']:.2f}], "
          f"{sp['reps']} resamples). Verdict on \"a larger 3DRF gain gives a larger accuracy gain\": "
          f"**{sp['verdict']}**.\n")
    if figs.get("t2"):
        w(f"![Table 2 analogue]({img_link}/{figs['t2']})\n")
    for net in ("1d", "2d"):
        t3 = secs.get(f"t3_{net}")
        if not t3:
            continue
        w(f"## Table 3 analogue ({net}): baseline vs `fxrf.organize_stages`\n")
        w("Every organized model is re-initialised and trained from scratch with the baseline's seeds and epochs"
          + ("; the organizer's two strategies are both run: `strategy=\"greedy\"` (its default: threshold 0.3, "
             "MACs budget 1.25, and a budget of 1.5) and `strategy=\"paper\"`." if
             t3["strategy_argument"] else "; the organizer offered no `strategy` argument when this ran, so its "
             "settings are the defaults (threshold 0.3, MACs budget 1.25) and a MACs budget of 1.5.") + "\n")
        w("| setting | convs per stage | params | MACs | accuracy % (mean ± std) | Δ vs baseline (95% CI) | changes |")
        w("|---|---|---|---|---|---|---|")
        for r in t3["rows"]:
            d = "-" if r["setting"] == "baseline" else f"{100 * r['delta']:+.2f} ± {100 * r['delta_ci']:.2f}"
            ch = "; ".join(r.get("changes", [])) or "-"
            if r.get("same_as"):
                ch += f" (same layout as {r['same_as']}: its runs)"
            w(f"| {r['setting']} | {', '.join(map(str, r['layout']))} | {fmt_int(r['params'])} | "
              f"{fmt_int(r['macs'])} | {pm(r['mean'], r['std'], 2)} | {d} | {ch} |")
        w("")
    t6 = secs.get("t6")
    if t6:
        w("## Table 6 analogue (2d): the decomposer's recipes on the organized model\n")
        w(f"On the organizer's `{t6['organized']}` output (layout {', '.join(map(str, t6['layout']))}; chosen "
          f"because it has the stage with the most decomposable convs: DW+RPW differs from DW+GPW only from the "
          f"second grouped layer of a stage on). Every conv but the first is replaced. (a): re-initialised, "
          f"{t6['epochs']} epochs. (b): the trained organized model (the teacher, per seed) decomposed with "
          f"`transfer_weights=True`; three transfers are measured right after the rewrite, before any training: "
          f"SVD alone, SVD + batch-norm re-estimation (`recalibrate_bn`), and the least-squares block fit "
          f"(`fit_blocks`, {CALIBRATION_BATCHES} training batches); the one closest to the teacher on the "
          f"training data (KL, no test labels) is distilled for {t6['distill_epochs']} epochs (T = 4, "
          f"KL + CE). {len(t6['seeds'])} seed(s). Wall time: (a) the training, (b) transfer + calibration + "
          f"distillation.\n")
        w("| recipe | 3DRF kept | params | MACs | (a) scratch % | (a) s | right after transfer: SVD / +BN / LSQ % "
          "| (b) transfer + distill % | (b) s |")
        w("|---|---|---|---|---|---|---|---|---|")
        for r in t6["rows"]:
            after = "-" if not r.get("transfer") else (
                f"{pct(r['acc_svd_mean'])} / {pct(r['acc_svd+bn_mean'])} / {pct(r['acc_lsq_mean'])}")
            tr = "-" if not r.get("transfer") else pm(r["transfer_mean"], r["transfer_std"])
            ts = "-" if not r.get("transfer") else f"{r['transfer_seconds']:.1f}"
            w(f"| {r['recipe']} | {'yes' if r['quality'] else 'no'} | {fmt_int(r['params'])} | {fmt_int(r['macs'])}"
              f" | {pm(r['scratch_mean'], r['scratch_std'])} | {r['scratch_seconds']:.1f} | {after} | {tr} | {ts} |")
        picks = [x["picked"] for r in t6["rows"] for x in r.get("transfer", [])]
        w("\nTransfer picked: " + ", ".join(f"{p} {picks.count(p)}x" for p in sorted(set(picks))) + ".")
        errs = [(x["lsq_error_before"], x["lsq_error_after"]) for r in t6["rows"] for x in r.get("transfer", [])
                if x["lsq_error_before"] is not None]
        if errs:
            w(f" Least-squares fit, relative output error of the blocks on the calibration data: "
              f"{np.mean([e[0] for e in errs]):.3f} before, {np.mean([e[1] for e in errs]):.3f} after (mean).")
        w("")
        rows = {r["recipe"]: r for r in t6["rows"]}
        for g in (2, 4):
            a, b = rows.get(f"DW+GPW-g{g}"), rows.get(f"DW+RPW-g{g}-o50")
            if a and b:
                w(f"- g{g}: RPW {pct(b['scratch_mean'])}% vs GPW {pct(a['scratch_mean'])}% from scratch, "
                  f"{pct(b.get('transfer_mean'))}% vs {pct(a.get('transfer_mean'))}% after transfer + "
                  f"distillation, at the same params ({fmt_int(b['params'])} vs {fmt_int(a['params'])}) and MACs; "
                  f"RPW rotates by {b['shifts']} channels per block.")
        if figs.get("t6"):
            w(f"\n![Table 6 analogue]({img_link}/{figs['t6']})\n")
    if t6:
        w("### Rewrite, transfer, distil, save: the recipe for your model\n")
        w("```python\nimport torch, fxrf\nfrom fxrf.training.distill import distill\nfrom fxrf.training.calibrate import "
          "fit_blocks\nfrom fxrf.passes.fold import fold_permutations\n\nmodel.eval()                     # the "
          "trained original: the teacher\nr = fxrf.decompose(model, example, recipe=\"DW+PW\", transfer_weights=True, "
          "fold=False)\ncal = fit_blocks(model, r, calib_loader, batches=8)   # least squares per block + batch-norm "
          "re-estimation\nout = distill(cal.graph_module, model, train_loader, epochs=5)   # T = 4: KL * T^2 and CE "
          "when labelled\nsmall = fold_permutations(out.model, example).graph_module   # DW+RPW / shuffles: fold "
          "what can be folded\ntorch.save(small, \"rewritten.pt\")   # load with torch.load(..., "
          "weights_only=False); or fxrf.passes.export.emit_source\n```\n")
        w("`distill` runs on CPU or CUDA (`device=`); launched as `torchrun --nproc_per_node N script.py` the same "
          "call trains data-parallel (DDP, a DistributedSampler per process, gloo on CPU, nccl on CUDA) and every "
          "process ends with the same weights. `fit_blocks` needs `fold=False` (a folded permutation reorders the "
          "channels of a block's output); fold afterwards. `recalibrate_bn(model, loader, batches=...)` alone is "
          "the cheap option.\n")
    px = secs.get("proxy")
    if px:
        w("## Proxy check (1d): does a 3DRF score rank random architectures?\n")
        w(f"{len(px['rows'])} random architectures from the space: {px['space']}; each trained once "
          f"({px['epochs']} epochs, seed 0). Scores: **coverage** = the mean over stages of (3DRF volume at the "
          f"stage's last conv) / V_0; **gain sum** = the sum of the gains of every conv that is not the first of "
          f"its stage. Kendall tau with accuracy, 95% bootstrap interval over architectures. Caveat on the gain sum: "
          f"in a depthwise+pointwise stage the pointwise conv after the stage's first depthwise conv grows the "
          f"channel field from one channel to all of them, a gain of the same kind as a stage's first conv, so "
          f"the gain sum is large for that kind by construction; the coverage has no such artefact.\n")
        w("| score | Kendall tau | 95% interval |")
        w("|---|---|---|")
        for k, label in (("coverage", "3DRF coverage"), ("gain_sum", "3DRF gain sum"), ("params", "params"),
                         ("macs", "MACs")):
            t = px["kendall"][k]
            w(f"| {label} | {t['tau']:.2f} | [{t['lo']:.2f}, {t['hi']:.2f}] |")
        if figs.get("proxy"):
            w(f"\n![Proxy check]({img_link}/{figs['proxy']})\n")
        w("\n<details><summary>The architectures</summary>\n")
        w("| layout | widths | kernel | kind | params | MACs | coverage | gain sum | accuracy % |")
        w("|---|---|---|---|---|---|---|---|---|")
        for r in sorted(px["rows"], key=lambda r: -r["accuracy"]):
            w(f"| {r['layout']} | {r['widths']} | {r['kernel']} | {r['kind']} | {fmt_int(r['params'])} | "
              f"{fmt_int(r['macs'])} | {r['coverage']:.3f} | {r['gain_sum']:.3f} | {pct(r['accuracy'])} |")
        w("\n</details>\n")
    w("## Conclusions (computed from the figures above)\n")
    for c in conclusions(doc):
        w(f"- {c}")
    w("\n## Limits of this evidence\n")
    w("- Scale: nets of 8-32 channels on 40-sample signals and 16x16 images, trained on 1,000 / 100 samples. A "
      "grouped pointwise conv with 4 groups has 2-8 input channels per group here (the paper's VGG16 has 16-128), "
      "so GPW/RPW lose far more than at the paper's widths, and one RPW rotation per stage (the organized model's "
      "stage 1 holds two decomposed convs) cannot refill the channel field (\"3DRF kept: no\").")
    w("- Seeds: 5 paired seeds resolve differences of about 1-2 points; the paper's Table 2 differences (0.07-0.8 "
      "points on CIFAR-10) would need many more runs at this scale.")
    w("- The decomposer rewrites nn.Conv2d only, so Table 6 exists for the 2-D net alone; the 1-D nets are "
      "analysed with d = 1 everywhere else.")
    w("- Proxy: 10 epochs favour the kinds that train fast; depthwise+pointwise nets, which reach the most coverage "
      "per parameter, are also the slowest to train here, which is what the negative taus of the 3DRF scores "
      "reflect as much as any property of the field.")
    return "\n".join(L) + "\n"


THRESHOLD = 0.3  # fxrf's organizer inserts a conv only when its gain exceeds this (passes/organizer.py)


def contrast(t2: dict, threshold: float = THRESHOLD) -> dict:
    """Per seed: mean Δ accuracy of the variants whose gain exceeds `threshold` minus the mean Δ of the others;
    mean and 95% t-interval over the seeds (paired: each seed's variants share its baseline)."""
    rows = t2["rows"][1:]
    hi = [r["deltas"] for r in rows if r["gain"] > threshold]
    lo = [r["deltas"] for r in rows if r["gain"] <= threshold]
    if not hi or not lo:
        return {"mean": float("nan"), "ci": float("nan"), "high": len(hi), "low": len(lo)}
    per_seed = np.mean(hi, 0) - np.mean(lo, 0)
    m, ci = t_interval(per_seed)
    return {"mean": m, "ci": ci, "high": len(hi), "low": len(lo)}


def paired(a_runs, b_runs) -> tuple:
    """Mean and 95% half-width of a - b over the seeds both have."""
    b = {x["seed"]: x["accuracy"] for x in b_runs}
    d = [x["accuracy"] - b[x["seed"]] for x in a_runs if x["seed"] in b]
    return t_interval(d) if d else (float("nan"), float("nan"))


def conclusions(doc: dict) -> list:
    secs, out = doc["sections"], []
    for net in ("1d", "2d"):
        t2 = secs.get(f"t2_{net}")
        if t2:
            sp = t2["spearman"]
            top = max(t2["rows"][1:], key=lambda r: r["gain"])
            sig = [r["variant"] for r in t2["rows"][1:] if r["delta"] - r["delta_ci"] > 0]
            c = contrast(t2)
            out.append(f"Table 2 ({net}): rank correlation between gain and Δ accuracy {sp['rho']:.2f} "
                       f"[{sp['lo']:.2f}, {sp['hi']:.2f}]: {sp['verdict']}. Variants above the organizer's "
                       f"threshold vs the others: {100 * c['mean']:+.2f} ± {100 * c['ci']:.2f} points "
                       f"({verdict(c['mean'] - c['ci'], c['mean'] + c['ci'])}). The highest-gain variant "
                       f"({top['variant']}, gain {top['gain']:.2f}) changed accuracy by {100 * top['delta']:+.2f} "
                       f"± {100 * top['delta_ci']:.2f} points; variants whose Δ interval lies above 0: "
                       f"{', '.join(sig) if sig else 'none'}.")
        t3 = secs.get(f"t3_{net}")
        if t3:
            base = t3["rows"][0]
            for r in t3["rows"][1:]:
                if r.get("same_as") == "baseline":
                    out.append(f"Table 3 ({net}), {r['setting']}: the organizer left the layout unchanged.")
                    continue
                if r.get("same_as"):
                    out.append(f"Table 3 ({net}), {r['setting']}: the same layout as {r['same_as']}.")
                    continue
                lo, hi = r["delta"] - r["delta_ci"], r["delta"] + r["delta_ci"]
                how = ("raised accuracy" if lo > 0 else "lowered accuracy" if hi < 0 else
                       "kept accuracy within the seed noise (the interval includes 0)")
                out.append(f"Table 3 ({net}), {r['setting']}: {', '.join(map(str, r['layout']))} with "
                           f"{r['params'] / base['params']:.2f}x the params and {r['macs'] / base['macs']:.2f}x the "
                           f"MACs {how}: {100 * r['delta']:+.2f} ± {100 * r['delta_ci']:.2f} points.")
    t6 = secs.get("t6")
    if t6:
        rows = {r["recipe"]: r for r in t6["rows"]}
        for g in (2, 4):
            a, b = rows.get(f"DW+GPW-g{g}"), rows.get(f"DW+RPW-g{g}-o50")
            if a and b:
                ds, hs = paired(b["scratch"], a["scratch"])
                dt, ht = paired(b.get("transfer", []), a.get("transfer", []))
                out.append(f"Table 6, g{g}: RPW - GPW = {100 * ds:+.2f} ± {100 * hs:.2f} points from scratch and "
                           f"{100 * dt:+.2f} ± {100 * ht:.2f} after transfer + distillation (paired seeds; same "
                           f"params and MACs). The paper's claim (RPW keeps accuracy where GPW loses it): "
                           f"{verdict(ds - hs, ds + hs) if math.isfinite(hs) else 'one seed: not measurable'} "
                           f"from scratch.")
        tr = [r for r in t6["rows"] if r.get("transfer")]
        if tr:
            svd = np.mean([r["acc_svd_mean"] for r in tr])
            lsq = np.mean([r["acc_lsq_mean"] for r in tr])
            bn = np.mean([r["acc_svd+bn_mean"] for r in tr])
            fin = np.mean([r["transfer_mean"] for r in tr])
            scr = np.mean([r["scratch_mean"] for r in tr])
            out.append(f"Transfer: right after the rewrite, averaged over the recipes, SVD alone gives "
                       f"{pct(svd)}%, + batch-norm re-estimation {pct(bn)}%, the least-squares block fit "
                       f"{pct(lsq)}%; after {t6['distill_epochs']} epochs of distillation {pct(fin)}% against "
                       f"{pct(scr)}% for {t6['epochs']} epochs from scratch.")
    px = secs.get("proxy")
    if px:
        k = px["kendall"]
        best = max(k, key=lambda n: k[n]["tau"])
        out.append(f"Proxy: Kendall tau with accuracy: coverage {k['coverage']['tau']:.2f}, gain sum "
                   f"{k['gain_sum']['tau']:.2f}, params {k['params']['tau']:.2f}, MACs {k['macs']['tau']:.2f}; the "
                   f"best ranker here is {best} (interval [{k[best]['lo']:.2f}, {k[best]['hi']:.2f}]).")
    if not doc.get("complete"):
        out.append("The run did not finish: sections missing above were not measured.")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few minutes: 2 seeds, fewer variants, epochs, archs")
    p.add_argument("--only", default="t2,t3,t6,proxy", help="sections, comma-separated (t2,t3,t6,proxy)")
    p.add_argument("--json", help="where the JSON goes (default out/accuracy[_quick].json)")
    p.add_argument("--md", help="where the markdown goes (default docs/accuracy.md; --quick: out/accuracy_quick.md)")
    p.add_argument("--img", help="figure directory (default: docs/img beside --md)")
    p.add_argument("--render", metavar="JSON", help="only render the markdown and figures from this JSON")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mode = "quick" if args.quick else "full"
    json_path = args.json or os.path.join(root, "out", f"accuracy{'_quick' if args.quick else ''}.json")
    md = args.md or (os.path.join(root, "out", "accuracy_quick.md") if args.quick
                     else os.path.join(root, "docs", "accuracy.md"))
    img = args.img or os.path.join(os.path.dirname(os.path.abspath(md)), "img")

    def log(msg):
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    if args.render:
        with open(args.render) as f:
            doc = json.load(f)
    else:
        sections = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = sections - {"t2", "t3", "t6", "proxy"}
        if unknown:
            p.error(f"unknown sections {sorted(unknown)}; use t2, t3, t6, proxy")
        doc = run(mode, sections, json_path, log)
        log(f"wrote {json_path} ({doc['seconds']['total']:.0f} s)")
    text = render(doc, img, os.path.relpath(img, os.path.dirname(os.path.abspath(md))))
    round_two = os.path.join(root, "docs", "evidence.json")  # benchmarks/evidence.py's run opens the page
    if os.path.abspath(md) == os.path.join(root, "docs", "accuracy.md") and os.path.exists(round_two):
        import evidence_report
        with open(round_two) as f:
            text = evidence_report.combine(evidence_report.render(json.load(f)), text)
    os.makedirs(os.path.dirname(os.path.abspath(md)), exist_ok=True)
    with open(md, "w") as f:
        f.write(text)
    log(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
