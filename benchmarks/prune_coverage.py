"""Pruning coverage side by side: `fxrf.prune` and torch-pruning on every torchvision classification model.

The models: every `torchvision.models.list_models(module=torchvision.models)` (random weights, `weights=None`),
plus a small PixelShuffle super-resolution net (defined here), one timm CNN (`timm.create_model("resnet18",
pretrained=False)`) and one Hugging Face CNN built from its default config
(`ResNetForImageClassification(ResNetConfig())`, whose forward returns a ModelOutput). Nothing is downloaded. Each
model is put in eval mode and given a 1x3x64x64 input unless it needs more (the `input` column; the ViTs are built
with `image_size=` set to that small input: their layers are the same, only the position embedding is shorter).

On each model, each side in its own fresh process (single-threaded, a time limit per side, so a hang, a crash or
running out of memory costs one cell, not the run):

* fxrf: `fxrf.prune(model, x_shape, amount=0.3)`. ok = it returns and `result.model(x)` runs and returns tensors
  of the original's shapes. Recorded: MACs kept (`summary["macs_after"] / summary["macs_before"]`, fxrf's
  counter), the form ("module": the user's class; "graph": a GraphModule), the channels removed, what was declined
  and why, the wall time, and on failure the one-line error (an exception that is not an `fxrf.errors.FxrfError`,
  or a returned model whose output shape differs, is an fxrf bug and is marked so).
* torch-pruning: `tp.pruner.MetaPruner(copy, x, importance=tp.importance.MagnitudeImportance(p=1),
  pruning_ratio=0.3, ignored_layers=[the final layer(s)])` then `pruner.step()`, as torch-pruning's README shows,
  no per-model settings. The final layers: the last conv / linear the forward calls, and every linear with as
  many outputs as the model has classes (googlenet / inception_v3 keep auxiliary classifiers). ok = no exception
  and the pruned copy's forward returns tensors of the original's shapes. A ModelOutput needs no output_transform:
  torch-pruning flattens dicts (a ModelOutput is one) when it traces. MACs kept is measured with fxrf's counter
  (`fxrf.analyze(...)`: the sum of its per-node MACs, pruned over original), the counter fxrf's summary uses,
  so both columns come from one counter; torch-pruning's own `tp.utils.count_ops_and_params` ratio is recorded
  beside it in the JSON for both sides.

"Runs" and "prunes something" are reported apart: `fxrf.prune` returns the model unchanged (MACs kept 1.0) where
every channel class is frozen (declined), which is not a pruned model.

    python benchmarks/prune_coverage.py --quick                    # a handful of models (< 3 min)
    python benchmarks/prune_coverage.py --models resnet18,hf:ResNet,pixelshuffle_sr
    python benchmarks/prune_coverage.py --json out/prune_coverage.json --md out/prune_coverage.md   # all models
    python benchmarks/prune_coverage.py --render out/prune_coverage.json    # the Markdown again from a JSON
    python benchmarks/prune_coverage.py --list
"""
from __future__ import annotations

import argparse
import collections
import copy
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

S = 64  # the default input side
AMOUNT = 0.3
MARK = "PRUNE_COVERAGE_RESULT "
SIZE = {"inception_v3": 96, "maxvit_t": 224, "vit_h_14": 56}  # the models that need more than S (or, ViT/14: S % 14)
QUICK = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "convnext_tiny", "pixelshuffle_sr", "hf:ResNet"]


# --------------------------------------------------------------------------------------------------- the models
def _pixelshuffle_sr(r: int = 2):
    import torch.nn as nn

    class SuperRes(nn.Module):
        """conv-relu-conv to 3*r*r channels, PixelShuffle(r), conv: the r*r channel blocks must go together."""

        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(3, 32, 3, padding=1)
            self.act = nn.ReLU()
            self.up = nn.Conv2d(32, 3 * r * r, 3, padding=1)
            self.shuffle = nn.PixelShuffle(r)
            self.tail = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.tail(self.shuffle(self.up(self.act(self.head(x)))))

    return SuperRes()


def _timm_resnet18():
    import timm
    return timm.create_model("resnet18", pretrained=False)


def _hf_resnet():
    import transformers
    return transformers.ResNetForImageClassification(transformers.ResNetConfig())


def model_names() -> list:
    import torchvision
    return list(torchvision.models.list_models(module=torchvision.models)) + [
        "pixelshuffle_sr", "timm:resnet18", "hf:ResNet"]


def build(name: str):
    """(model in eval mode, input shape, note)."""
    if name == "pixelshuffle_sr":
        return _pixelshuffle_sr().eval(), (1, 3, S, S), "defined in the script, r=2"
    if name == "timm:resnet18":
        return _timm_resnet18().eval(), (1, 3, S, S), ""
    if name == "hf:ResNet":
        return _hf_resnet().eval(), (1, 3, S, S), "ResNetConfig() defaults; returns a ModelOutput"
    import torchvision.models as tvm
    side = SIZE.get(name, S)
    kw, note = {}, ""
    if name.startswith("vit_"):
        kw, note = {"image_size": side}, f"built with image_size={side}"
    return tvm.get_model(name, weights=None, **kw).eval(), (1, 3, side, side), note


# --------------------------------------------------------------------------------------------------- one side
def _reason(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {line[:300]}"


def _where(e: BaseException) -> str:
    """The innermost frame of a traceback inside fxrf / passes, or else the innermost one (file:line function)."""
    tb = traceback.extract_tb(e.__traceback__)
    ours = [f for f in tb if f"{os.sep}fxrf{os.sep}" in f.filename or f"{os.sep}passes{os.sep}" in f.filename]
    f = (ours or tb or [None])[-1]
    if f is None:
        return ""
    return f"{'/'.join(f.filename.split(os.sep)[-2:])}:{f.lineno} {f.name}"


def _shapes(out) -> list:
    from torch.utils._pytree import tree_leaves
    import torch
    if hasattr(out, "to_tuple"):  # a transformers ModelOutput: its set fields
        out = out.to_tuple()
    return [list(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _fxrf_macs(model, shape) -> int:
    import fxrf
    a = fxrf.analyze(model, shape)
    return int(sum(c.macs for c in a.costs.values()))


def _tp_macs(model, x) -> tuple:
    import torch_pruning as tp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        macs, params = tp.utils.count_ops_and_params(model, x)
    return float(macs), float(params)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _final_layers(model, x) -> list:
    """The last conv / linear the forward calls, and every linear with as many outputs as there are classes."""
    import torch
    import torch.nn as nn
    order = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in model.modules()
             if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    out = [order[-1]] if order else []
    if isinstance(out[0] if out else None, nn.Linear):
        n = out[0].out_features
        out += [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == n and m is not out[0]]
    return out


def run_fxrf(model, shape, x, ref_shapes) -> dict:
    import torch
    import fxrf
    from fxrf.errors import FxrfError
    row = {}
    t = time.perf_counter()
    try:
        r = fxrf.prune(model, shape, amount=AMOUNT)
    except Exception as e:  # noqa: BLE001 -- every failure is recorded
        row.update(ok=False, s=round(time.perf_counter() - t, 2), reason=_reason(e),
                   fxrf_error=isinstance(e, FxrfError), where=_where(e))
        if not isinstance(e, FxrfError) or "This is a bug in fxrf" in str(e):  # the error says so itself
            row["bug"] = True
        return row
    row["s"] = round(time.perf_counter() - t, 2)
    s = r.summary
    row.update(form=r.form, form_why=r.form_why, macs_kept=s["macs_after"] / s["macs_before"],
               params_kept=s["params_after"] / s["params_before"], classes=s["classes"],
               removed_classes=s["removed_classes"], removed_channels=s["removed_channels"],
               changes=len(r.changes), declined=len(r.declined),
               declined_reasons=_reasons([d["reason"] for d in r.declined]))
    try:
        with torch.no_grad():
            got = _shapes(r.model(x))
    except Exception as e:  # noqa: BLE001
        row.update(ok=False, reason="the pruned model does not run: " + _reason(e), fxrf_error=False,
                   where=_where(e), bug=True)
        return row
    if got != ref_shapes:
        row.update(ok=False, reason=f"the pruned model returns shapes {got}, the original {ref_shapes}",
                   fxrf_error=False, bug=True)
        return row
    row["ok"] = True
    try:
        b, a = _tp_macs(model, x)[0], _tp_macs(r.model, x)[0]
        row["tp_counter_macs_kept"] = a / b if b else None
    except Exception as e:  # noqa: BLE001
        row["tp_counter_error"] = _reason(e)
    return row


def _reasons(reasons: list) -> dict:
    """Declined reasons, counted by their first words (the node-specific tail cut)."""
    def short(r):
        r = re.sub(r"\[node [^\]]*\]", "", r)
        r = re.sub(r"'[^']*'", "'.'", r)
        return " ".join(r.split())[:160]
    c = collections.Counter(short(r) for r in reasons)
    return dict(c.most_common(8))


def run_tp(model, shape, x, ref_shapes) -> dict:
    import torch
    import torch_pruning as tp
    row = {}
    m = copy.deepcopy(model)
    p_before = _params(m)
    t = time.perf_counter()
    try:
        ignored = _final_layers(m, x)
        row["ignored"] = [n for n, mod in m.named_modules() if any(mod is i for i in ignored)]
        pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=AMOUNT, ignored_layers=ignored)
        pruner.step()
    except Exception as e:  # noqa: BLE001
        row.update(ok=False, s=round(time.perf_counter() - t, 2), reason=_reason(e), where=_where(e))
        return row
    row["s"] = round(time.perf_counter() - t, 2)
    row["params_kept"] = _params(m) / p_before
    try:
        m.eval()
        with torch.no_grad():
            got = _shapes(m(x))
    except Exception as e:  # noqa: BLE001
        row.update(ok=False, reason="the pruned model does not run: " + _reason(e), where=_where(e))
        return row
    if got != ref_shapes:
        row.update(ok=False, reason=f"the pruned model returns shapes {got}, the original {ref_shapes}")
        return row
    row["ok"] = True
    try:
        row["macs_kept"] = _fxrf_macs(m, shape) / _fxrf_macs(model, shape)
    except Exception as e:  # noqa: BLE001
        row["macs_error"] = "fxrf's counter: " + _reason(e)
    try:
        b, a = _tp_macs(model, x)[0], _tp_macs(m, x)[0]
        row["tp_counter_macs_kept"] = a / b if b else None
    except Exception as e:  # noqa: BLE001
        row["tp_counter_error"] = _reason(e)
    return row


def one(name: str, side: str) -> dict:
    """Build the model and run one side on it (in the child process)."""
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        try:
            model, shape, note = build(name)
            x = torch.randn(shape)
            with torch.no_grad():
                ref = _shapes(model(x))
        except Exception as e:  # noqa: BLE001
            return {"ok": False, "reason": "build / eager: " + _reason(e), "build_failed": True}
        row = {"input": list(shape), "note": note, "build_s": round(time.perf_counter() - t, 2), "out": ref}
        row.update((run_fxrf if side == "fxrf" else run_tp)(model, shape, x, ref))
        return row


# --------------------------------------------------------------------------------------------------- the sweep
_SELF = None  # a copy of this file the children run (so editing it during a sweep changes nothing)


def child(name: str, side: str, timeout: float) -> dict:
    global _SELF
    if _SELF is None:
        _SELF = os.path.join(tempfile.mkdtemp(prefix="prune_coverage_"), "prune_coverage.py")
        shutil.copy(os.path.abspath(__file__), _SELF)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, _SELF, "--one", name, side], env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "timeout": True, "reason": f"timeout: no result after {timeout:.0f} s",
                "wall_s": round(time.perf_counter() - t, 1)}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if not lines:
        tail = (p.stderr.strip().splitlines() or [""])[-1][:300]
        why = "killed (out of memory?)" if p.returncode in (-9, 137) else f"exit code {p.returncode}"
        return {"ok": False, "crashed": True, "reason": f"the process died: {why}; {tail}",
                "wall_s": round(time.perf_counter() - t, 1)}
    row = json.loads(lines[-1][len(MARK):])
    row["wall_s"] = round(time.perf_counter() - t, 1)
    return row


def versions() -> dict:
    import torch_pruning
    from coverage import versions as coverage_versions  # python, torch, torchvision, timm, transformers, machine
    out = coverage_versions()
    out["torch_pruning"] = torch_pruning.__version__
    try:  # the fxrf code measured: the repository's commit, "+" if the working tree differs from it
        here = os.path.dirname(os.path.abspath(__file__))
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True)
        out["fxrf_commit"] = head.stdout.strip() + ("+" if dirty.stdout.strip() else "") or None
    except OSError:
        out["fxrf_commit"] = None
    return out


def sweep(args) -> dict:
    names = model_names()
    if args.models:
        wanted = [w.strip() for w in args.models.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise SystemExit(f"unknown model(s): {', '.join(unknown)} (see --list)")
        names = wanted
    elif args.quick:
        names = QUICK
    result = {"versions": versions(), "amount": AMOUNT, "timeout_s": args.timeout,
              "command": " ".join(["python", "benchmarks/prune_coverage.py"] + sys.argv[1:]),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": []}
    done = set()
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            old = json.load(f)
        result.update(command=old["command"], started=old["started"])
        result["resumed"] = old.get("resumed", []) + [" ".join(["python", "benchmarks/prune_coverage.py"]
                                                               + sys.argv[1:])]
        redo = set((args.redo or "").split(","))
        result["rows"] = [r for r in old["rows"] if r["model"] not in redo]
        done = {r["model"] for r in result["rows"]}
    for name in names:
        if name in done:
            continue
        row = {"model": name}
        for side in ("fxrf", "tp"):
            row[side] = child(name, side, args.timeout)
        got = row["fxrf"] if "input" in row["fxrf"] else row["tp"]
        row["input"], row["note"] = got.get("input"), got.get("note", "")
        result["rows"].append(row)
        result["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        print(f"{name:22s} fxrf {_cell_ok(row['fxrf']):10s} {_kept(row['fxrf'].get('macs_kept')):6s} "
              f"{row['fxrf'].get('wall_s', 0):6.1f}s | tp {_cell_ok(row['tp']):10s} "
              f"{_kept(row['tp'].get('macs_kept')):6s} {row['tp'].get('wall_s', 0):6.1f}s", flush=True)
        if args.json:
            write_json(args.json, result)
    return result


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


# --------------------------------------------------------------------------------------------------- the page
def _kept(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _cell_ok(side: dict) -> str:
    if side.get("ok"):
        return "yes"
    if side.get("timeout"):
        return "timeout"
    if side.get("crashed"):
        return "crashed"
    if side.get("bug"):
        return "**BUG**"
    return "no"


def prunes(side: dict) -> bool:
    """ok and the model got smaller (a channel removed)."""
    if not side.get("ok"):
        return False
    if "removed_channels" in side:
        return side["removed_channels"] > 0
    return side.get("params_kept", 1.0) < 1.0


def _short(text: str, n: int = 140) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= n else text[:n - 1] + "…"


def notes(row) -> str:
    f, t = row["fxrf"], row["tp"]
    out = []
    if row.get("note"):
        out.append(row["note"])
    why = _declined(f.get("declined_reasons") or {})
    if f.get("ok") and not prunes(f):
        out.append("fxrf: **nothing pruned**" + (f", declined: {why}" if why else ""))
    elif f.get("ok") and why:
        out.append(f"fxrf declined: {why}")
    if f.get("ok") is False:
        bug = ("" if not f.get("bug") else " (an fxrf bug)" if f.get("fxrf_error")
               else " (not an FxrfError: an fxrf bug)")
        out.append(f"fxrf: {_short(f['reason'])}{bug}")
    if t.get("ok") is False:
        out.append(f"tp: {_short(t['reason'])}")
    other = f.get("tp_counter_macs_kept") if f.get("ok") else None
    if other is not None and abs(f["macs_kept"] - other) > 0.05:
        out.append(f"fxrf's MACs kept disagrees with torch-pruning's counter ({other:.3f})")
    if t.get("ok") and "macs_error" in t:
        out.append("tp MACs: torch-pruning's counter (fxrf's failed)")
    return "; ".join(out)


def _declined(reasons: dict) -> str:
    """The declined reasons but the classifier's (every model's: it reaches the output), shortened, with counts."""
    out = []
    for r, n in reasons.items():
        if r == "it reaches the model output":
            continue
        r = re.sub(r"^call_(module|function|method) ('\.' )?", "", r)
        r = re.sub(r"\(nn\.(\w+)\)", r"\1", r).replace("F.layer_norm", "layer_norm").split(": ")[0]
        out.append(f"{r.strip()} ({n})")
    return ", ".join(out)


def table(rows) -> list:
    lines = ["| model | input | fxrf ok | fxrf MACs kept | fxrf form | torch-pruning ok | tp MACs kept | notes |",
             "|---|---|---|---:|---|---|---:|---|"]
    for r in rows:
        f, t = r["fxrf"], r["tp"]
        inp = "x".join(str(d) for d in r["input"]) if r.get("input") else "-"
        tp_kept = _tp_kept(t)
        lines.append(f"| {r['model']} | {inp} | {_cell_ok(f)} | {_kept(f.get('macs_kept') if f.get('ok') else None)} "
                     f"| {f.get('form', '-') if f.get('ok') else '-'} | {_cell_ok(t)} | "
                     f"{_kept(tp_kept)}{'†' if t.get('ok') and 'macs_error' in t else ''} | {notes(r)} |")
    return lines


def totals(rows) -> list:
    n = len(rows)
    f_ok = [r for r in rows if r["fxrf"].get("ok")]
    t_ok = [r for r in rows if r["tp"].get("ok")]
    f_pr = [r for r in rows if prunes(r["fxrf"])]
    t_pr = [r for r in rows if prunes(r["tp"])]
    f_none = [r["model"] for r in f_ok if not prunes(r["fxrf"])]
    both = [r for r in rows if prunes(r["fxrf"]) and prunes(r["tp"])]
    only_f = [r["model"] for r in rows if prunes(r["fxrf"]) and not prunes(r["tp"])]
    only_t = [r["model"] for r in rows if prunes(r["tp"]) and not prunes(r["fxrf"])]
    bugs = [r["model"] for r in rows if r["fxrf"].get("bug")]
    slow = {s: [r["model"] for r in rows if r[s].get("timeout") or r[s].get("crashed")] for s in ("fxrf", "tp")}

    def med(vals):
        vals = sorted(vals)
        return "-" if not vals else f"{vals[len(vals) // 2]:.3f}"

    out = [f"- models: {n}",
           f"- fxrf.prune runs (returns; pruned model runs, same output shapes): **{len(f_ok)}/{n}**; prunes something "
           f"(a channel removed): **{len(f_pr)}/{n}**",
           f"- torch-pruning runs (step() returns; pruned model runs, same output shapes): **{len(t_ok)}/{n}**; "
           f"prunes something: **{len(t_pr)}/{n}**",
           f"- fxrf runs but declines everything (MACs kept 1.0, the model returned unchanged): {len(f_none)}"
           + (f" ({', '.join(f_none)})" if f_none else ""),
           f"- both prune: {len(both)}; only fxrf: {len(only_f)}" + (f" ({', '.join(only_f)})" if only_f else "")
           + f"; only torch-pruning: {len(only_t)}" + (f" ({', '.join(only_t)})" if only_t else ""),
           f"- median MACs kept where both prune: fxrf {med([r['fxrf']['macs_kept'] for r in both])}, "
           f"torch-pruning {med([v for v in (_tp_kept(r['tp']) for r in both) if v is not None])}",
           f"- time of the prune call (median / max, seconds): fxrf {_times(rows, 'fxrf')}, torch-pruning "
           f"{_times(rows, 'tp')} (MetaPruner + step)",
           f"- fxrf bugs (an exception that is not an FxrfError or that calls itself a bug, a pruned model that does "
           f"not run or returns other shapes): {len(bugs)}"
           + (f" ({', '.join(bugs)})" if bugs else ""),
           f"- timeouts / crashed processes: fxrf {len(slow['fxrf'])}" + (f" ({', '.join(slow['fxrf'])})" if
                                                                         slow["fxrf"] else "")
           + f", torch-pruning {len(slow['tp'])}" + (f" ({', '.join(slow['tp'])})" if slow["tp"] else "")]
    return out


def _tp_kept(t: dict):
    """torch-pruning's MACs kept by fxrf's counter, or by its own where fxrf's failed (marked † in the table)."""
    return t.get("macs_kept", t.get("tp_counter_macs_kept")) if t.get("ok") else None


def _times(rows, side) -> str:
    ts = sorted(r[side]["s"] for r in rows if r[side].get("ok") and "s" in r[side])
    return "-" if not ts else f"{ts[len(ts) // 2]:.1f} / {ts[-1]:.1f}"


def render(result: dict) -> str:
    v = result["versions"]
    head = [f"Run: `{result['command']}`" + (f" (resumed: {'; '.join('`' + c + '`' for c in result['resumed'])})"
                                              if result.get("resumed") else "")
            + f", started {result['started']}, finished {result.get('finished', '-')}; amount / pruning_ratio "
            f"{result['amount']}; time limit {result['timeout_s']:.0f} s per model and side; python {v['python']}, "
            f"fxrf {v.get('fxrf_commit') or 'commit not recorded'}, torch {v['torch']}, torchvision {v['torchvision']}, torch-pruning {v['torch_pruning']}, timm "
            f"{v['timm']}, transformers {v['transformers']}, {v['machine']}, one thread.", ""]
    order = {n: i for i, n in enumerate(model_names())}  # a resumed run appends: the rows in the usual order
    rows = sorted(result["rows"], key=lambda r: order.get(r["model"], len(order)))
    return "\n".join(head + table(rows) + ["", "Totals:", ""] + totals(rows)) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated names (see --list)")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model and side (default 300)")
    ap.add_argument("--json", help="write the results here (rewritten after every model)")
    ap.add_argument("--md", help="write the Markdown table and totals here")
    ap.add_argument("--resume", action="store_true", help="keep the models --json already has")
    ap.add_argument("--redo", help="with --resume: run these models again")
    ap.add_argument("--render", metavar="JSON", help="only print the Markdown of an earlier run")
    ap.add_argument("--list", action="store_true", help="print the model names")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "SIDE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        row = one(*args.one)
        print(MARK + json.dumps(row, default=str), flush=True)
        return
    if args.list:
        print("\n".join(model_names()))
        return
    if args.render:
        with open(args.render) as f:
            result = json.load(f)
    else:
        result = sweep(args)
    md = render(result)
    print(md)
    if args.md:
        os.makedirs(os.path.dirname(args.md) or ".", exist_ok=True)
        with open(args.md, "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
