"""Evidence, round two: does the 3DRF decide better than simple rules at equal cost?

Round one (benchmarks/accuracy.py) trained for a fixed ~160 steps, compared the organizer with its baseline only and
confounded gain with stage. This script answers the same claims with controls:

- Protocol. Every run trains with AdamW (lr 3e-3, weight decay 5e-4, cosine over the epoch cap) and stops early on a
  validation split carved from the training data (patience in epochs, the state with the best validation accuracy
  kept); the test set is read once, at that state. Seeds are paired: one seed fixes the split, the batch order and
  the initialisation of every arm. Every arm of a comparison uses the same hyperparameters.
- Tasks (no download, fxrf.training.datasets): MNIST-1D (1-D), the 8x8 digits upsampled to 16x16 (2-D), and the
  same-distance task at k=10 (2-D, 24x24, fresh training samples every epoch), where the label needs one unit that
  sees both patches 13 px end to end.
- Organizer (section "organizer"): from a (2, 2, 2, 2) baseline, where removal is not forced, the organizer's
  layout against every other layout with the same number of convs (each stage 1-4 convs; a fixed random sample
  when there are more than LAYOUTS), its percentile rank with a bootstrap interval over seeds, and the rules:
  remove-only (the organizer without insertion), the late convs deleted, the fewest-params layout, and the baseline
  layout with its widths scaled to the organizer's params.
- Table 2 without the confound (section "insertions"): one conv inserted at the end of stage i, with kernel 1,
  kernel 3 and kernel 3 dilated by 2 -- the last two have equal params and different gains at every stage. Spearman
  of the accuracy change against gain, earlier stage and params side by side, and gain within a stage.
- Decomposer (section "decomposer"): at the MACs of DW+PW, the decomposition transferred by least squares
  (fxrf's calibration) or by SVD, then one short distillation; the same architecture from random init with the
  same distillation; from scratch; a thinner standard net; a Tucker-2 low-rank factorisation; torch-pruning L1;
  fxrf.prune.

The primary comparisons are named in PRIMARY before the run; p-values of the others are Holm-corrected together.

    python benchmarks/evidence.py --quick      # under 3 minutes: 2 seeds, one task per section, short caps
    python benchmarks/evidence.py              # the full run: 10 seeds (several CPU-hours; split it with --tasks)
    python benchmarks/evidence.py --render docs/evidence.json   # re-render docs/accuracy.md's opening only

Writes out/evidence[_quick].json after every task (a resumed run skips what it has) and, for the full run,
docs/evidence.json and the verdicts at the top of docs/accuracy.md (round one, rendered by accuracy.py, follows).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import fxrf  # noqa: E402
from fxrf.training.calibrate import recalibrate_bn  # noqa: E402
from fxrf.training.datasets import SameDistanceStream, digits, mnist1d, same_distance  # noqa: E402
from fxrf.training.distill import distill  # noqa: E402

from prune_compare import CAL_BATCHES, DISTILL, HOLDOUT, macs_of, params_of, same_distance_cnn, tp_l1  # noqa: E402
from workflow import DigitsCNN  # noqa: E402

# ---------------------------------------------------------------------------------------------- configuration

K = 10  # the same-distance task's distance: a 5-conv CNN sits near 80% there (docs/pruning.md)
TASKS = {
    "mnist1d": {"dims": 1, "res": 40, "batch": 64, "cap": 40, "patience": 8,
                "what": "MNIST-1D: 1,000 training signals (800 to train, 200 to validate), 4,000 test signals"},
    "digits": {"dims": 2, "res": 16, "batch": 32, "cap": 60, "patience": 10,
               "what": "8x8 digits upsampled to 16x16: 200 training images (150 to train, 50 to validate), "
                       "the rest (1,597) to test"},
    "same_distance": {"dims": 2, "res": 24, "batch": 64, "cap": 15, "patience": 4,
                      "what": f"same-distance task, k={K}, 24x24: 30 fresh batches of 64 per epoch, 1,000 validation "
                              f"and 2,000 test images (fixed)"},
}
WIDTHS = (8, 16, 32, 32)
BASE = (2, 2, 2, 2)  # the organizer's baseline: two convs per stage, so that removal is a choice, not forced
# equal-count layouts trained per task besides the organizer's (a fixed sample when there are more); MNIST-1D has
# 10 layouts of 6 convs in all, so every one is trained there
LAYOUTS = {"mnist1d": 9, "digits": 8, "same_distance": 3}
# the same-distance task sits at chance for several epochs before it learns: early stopping there would end runs on
# that plateau, so the organizer's runs on it train to the cap and keep the best validation state
ORGANIZER_PATIENCE = {"same_distance": 15}
INSERTS = ((1, 1), (3, 1), (3, 2))  # (kernel, dilation): 3 and 3-dilated-2 have equal params, unequal gains
T2_BASE = (1, 1, 2, 2)  # round one's Table 2 baseline
LR, WD = 3e-3, 5e-4
MODES = {
    "quick": {"seeds": 2, "cap": {"mnist1d": 6, "digits": 8, "same_distance": 2}, "organizer": ("mnist1d",),
              "insertions": ("mnist1d",), "decomposer": ("digits",), "layouts": {}, "distill_epochs": 1,
              "boot": 200},
    "full": {"seeds": 10, "cap": {}, "organizer": ("mnist1d", "digits", "same_distance"),
             "insertions": ("mnist1d", "digits"), "decomposer": ("digits", "same_distance"), "layouts": LAYOUTS,
             "distill_epochs": 3, "boot": 2000},
}
# named before the run: each answers one claim of docs/paper.md; Holm over these three, Holm over the rest
PRIMARY = (
    ("organizer", "organizer - remove-only"),  # does the insertion half add anything over removal?
    ("organizer", "organizer - random layout"),  # does the 3DRF place convs better than chance at equal count?
    ("decomposer", "decompose (LS) - thinner net"),  # is the 3DRF-kept block better than the simplest control?
)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------- data


class Data:
    """One seed's data for one task: `train()` yields a fresh pass of (x, y) batches; `val` and `test` are lists
    of batches. The validation part is carved from the training data by a seeded permutation."""

    def __init__(self, task: str, seed: int):
        cfg = TASKS[task]
        self.task, self.seed, self.batch = task, seed, cfg["batch"]
        if task == "same_distance":
            s = same_distance(K, n_train=1000, n_test=2000, seed=seed)
            self.stream = SameDistanceStream(K, batch_size=cfg["batch"], batches=30, seed=seed)
            self.val, self.test = _batches(*s.train.tensors, 500), _batches(*s.test.tensors, 1000)
            self.x = self.y = None
            return
        s = mnist1d(n_train=1000, n_test=4000, seed=seed) if task == "mnist1d" else \
            digits(n_train=200, size=16, seed=seed)
        x, y = s.train.tensors
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        nv = len(y) // 5
        self.x, self.y = x[perm[nv:]], y[perm[nv:]]
        self.val, self.test = _batches(x[perm[:nv]], y[perm[:nv]], 1000), _batches(*s.test.tensors, 1000)
        self.epoch = 0

    def train(self):
        if self.x is None:
            return iter(self.stream)
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        self.epoch += 1
        p = torch.randperm(len(self.y), generator=g)
        return ((self.x[p[i:i + self.batch]], self.y[p[i:i + self.batch]]) for i in range(0, len(p), self.batch))

    def reset(self):  # every arm sees the same batches in the same order
        self.epoch = 0
        if self.x is None:
            self.stream.epoch = 0

    def loader(self):
        """One pass's batches as a list (fxrf's calibration and distill take a list)."""
        self.reset()
        return list(self.train())


def _batches(x, y, n):
    return [(x[i:i + n], y[i:i + n]) for i in range(0, len(y), n)]


@torch.no_grad()
def accuracy(model: nn.Module, batches) -> tuple:
    model.eval()
    right = total = 0
    loss = 0.0
    for x, y in batches:
        out = model(x)
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        right += int((out.argmax(1) == y).sum())
        total += len(y)
    return 100.0 * right / total, loss / total


def fit(model: nn.Module, data: Data, cap: int, patience: int, seed: int) -> dict:
    """Train in place; keep the state with the best validation accuracy (lower validation loss on a tie); stop
    `patience` epochs after the last improvement or at `cap`. Returns test accuracy at the kept state."""
    torch.manual_seed(seed)
    data.reset()
    steps = cap * (len(data.stream) if data.x is None else math.ceil(len(data.y) / data.batch))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    best, best_epoch, state, t0 = (-1.0, 0.0), 0, None, time.perf_counter()
    epoch = 0
    for epoch in range(1, cap + 1):
        model.train()
        for x, y in data.train():
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        va, vl = accuracy(model, data.val)
        if (va, -vl) > best:
            best, best_epoch = (va, -vl), epoch
            state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(state)
    return {"test": accuracy(model, data.test)[0], "val": best[0], "epoch": best_epoch, "epochs": epoch,
            "seconds": round(time.perf_counter() - t0, 2)}


# ----------------------------------------------------------------------------------------------------- models


def vgg(task: str, layout, widths=WIDTHS, insert=None) -> nn.Module:
    """Per stage `layout[s]` 3-wide conv + BN + ReLU, then 2x max pooling; flatten, one linear layer.
    insert=(stage, kernel, dilation): one more conv at the end of that stage (its module is named "inserted")."""
    cfg = TASKS[task]
    dims, res = cfg["dims"], cfg["res"]
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    bn = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    pool = nn.MaxPool1d if dims == 1 else nn.MaxPool2d
    layers, c = [], 1
    for s, (n, w) in enumerate(zip(layout, widths)):
        for _ in range(n):
            layers += [(None, conv(c, w, 3, padding=1)), (None, bn(w)), (None, nn.ReLU())]
            c = w
        if insert is not None and insert[0] == s:
            k, d = insert[1], insert[2]
            layers += [("inserted", conv(c, c, k, padding=d * (k // 2), dilation=d)), (None, bn(c)),
                       (None, nn.ReLU())]
        layers.append((None, pool(2)))
        res //= 2
    layers += [(None, nn.Flatten()), (None, nn.Linear(c * res ** dims, 2 if task == "same_distance" else 10))]
    from collections import OrderedDict
    return nn.Sequential(OrderedDict((name or str(i), m) for i, (name, m) in enumerate(layers)))


def shape_of(task: str) -> tuple:
    cfg = TASKS[task]
    return (1, 1) + (cfg["res"],) * cfg["dims"]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def scaled_widths(task: str, layout, params: int) -> tuple:
    """WIDTHS times one factor (rounded), the factor chosen so that the net's params come closest to `params`."""
    best = None
    for f in np.linspace(0.3, 3.0, 271):
        w = tuple(max(1, round(x * f)) for x in WIDTHS)
        p = count_params(vgg(task, layout, w))
        if best is None or abs(p - params) < abs(best[1] - params):
            best = (w, p)
    return best[0]


# ------------------------------------------------------------------------------------------------- statistics


def paired(a, b) -> dict:
    """a - b per seed: mean, sd, 95% t half-width, paired t-test p, wins/losses."""
    from scipy import stats
    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    ci = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else float("nan")
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if n > 1 and sd > 0 else (1.0 if n > 1 else float("nan"))
    return {"n": n, "mean": float(d.mean()), "sd": sd, "ci": ci, "p": p, "wins": int((d > 0).sum()),
            "losses": int((d < 0).sum())}


def holm(ps: dict) -> dict:
    """Holm-Bonferroni adjusted p-values (monotone)."""
    items = sorted(((p if math.isfinite(p) else 1.0), k) for k, p in ps.items())
    m, out, running = len(items), {}, 0.0
    for i, (p, k) in enumerate(items):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


def percentile(accs: np.ndarray, who: int) -> float:
    """Percentile rank (0-100) of layout `who` among the others by mean accuracy (ties count half)."""
    m = accs.mean(1)
    others = np.delete(m, who)
    return float(100.0 * ((others < m[who]).sum() + 0.5 * (others == m[who]).sum()) / max(1, len(others)))


def boot_percentile(accs: np.ndarray, who: int, reps: int) -> tuple:
    rng = np.random.default_rng(0)
    n = accs.shape[1]
    vals = [percentile(accs[:, rng.integers(0, n, n)], who) for _ in range(reps)]
    return tuple(np.percentile(vals, [2.5, 97.5]).tolist())


def spearman(x, d: np.ndarray, reps: int) -> dict:
    """Spearman rho of x against the mean over seeds of d [variants, seeds], 95% bootstrap over seeds."""
    from scipy import stats
    rho = float(stats.spearmanr(x, d.mean(1)).statistic)
    rng = np.random.default_rng(0)
    boots = [stats.spearmanr(x, d[:, rng.integers(0, d.shape[1], d.shape[1])].mean(1)).statistic
             for _ in range(reps)]
    boots = [b for b in boots if np.isfinite(b)]
    lo, hi = np.percentile(boots, [2.5, 97.5]).tolist() if boots else (float("nan"), float("nan"))
    return {"rho": rho, "lo": lo, "hi": hi}


# -------------------------------------------------------------------------------------------------- organizer


def compositions(total: int, parts: int = 4, most: int = 4):
    return [c for c in itertools.product(range(1, most + 1), repeat=parts) if sum(c) == total]


def organizer_configs(task: str, n_layouts: int) -> dict:
    """name -> layout/widths of every arm of the organizer section, and the equal-count set."""
    from passes.organizer.context import DEFAULT_THRESHOLD
    shape = shape_of(task)
    base = vgg(task, BASE)
    r = fxrf.organize_stages(base, shape)
    pick = tuple(r.summary["stage_convs"][:4])
    ro = fxrf.organize_stages(base, shape, threshold=1e9, remove_below=DEFAULT_THRESHOLD)
    remove_only = tuple(ro.summary["stage_convs"][:4])
    n = sum(pick)
    every = compositions(n)
    params = {c: count_params(vgg(task, c)) for c in every}
    fewest = min(every, key=lambda c: (params[c], c))
    others = [c for c in every if c != pick]
    sample = sorted(random.Random(0).sample(others, min(n_layouts, len(others))))
    late = list(BASE)
    for _ in range(sum(BASE) - n):  # delete from the last stage that still has more than one conv
        s = max(i for i, v in enumerate(late) if v > 1)
        late[s] -= 1
    late = tuple(late) if n <= sum(BASE) else None
    arms = {"organizer": pick, "baseline": BASE, "remove-only": remove_only, "fewest params": fewest}
    if late is not None and late != BASE:
        arms["late convs deleted"] = late
    gains = {}
    for c in [pick] + sample:
        a = fxrf.analyze(vgg(task, c), shape)
        gains[c] = float(sum(rec.gain for rec in a.convs() if rec.gain is not None))
    return {"pick": pick, "remove_only": remove_only, "count": n, "n_equal": len(every), "set": [pick] + sample,
            "arms": arms, "scaled": scaled_widths(task, BASE, params[pick]), "params": {str(c): params[c] for c in
                                                                                          [pick] + sample},
            "gains": {str(c): g for c, g in gains.items()}, "fewest": fewest,
            "changes": [c.kind for c in r.changes]}


def organizer_task(task: str, mode: dict, seeds, log) -> dict:
    cfg = dict(TASKS[task])
    cfg["patience"] = ORGANIZER_PATIENCE.get(task, cfg["patience"])
    cap = mode["cap"].get(task, cfg["cap"])
    conf = organizer_configs(task, mode["layouts"].get(task, 3))
    runs = {}  # config key -> per-seed results
    keys = {str(c): (c, WIDTHS) for c in conf["set"]}
    for name, c in conf["arms"].items():
        keys.setdefault(str(c), (c, WIDTHS))
    keys[f"{BASE} scaled {conf['scaled']}"] = (BASE, conf["scaled"])
    for seed in seeds:
        if mode.get("deadline") and time.time() > mode["deadline"] and seed >= 2:
            log(f"  organizer {task}: --stop-after reached, {seed} seed(s) done")
            break
        data = Data(task, seed)
        for key, (layout, widths) in keys.items():
            torch.manual_seed(seed)
            m = vgg(task, layout, widths)
            runs.setdefault(key, []).append(fit(m, data, cap, cfg["patience"], seed))
        log(f"  organizer {task} seed {seed}: " + ", ".join(f"{k} {v[-1]['test']:.1f}" for k, v in runs.items()))
    acc = {k: [r["test"] for r in v] for k, v in runs.items()}
    set_keys = [str(c) for c in conf["set"]]
    m = np.array([acc[k] for k in set_keys])
    arm_keys = {name: str(c) for name, c in conf["arms"].items()}
    arm_keys["width-scaled baseline"] = f"{BASE} scaled {conf['scaled']}"
    pick = arm_keys["organizer"]
    tests = {f"organizer - {name}": paired(acc[pick], acc[k]) for name, k in arm_keys.items() if name != "organizer"}
    tests["organizer - random layout"] = paired(acc[pick], m[1:].mean(0))  # a random equal-count layout's mean
    tests["remove-only - baseline"] = paired(acc[arm_keys["remove-only"]], acc[arm_keys["baseline"]])
    from scipy import stats
    means = m.mean(1)
    corr = {}
    for name, x in (("sum of gains", [conf["gains"][k] for k in set_keys]),
                    ("fewer params", [-conf["params"][k] for k in set_keys])):
        corr[name] = float(stats.kendalltau(x, means).statistic)
    epochs = [r["epoch"] for v in runs.values() for r in v]
    return {"what": TASKS[task]["what"], "cap": cap, "patience": cfg["patience"], "seeds": len(acc[pick]),
            "config": {
        k: (list(v[0]), list(v[1])) for k, v in keys.items()}, "arms": arm_keys, "set": set_keys,
        "count": conf["count"], "n_equal": conf["n_equal"], "changes": conf["changes"], "runs": runs,
        "percentile": percentile(m, 0), "percentile_ci": boot_percentile(m, 0, mode["boot"]),
        "kendall": corr, "tests": tests, "params": conf["params"], "gains": conf["gains"],
        "stopped_at_cap": float(np.mean([e >= cap for e in epochs]))}


# ------------------------------------------------------------------------------------------------- insertions


def insertions_task(task: str, mode: dict, seeds, log) -> dict:
    cfg = TASKS[task]
    cap = mode["cap"].get(task, cfg["cap"])
    shape = shape_of(task)
    variants = [None] + [(s, k, d) for s in range(4) for k, d in INSERTS]
    info = {}
    for v in variants:
        model = vgg(task, T2_BASE, insert=v)
        a = fxrf.analyze(model, shape)
        info[str(v)] = {"params": count_params(model), "macs": macs_of(model, shape),
                        "gain": None if v is None else float(a.record("inserted").gain)}
    runs = {str(v): [] for v in variants}
    for seed in seeds:
        data = Data(task, seed)
        for v in variants:
            torch.manual_seed(seed)
            runs[str(v)].append(fit(vgg(task, T2_BASE, insert=v), data, cap, cfg["patience"], seed))
        log(f"  insertions {task} seed {seed}: base {runs['None'][-1]['test']:.1f}")
    base = np.array([r["test"] for r in runs["None"]])
    vs = variants[1:]
    d = np.array([[r["test"] for r in runs[str(v)]] for v in vs]) - base
    gain = [info[str(v)]["gain"] for v in vs]
    stage = [-v[0] for v in vs]
    params = [-info[str(v)]["params"] for v in vs]
    # within a stage: the gain's ranks after removing each stage's mean accuracy change (stage no longer helps)
    centred = d - np.array([d[[j for j, w in enumerate(vs) if w[0] == v[0]]].mean(0) for v in vs])
    out = {"what": cfg["what"], "cap": cap, "variants": [str(v) for v in vs], "info": info, "runs": runs,
           "delta": d.tolist(),
           "spearman": {"gain": spearman(gain, d, mode["boot"]), "earlier stage": spearman(stage, d, mode["boot"]),
                        "fewer params": spearman(params, d, mode["boot"]),
                        "gain within a stage": spearman(gain, centred, mode["boot"])}}
    # the clean pair: kernel 3 dilated 2 minus kernel 3, equal params, gain higher at every stage
    out["dilated - plain"] = {s: {"gain": (info[str((s, 3, 2))]["gain"], info[str((s, 3, 1))]["gain"]),
                                  **paired(d[vs.index((s, 3, 2))], d[vs.index((s, 3, 1))])} for s in range(4)}
    return out


# ------------------------------------------------------------------------------------------------- decomposer


def tucker2(model: nn.Module, rho: float) -> nn.Module:
    """Tucker-2 (HOSVD) of every k x k nn.Conv2d with more than one input channel and groups 1: 1x1 to r_in,
    the k x k core r_in -> r_out, 1x1 to the outputs; r = ceil(rho * channels). Weights from the truncated SVDs
    of the kernel's input and output unfoldings, so the block is the best rank-(r_out, r_in) fit of the conv."""
    m = copy.deepcopy(model)
    for name, conv in list(m.named_modules()):
        if not isinstance(conv, nn.Conv2d) or conv.in_channels == 1 or conv.groups != 1 or conv.kernel_size == (1, 1):
            continue
        w = conv.weight.detach()
        o, c = w.shape[:2]
        ri, ro = max(1, math.ceil(rho * c)), max(1, math.ceil(rho * o))
        u_out = torch.linalg.svd(w.reshape(o, -1), full_matrices=False)[0][:, :ro]  # [o, ro]
        u_in = torch.linalg.svd(w.transpose(0, 1).reshape(c, -1), full_matrices=False)[0][:, :ri]  # [c, ri]
        core = torch.einsum("ocij,or,cs->rsij", w, u_out, u_in)
        first = nn.Conv2d(c, ri, 1, bias=False)
        first.weight.data = u_in.t().reshape(ri, c, 1, 1).clone()
        mid = nn.Conv2d(ri, ro, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False)
        mid.weight.data = core.clone()
        last = nn.Conv2d(ro, o, 1, bias=conv.bias is not None)
        last.weight.data = u_out.reshape(o, ro, 1, 1).clone()
        if conv.bias is not None:
            last.bias.data = conv.bias.detach().clone()
        m.set_submodule(name, nn.Sequential(first, mid, last))
    return m


def tucker2_at(model: nn.Module, shape: tuple, target: float) -> tuple:
    base = macs_of(model, shape)
    lo, hi = 0.01, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        if macs_of(tucker2(model, mid), shape) / base > target:
            hi = mid
        else:
            lo = mid
    return tucker2(model, lo), lo


def thinner(make, shape: tuple, target: float) -> tuple:
    """The teacher's architecture with every width times one factor, the largest whose MACs are at most target."""
    base = macs_of(make(16), shape)
    best = 1
    for w in range(1, 17):
        if macs_of(make(w), shape) / base <= target:
            best = w
    return make(best), best


DECOMP = {
    "digits": {"make": lambda w=16: DigitsCNN(width=w), "batch": 32},
    "same_distance": {"make": lambda w=16: same_distance_cnn(w), "batch": 64},
}
ARMS = ("decompose (LS)", "decompose (SVD)", "decompose, random init", "decompose, scratch", "thinner net",
        "Tucker-2", "torch-pruning L1", "fxrf.prune")


def decomposer_seed(task: str, seed: int, mode: dict) -> dict:
    cfg = TASKS[task]
    cap = mode["cap"].get(task, cfg["cap"])
    make, shape = DECOMP[task]["make"], shape_of(task)
    data = Data(task, seed)
    torch.manual_seed(seed)
    teacher = make()
    row = {"teacher": fit(teacher, data, cap, cfg["patience"], seed)}
    teacher.eval()
    base = macs_of(teacher, shape)
    d = fxrf.decompose(teacher, shape, recipe="DW+PW")
    target = d.summary["macs_after"] / base
    row["target"] = target
    calib = [x for x, _ in data.loader()][:CAL_BATCHES + HOLDOUT]
    students = {}
    students["decompose (LS)"] = fxrf.optimize(teacher, shape, kernels="DW+PW", calibration=calib,
                                               calibration_batches=CAL_BATCHES, holdout_batches=HOLDOUT).model
    students["decompose (SVD)"] = recalibrate_bn(d.graph_module, calib, batches=CAL_BATCHES)
    rnd = reinit(copy.deepcopy(d.graph_module), seed)
    students["decompose, random init"] = recalibrate_bn(rnd, calib, batches=CAL_BATCHES)
    tk, rho = tucker2_at(teacher, shape, target)
    students["Tucker-2"] = recalibrate_bn(tk, calib, batches=CAL_BATCHES)
    tpm, ratio, _ = tp_l1(teacher, shape, target)
    students["torch-pruning L1"] = recalibrate_bn(tpm, calib, batches=CAL_BATCHES)
    students["fxrf.prune"] = fxrf.prune(teacher, shape, macs=target, calibration=calib,
                                        calibration_batches=CAL_BATCHES, seed=seed).model
    for arm, s in students.items():
        r = distill(s, teacher, data.loader(), epochs=mode["distill_epochs"], seed=seed, progress=False,
                    **DISTILL)
        row[arm] = {"macs": macs_of(s, shape) / base, "params": params_of(s) / params_of(teacher),
                    "calibrated": accuracy(s, data.test)[0], "distilled": accuracy(r.model, data.test)[0]}
    # from scratch: the decomposed architecture and a thinner standard net, trained like the teacher
    scratch = reinit(copy.deepcopy(d.graph_module), seed)
    row["decompose, scratch"] = {"macs": target, "params": params_of(scratch) / params_of(teacher),
                                 "scratch": fit(scratch, data, cap, cfg["patience"], seed)["test"]}
    torch.manual_seed(seed)
    thin, w = thinner(make, shape, target)
    row["thinner net"] = {"macs": macs_of(thin, shape) / base, "params": params_of(thin) / params_of(teacher),
                          "width": w, "scratch": fit(thin, data, cap, cfg["patience"], seed)["test"]}
    row["tucker_rho"], row["tp_ratio"] = rho, ratio
    return row


def reinit(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


def decomposer_task(task: str, mode: dict, seeds, log) -> dict:
    rows = []
    for seed in seeds:
        rows.append(decomposer_seed(task, seed, mode))
        r = rows[-1]
        log(f"  decomposer {task} seed {seed}: teacher {r['teacher']['test']:.1f}, " + ", ".join(
            f"{a} {r[a].get('calibrated', float('nan')):.1f}->{r[a].get('distilled', r[a].get('scratch')):.1f}"
            for a in ARMS))
    def best(r, a):  # an arm's final figure: after distillation, or from scratch
        return r[a]["distilled"] if "distilled" in r[a] else r[a]["scratch"]
    final = {a: [best(r, a) for r in rows] for a in ARMS}
    tests = {f"decompose (LS) - {a}": paired(final["decompose (LS)"], final[a]) for a in ARMS
             if a != "decompose (LS)"}
    tests["decompose (LS) - decompose (SVD), calibrated"] = paired(
        [r["decompose (LS)"]["calibrated"] for r in rows], [r["decompose (SVD)"]["calibrated"] for r in rows])
    return {"what": TASKS[task]["what"], "rows": rows, "final": final, "tests": tests,
            "teacher": [r["teacher"]["test"] for r in rows], "target": float(np.mean([r["target"] for r in rows]))}


# -------------------------------------------------------------------------------------------------------- run


SECTIONS = {"organizer": organizer_task, "insertions": insertions_task, "decomposer": decomposer_task}


def run(mode_name: str, only, json_path: str, tasks=None) -> dict:
    mode = MODES[mode_name]
    doc = {"mode": mode_name, "seeds": mode["seeds"], "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                  time.gmtime()),
           "threads": torch.get_num_threads(), "versions": versions(), "sections": {}, "seconds": {}}
    if os.path.exists(json_path):
        with open(json_path) as f:
            old = json.load(f)
        if old.get("mode") == mode_name:
            doc["sections"], doc["seconds"] = old.get("sections", {}), old.get("seconds", {})
    seeds = list(range(mode["seeds"]))
    for section in only:
        for task in mode[section]:
            if tasks and task not in tasks:
                continue
            if task in doc["sections"].get(section, {}):
                log(f"{section} {task}: in {json_path} already")
                continue
            log(f"{section} {task}")
            t0 = time.perf_counter()
            doc["sections"].setdefault(section, {})[task] = SECTIONS[section](task, mode, seeds, log)
            doc["seconds"][f"{section} {task}"] = round(time.perf_counter() - t0)
            _write(doc, json_path)
    doc["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    doc["adjusted"] = adjust(doc)
    _write(doc, json_path)
    return doc


def adjust(doc: dict) -> dict:
    """Holm over the primary comparisons (per task), Holm over every other comparison of the run."""
    primary, rest = {}, {}
    for section, tasks in doc["sections"].items():
        for task, res in tasks.items():
            for name, t in res.get("tests", {}).items():
                key = f"{section}|{task}|{name}"
                ((primary if (section, name) in PRIMARY else rest))[key] = t["p"]
    return {"primary": holm(primary), "rest": holm(rest)}


def merge(paths) -> dict:
    """One document from runs split over processes (the same mode); wall times add up per section."""
    docs = []
    for p in paths:
        with open(p) as f:
            docs.append(json.load(f))
    if len({d["mode"] for d in docs}) != 1:
        raise SystemExit("--merge: the runs have different modes")
    out = dict(docs[0], sections={}, seconds={})
    out["started"] = min(d["started"] for d in docs)
    out["finished"] = max(d.get("finished", "") for d in docs)
    out["processes"] = len(docs)
    for d in docs:
        for section, tasks in d["sections"].items():
            out["sections"].setdefault(section, {}).update(tasks)
        out["seconds"].update(d["seconds"])
    out["adjusted"] = adjust(out)
    return out


def _write(doc, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
    os.replace(tmp, path)


def versions() -> dict:
    from accuracy import versions as accuracy_versions  # round one's record, plus the pruning baseline
    return accuracy_versions(extra=("torch-pruning",))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="under 3 minutes: 2 seeds, one task per section")
    p.add_argument("--only", default="organizer,insertions,decomposer", help="sections, comma-separated")
    p.add_argument("--json", help="where the JSON goes (default out/evidence[_quick].json)")
    p.add_argument("--tasks", help="only these tasks, comma-separated (to split a run over processes: give each "
                                   "its own --json, then --merge them)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge these runs' JSON into --json, then render")
    p.add_argument("--render", metavar="JSON", help="only render docs/accuracy.md's opening from this JSON")
    p.add_argument("--md", help="the markdown to write (default: docs/accuracy.md for a full run, "
                                "out/evidence_quick.md for --quick)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stop-after", type=float, metavar="MINUTES",
                   help="start no new organizer seed after this many minutes (the seeds done are reported as such)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    mode = "quick" if a.quick else "full"
    path = a.json or os.path.join(ROOT, "out", f"evidence{'_quick' if a.quick else ''}.json")
    if a.render:
        with open(a.render) as f:
            doc = json.load(f)
    elif a.merge:
        doc = merge(a.merge)
        _write(doc, path)
    else:
        if a.stop_after:
            MODES[mode]["deadline"] = time.time() + 60 * a.stop_after
        doc = run(mode, [s for s in a.only.split(",") if s], path, a.tasks and a.tasks.split(","))
    import evidence_report
    md = a.md or (os.path.join(ROOT, "docs", "accuracy.md") if doc["mode"] == "full" else
                  os.path.join(ROOT, "out", "evidence_quick.md"))
    if os.path.abspath(md) == evidence_report.DOC:  # the page's JSON goes beside it
        _write(doc, os.path.join(ROOT, "docs", "evidence.json"))
    evidence_report.write(doc, md)
    print(evidence_report.verdict_table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
