"""`fxrf.prune`: structural channel pruning from the exact channel field.

Three steps, each in its own file: the coupled channel classes (groups.py: which channels go together, read off
the op table's field rules, frozen where a map is not exact), the choice (here: the lowest-importance classes of
each family, at one rate or at the rate that meets a MACs or params target), and the surgery on a copy
(surgery.py), checked against the original with the removed channels' readers zeroed before it is returned.

    >>> import torch, torch.nn as nn, fxrf
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    ...                     nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ...                     nn.Linear(32, 10))
    >>> r = fxrf.prune(net, (1, 3, 16, 16), amount=0.5)
    >>> type(r.model).__name__, r.model[0].out_channels, r.model[1].num_features, r.model[3].in_channels
    ('Sequential', 8, 8, 8)
    >>> r.model[7].out_features, r.form   # the logits reach the output: kept
    (10, 'module')
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fxrf.errors import FxrfError, InputError

from .. import PassResult, private_copy
from .groups import Groups, channel_groups
from .surgery import removal, remove, zero_readers

IMPORTANCES = ("l1", "random")
TARGET_TOL = 0.01  # a macs=/params= target is met within this fraction of the original


@dataclass(frozen=True)
class PruneChange:
    """One family of coupled channels pruned: the modules it slices, and its channel classes before and after."""

    producers: tuple
    modules: tuple
    classes_before: int
    classes_after: int
    channels_removed: int

    def describe(self, before=None, after=None) -> str:
        who = ", ".join(self.producers[:3]) + (f" and {len(self.producers) - 3} more" if len(self.producers) > 3
                                                 else "")
        return (f"{who}: {self.classes_before} -> {self.classes_after} channels"
                + (f" ({self.channels_removed} output channels removed in all)" if len(self.producers) > 1 else "")
                + f"; {len(self.modules)} module(s) sliced")


@dataclass
class PruneResult(PassResult):
    """`model` the pruned copy (the user's class where the capture kept module paths, form "module"; else the pruned
    GraphModule); `plan` the structure plan `fxrf.apply` makes again on a fresh model (form "module");
    `groups` the coupled channel classes; `amount` the rate used."""

    model: nn.Module | None = field(default=None, repr=False)
    plan: dict | None = None
    form_why: str | None = None
    groups: Groups | None = field(default=None, repr=False)
    amount: float = 0.0
    removed: list = field(default_factory=list, repr=False)  # the classes removed (keys of groups.members)
    cut: dict = field(default_factory=dict, repr=False)  # {module path: {"out": [...], "in": [...]}}: what went
    source: nn.Module | None = field(default=None, repr=False)  # the unpruned graph the paths refer to

    @property
    def form(self) -> str:
        return "module" if self.plan is not None else "graph"


def prune(model: nn.Module, example_input, *, amount: float | None = None, macs: float | None = None,
          params: float | None = None, importance: str = "l1", include=None, exclude=None, calibration=None,
          calibration_batches: int = 8, seed: int = 0, keep_class: bool = True) -> PruneResult:
    """Remove output channels of convs and linears of `model` (never modified) with everything coupled to them.

    Give one of: `amount`, the fraction of each family's channel classes to remove (a family: the classes that
    touch the same modules, one layer's channels, or a residual stream's); `macs` / `params`, the fraction of the
    model's MACs / parameters to keep (the rate found by bisection, one rate for all families). importance: "l1"
    (the mean |weight| of the producers' filters, times the mean gamma / sigma of the batch norms the class passes
    through, so that a scale moved between a filter and its norm changes nothing; the smallest go) or "random" (a
    control, seeded by `seed`).
    include / exclude: module-path globs; a family is pruned only if one of its producers is included and none
    excluded. calibration: input batches (or (input, label) batches); with them every conv or linear that lost
    input channels is refit by least squares to what the original layer computed (refit.py), on the first
    `calibration_batches` (the next one held out: a fit that does not lower the layer's error there is dropped),
    then every batch norm is re-estimated; summary["calibration"] lists each fit.
    The result is checked before it is returned: it must compute what the original computes with every input
    column that reads a removed channel set to zero (eval mode, a random input). A family for which that fails
    (the model's code fixes a channel count) is left whole and listed in `declined`.
    """
    if sum(x is not None for x in (amount, macs, params)) != 1:
        raise InputError("fxrf.prune: give exactly one of amount= (the fraction of channels to remove), macs= or "
                         "params= (the fraction of the model's MACs or parameters to keep)")
    for name, v in (("amount", amount), ("macs", macs), ("params", params)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1
                              or (name != "amount" and v == 0)):
            raise InputError(f"fxrf.prune: {name}={v!r} must be a fraction, {'0 <= ' if name == 'amount' else '0 < '}"
                             f"{name} < 1")
    if importance not in IMPORTANCES:
        raise InputError(f"fxrf.prune: importance={importance!r} is unknown; use one of {', '.join(IMPORTANCES)}")
    from fxrf.trace import _as_shapes, trace_with_values
    gm = private_copy(model, example_input)
    _, shapes, modules = trace_with_values(gm, example_input)
    groups = channel_groups(gm, shapes, _as_shapes(example_input), modules)
    ctx = _Context(model, gm, groups, example_input, importance, seed, _chosen(groups, include, exclude))
    before = ctx.totals({})
    rate = amount if amount is not None else ctx.rate_for("macs" if macs is not None else "params",
                                                        macs if macs is not None else params, before)
    classes = ctx.pick(rate)
    classes, failed = ctx.checked(classes)
    cut = removal(groups, classes)
    pruned_gm = copy.deepcopy(gm)
    remove(pruned_gm, groups, cut)
    for n in pruned_gm.graph.nodes:  # torch.export's recorded shapes are the unpruned ones: propagate afresh
        n.meta.pop("val", None)
        n.meta.pop("tensor_meta", None)
    user, plan, why = None, None, None
    if keep_class and gm.meta.get("fxrf_capture") != "export" and not isinstance(model, torch.fx.GraphModule):
        user, why = ctx.module_form(cut)
        if user is not None:
            plan = _plan(model, user, cut, groups)
    else:
        why = ("the model was captured by torch.export: its module paths are not the graph's" if keep_class
               else "keep_class=False")
    out_model = user if user is not None else pruned_gm
    calibrated = None
    if calibration is not None:
        calibrated = _calibrate(gm, out_model, groups, cut, calibration, calibration_batches, seed)
    from fxrf.analysis import analyze
    after_analysis = analyze(pruned_gm, example_input)
    after = {"macs": sum(c.macs for c in after_analysis.costs.values()),
             "params": sum(p.numel() for p in out_model.parameters())}
    changes = ctx.changes(classes)
    declined = [{"node": n, "reason": r} for n, r in groups.declined] + failed
    summary = {"amount": rate, "importance": importance, "classes": len(groups.members),
               "removed_classes": len(classes), "removed_channels": sum(c.channels_removed for c in changes),
               "params_before": before["params"], "params_after": after["params"],
               "macs_before": before["macs"], "macs_after": after["macs"],
               "calibration": calibrated}
    return PruneResult(pruned_gm, changes, summary, declined, after_analysis, out_model, plan, why, groups, rate,
                       classes, cut, gm)


def calibrate(result: PruneResult, model: nn.Module, data, *, batches: int | None = None, seed: int = 0):
    """(a calibrated copy of `model`, the fits): `model` being `result.model` or a copy of it, calibrated as
    prune(calibration=...) does, on `data` (its first `batches` batches, all by default; one more held out)."""
    from fxrf.training.calibrate import input_batches
    xs = input_batches(data, 10 ** 6 if batches is None else batches)
    out = copy.deepcopy(model)
    fits = _calibrate(result.source, out, result.groups, result.cut, xs, max(1, len(xs) - 1), seed)
    return out, fits


def _calibrate(original, pruned, groups: Groups, cut: dict, data, batches: int, seed: int) -> dict:
    """In place on `pruned`: walking the modules in graph order, every conv/linear that lost input channels refit
    by least squares to the original's outputs (refit.py; a fit that does not help on a held-out batch is dropped)
    and every batch norm re-estimated, each before the layers after it are fit."""
    from fxrf.training.calibrate import input_batches

    from ..export.programs import eval_mode
    from .refit import refit
    xs = input_batches(data, batches + 1)
    order = []
    for n in original.graph.nodes:  # each module where the graph first reads it (a call, or its tensors)
        if n.op == "call_module":
            order.append(n.target)
        elif n.op == "get_attr":
            order.append(n.target.rpartition(".")[0])
    steps = []
    for path in dict.fromkeys(order):
        try:
            m = original.get_submodule(path)
        except AttributeError:
            continue
        d, use = cut.get(path), groups.uses.get(path)
        if d and d["in"] and use is not None and use.kind in ("conv", "linear"):
            n = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            steps.append((path, [o for o in range(n) if o not in set(d["out"])]))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            steps.append((path, None))
    with eval_mode(original), eval_mode(pruned):
        fits = refit(original, pruned, steps, xs, seed=seed)
    return {"batch_norms": "re-estimated", "refit": [
        {"layer": f.path, "error_before": round(f.error_before, 4), "error_after": round(f.error_after, 4),
         "kept": f.kept} for f in fits]}


def _chosen(groups: Groups, include, exclude) -> list:
    """The classes a prune may take: some producer included, none excluded."""
    inc = [include] if isinstance(include, str) else list(include or ())
    exc = [exclude] if isinstance(exclude, str) else list(exclude or ())
    out = []
    for c in groups.members:
        ps = groups.producers(c)
        if not ps:
            continue
        if inc and not any(fnmatch.fnmatchcase(p, g) for p in ps for g in inc):
            continue
        if any(fnmatch.fnmatchcase(p, g) for p in ps for g in exc):
            continue
        out.append(c)
    return out


class _Context:
    """One prune's inputs, built once: the model, its private graph, the classes and their scores."""

    def __init__(self, model, gm, groups, example_input, importance, seed, candidates):
        self.model, self.gm, self.groups, self.example = model, gm, groups, example_input
        self.candidates = candidates
        self.score = self._scores(importance, seed)
        self.families: dict = defaultdict(list)
        for c in candidates:
            self.families[groups.family(c)].append(c)
        for f in self.families.values():
            f.sort(key=lambda c: (self.score[c], c))
        self.sizes = _module_sizes(gm)
        from fxrf.analysis import analyze
        a = analyze(gm, example_input)
        self.node_macs = {}
        by_name = {x.name: x for x in gm.graph.nodes}
        for name, cost in a.costs.items():
            n = by_name.get(name)
            if n is not None and n.op == "call_module":
                self.node_macs[n.target] = self.node_macs.get(n.target, 0) + cost.macs
        self.other_macs = sum(c.macs for c in a.costs.values()) - sum(self.node_macs.values())

    def _scores(self, importance, seed) -> dict:
        if importance == "random":
            g = torch.Generator().manual_seed(seed)
            r = torch.rand(len(self.candidates), generator=g).tolist()
            return dict(zip(self.candidates, r))
        out = {}
        for c in self.candidates:
            filters, norms = [], []
            for p, role, i in self.groups.members[c]:
                if role == "out":
                    filters.append(float(self.gm.get_submodule(p).weight[i].detach().abs().mean()))
                elif self.groups.uses[p].kind in ("norm", "attr"):
                    norms.append(self._norm_scale(p, i))
            norms = [n for n in norms if n is not None]
            # a norm after the filter rescales it by gamma / sigma: scored together, the score does not change
            # when a scale moves between a filter and its norm (which computes the same function)
            out[c] = sum(filters) / len(filters) * (sum(norms) / len(norms) if norms else 1.0)
        return out

    def _norm_scale(self, path, j) -> float | None:
        """|gamma_j| / sqrt(var_j + eps) of the batch norm at `path` (a module, or a buffer a functional norm
        reads: its owner), or None where it has no running variance."""
        from .surgery import owner
        m = self.gm.get_submodule(path if self.groups.uses[path].kind == "norm" else owner(path)[0])
        var = getattr(m, "running_var", None)
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or var is None:
            return None
        w = m.weight
        g = 1.0 if w is None else abs(float(w[j].detach()))
        return g / math.sqrt(float(var[j]) + m.eps)

    def pick(self, rate: float) -> list:
        """The lowest-scoring round(rate * n) classes of each family, leaving every producer at least one."""
        chosen = []
        for fam in self.families.values():
            k = min(int(round(rate * len(fam))), len(fam) - 1)
            chosen += fam[:max(k, 0)]
        return self._leave_one(chosen)

    def _leave_one(self, chosen) -> list:
        left: dict = {}
        for path, n in self.sizes.items():
            left[path] = n
        drop = set(chosen)
        for c in sorted(chosen, key=lambda c: -self.score[c]):  # give back the best classes first
            outs = defaultdict(int)
            for p, role, _ in self.groups.members[c]:
                if role == "out" or self.groups.uses[p].kind in ("dw", "norm", "prelu", "attr"):
                    outs[p] += 1
            if any(left.get(p, math.inf) - k < 1 for p, k in outs.items()):
                drop.discard(c)
                continue
            for p, k in outs.items():
                if p in left:
                    left[p] -= k
        return [c for c in chosen if c in drop]

    def totals(self, cut: dict) -> dict:
        """MACs and params after removing `cut` (from the conv/linear shapes alone: exact for them)."""
        macs, params = self.other_macs, 0
        for path, m in self.gm.named_modules():
            own = sum(p.numel() for p in m.parameters(recurse=False))
            d = cut.get(path)
            use = self.groups.uses.get(path)
            f_in = f_out = 1.0
            if d is not None and use is not None:
                if use.kind in ("conv", "linear"):
                    n_out = m.out_channels if use.kind == "conv" else m.out_features
                    n_in = m.in_channels if use.kind == "conv" else m.in_features
                    f_out, f_in = 1 - len(d["out"]) / n_out, 1 - len(d["in"]) / n_in
                else:
                    n = m.groups if use.kind == "dw" else (len(m.weight) if use.kind == "prelu" else m.num_features)
                    f_out = 1 - len(d["in"]) / n
            params += own * f_in * f_out if use is not None and use.kind in ("conv", "linear") else own * f_out
            macs += self.node_macs.get(path, 0) * f_in * f_out
        return {"macs": int(round(macs)), "params": int(round(params))}

    def rate_for(self, what: str, keep: float, before: dict) -> float:
        """The rate whose result keeps at most `keep` of the model's `what`, by bisection."""
        goal = keep * before[what]
        lo, hi = 0.0, 0.99
        if self.totals(removal(self.groups, self.pick(hi)))[what] > goal:
            raise InputError(f"fxrf.prune: {what}={keep} cannot be reached: removing all but one channel of every "
                             f"family leaves {self.totals(removal(self.groups, self.pick(hi)))[what] / before[what]:.3f}"
                             f" of the {what} (the rest is frozen: see PruneResult.declined)")
        for _ in range(30):
            mid = (lo + hi) / 2
            got = self.totals(removal(self.groups, self.pick(mid)))[what]
            if got > goal:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-4:
                break
        return hi

    def checked(self, classes) -> tuple[list, list]:
        """`classes` if the pruned graph passes the zeroed-readers check; else the families that fail alone are
        left whole (listed with the reason)."""
        why = self._check(self.gm, classes)
        if why is None:
            return classes, []
        by_family = defaultdict(list)
        for c in classes:
            by_family[self.groups.family(c)].append(c)
        keep, failed = [], []
        for fam, cs in by_family.items():
            w = self._check(self.gm, cs)
            if w is None:
                keep += cs
            else:
                failed.append({"node": ", ".join(self.groups.producers(cs[0])), "reason": f"left whole: {w}"})
        if keep and self._check(self.gm, keep) is not None:
            raise FxrfError(f"fxrf.prune: the pruned model does not compute what the original computes with the "
                            f"removed channels zeroed ({why}); exclude= the modules named in its message")
        return keep, failed

    def _check(self, root, classes) -> str | None:
        cut = removal(self.groups, classes)
        ref, new = copy.deepcopy(root), copy.deepcopy(root)
        zero_readers(ref, self.groups, cut)
        try:
            remove(new, self.groups, cut)
        except FxrfError as e:
            return str(e)
        return _differs(ref, new, self.example)

    def module_form(self, cut) -> tuple:
        user = copy.deepcopy(self.model)
        try:
            remove(user, self.groups, cut)
        except (AttributeError, FxrfError) as e:
            return None, f"the model's modules could not be sliced by path ({e})"
        ref = copy.deepcopy(self.model)
        zero_readers(ref, self.groups, cut)
        why = _differs(ref, user, self.example)
        if why is not None:
            return None, f"the user's class, pruned module by module, {why}"
        return user, None

    def changes(self, classes) -> list:
        by_family = defaultdict(list)
        for c in classes:
            by_family[self.groups.family(c)].append(c)
        out = []
        for fam, cs in self.families.items():
            gone = by_family.get(fam, [])
            if not gone:
                continue
            prods = tuple(sorted({p for c in cs for p in self.groups.producers(c)}))
            out.append(PruneChange(prods, tuple(sorted({p for p, _ in fam})), len(cs), len(cs) - len(gone),
                                   sum(1 for c in gone for _, role, _ in self.groups.members[c] if role == "out")))
        return out


def _module_sizes(gm) -> dict:
    out = {}
    for path, m in gm.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            out[path] = m.out_channels if not (m.groups > 1 and m.groups == m.in_channels) else m.groups
        elif isinstance(m, nn.Linear):
            out[path] = m.out_features
    return out


def _differs(ref: nn.Module, new: nn.Module, example_input) -> str | None:
    """None if `new` computes what `ref` computes (eval mode, one random input), else what went wrong."""
    from torch.utils._pytree import tree_leaves

    from ..export.programs import eval_mode
    from ..export.saving import _example
    xs = _example(ref, example_input)
    outs = []
    for m in (ref, new):
        try:  # (a GraphModule prints the failing line of its code to stderr: the reason is returned instead)
            with eval_mode(m), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                outs.append([t for t in tree_leaves(m(*xs)) if isinstance(t, torch.Tensor)])
        except Exception as e:
            return f"does not run ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if len(outs[0]) != len(outs[1]):
        return "returns another number of tensors"
    for a, b in zip(*outs):
        if a.shape != b.shape:
            return f"returns shape {tuple(b.shape)} where the original returns {tuple(a.shape)}"
        scale = 1 + float(a.abs().max()) if a.numel() else 1.0
        if a.is_floating_point() and not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale):
            return f"computes another function (max |diff| {float((a - b).abs().max()):.3g})"
    return None


def _plan(model: nn.Module, user: nn.Module, cut: dict, groups: Groups) -> dict | None:
    """The structure plan: each sliced module rebuilt from its class and new constructor arguments."""
    from ..user_model import PLAN_VERSION, _NotLocal, _qualified, _spec
    from .surgery import owner
    changes = []
    paths = sorted({owner(p)[0] if groups.uses[p].kind == "attr" else p for p in cut})
    try:
        for path in paths:
            changes.append({"path": path, "op": "resize", "modules": [_spec(user.get_submodule(path), path, user)]})
    except _NotLocal:
        return None
    return {"fxrf_plan": PLAN_VERSION, "class": _qualified(type(model)), "changes": changes}
