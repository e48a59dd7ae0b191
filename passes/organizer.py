"""The stage-level organizer: give each stage the number of convs its 3DRF gain asks for.

The paper's "Stage-level Organizer" decides how many convs each stage (a run of layers at one resolution) should
hold. Two strategies (docs/organizer.md):

- `strategy="paper"`: the rule the paper's Tables 3-5 were computed with (docs/paper.md). The total number of convs
  stays that of the input model and every stage keeps at least one; the convs go where the 3DRF gain is highest.
  Gains are taken with the uncapped spatial extent (`spatial_cap=False`) by default, as in those tables. It swaps
  the removable conv of lowest gain for the candidate conv of highest gain while that gain is higher; on stages of
  identical convs (VGG) this fills the positions (the k-th conv of a stage) by descending gain.
- `strategy="greedy"` (the default, described below): a threshold on the gain decides both directions, and the
  conv count moves freely.

Both report `summary["delta_3drf"]`: the sum of the gains of the convs added minus that of the convs removed, each
gain taken where the conv sits in its stage (the paper's Delta-3DRF column), and `summary["stage_convs"]`.
Both take a `latency_budget`: a limit on the predicted latency (passes/latency.py times the input model and each
conv added or removed), which declines changes without changing their order (docs/organizer.md).

The greedy strategy. One number decides both directions, the `threshold` on the 3DRF gain:

1. remove: every conv whose own gain is at most `remove_below` (default: `threshold`; a gain of exactly 0 means
   the stage's field is already the whole stage input, "saturated") is removed together with its norm and
   activation, where the graph stays valid: same width in and out, a single consumer, not the only conv of a
   residual (or any parallel) branch, and only on an exact gain: not one resting on the conservative field of an
   op without a rule, nor on a gate's saturation (NodeRecord.local_gain > remove_below). The convs kept are listed
   with the reason. Removal changes the function.
2. insert: for every stage, one more standard conv (stage width, 3x3 by default, the stage's own norm and
   activation) is placed at the end of the stage, after the last node all of the stage's data flows through;
   its gain is read from `fxrf.analyze` of that candidate graph. The candidate with the highest gain is kept while
   that gain exceeds `threshold` and the MACs / params budgets (ratios to the input model) hold; then the next.
   An inserted conv starts as the identity (Dirac weights, zero bias, batch norm set to pass through, the
   activation only if it is idempotent such as ReLU on a ReLU output), so insertion alone keeps the function.

The result is a fixed point: every remaining conv with a gain has gain > threshold (unless it could not be
removed), and the next conv of every stage would have gain <= threshold or break a budget (each stage's decline
says which). docs/organizer.md walks through VGG-11 and VGG16.

    >>> import fxrf
    >>> from fxrf.models import vgg11_cifar, vgg16_cifar
    >>> r = fxrf.organize_stages(vgg11_cifar(), (1, 3, 32, 32))
    >>> [(c.kind, c.stage, round(c.gain, 4)) for c in r.changes]
    [('remove', 4, 0.0), ('remove', 3, 0.1439), ('insert', 0, 1.7315), ('insert', 1, 1.5998)]
    >>> r.summary["convs_per_stage_before"], r.summary["stage_convs"]
    ([1, 1, 2, 2, 2], [2, 2, 2, 1, 1])

The paper strategy on CIFAR VGG16 (13 convs, Table 3's VGG16-opt: 5.10M params, Delta-3DRF 2.30):

    >>> p = fxrf.organize_stages(vgg16_cifar(), (1, 3, 32, 32), strategy="paper")
    >>> p.summary["stage_convs"], p.summary["params_after"], p.summary["delta_3drf"]
    ([5, 4, 2, 1, 1], 5101194, 2.2942)
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxrf.analysis import Analysis, Stage, analyze, check_number, path_of
from fxrf.cost import total
from fxrf.errors import InputError
from fxrf.metric import DEFAULT_ALPHA
from fxrf.ops import default_table

from . import PassResult, finish, private_copy
from .util import copy_graph_module, identity_norm
from .select import Selection

__all__ = ["organize_stages", "Change", "Declined", "OrganizerResult", "DEFAULT_THRESHOLD", "DEFAULT_MACS_BUDGET",
           "STRATEGIES"]

STRATEGIES = ("greedy", "paper")

# A conv must add more 3DRF gain than this to be worth having. Table 2: an extra conv with gain 0.29 (Variant-3)
# bought +0.07% accuracy, within noise, while gains of 1.6-1.7 bought +0.8%. 0.3 sits just above that, and on
# CIFAR VGG16 it yields the paper's Table 3 layout 5,4,2,1,1 exactly (any threshold in (0.2974, 0.3679) does).
DEFAULT_THRESHOLD = 0.3
DEFAULT_MACS_BUDGET = 1.25  # at most +25% MACs over the input model (the paper's VGG16-opt: 310M -> 370M, +19%)

_WEIGHT_KINDS = ("conv", "linear")  # fxrf.cost kinds that hold a layer's weights (ends of a branch)


@dataclass(frozen=True)
class Change:
    """One conv inserted into or removed from the graph, and the gain that justified it."""

    kind: str  # "insert" | "remove"
    stage: int
    node: str  # the conv: its node name in the result (insert) or in the input graph (remove)
    gain: float  # insert: the new conv's gain in the candidate graph; remove: the conv's own gain
    reason: str
    nodes: tuple  # every node added or removed (conv, norm, activation)
    after: str  # insert: the node the new conv reads; remove: the node its consumers read instead
    params: int  # parameters added (> 0) or removed (< 0)
    macs: int  # conv MACs added (> 0) or removed (< 0)
    place: str = ""  # insert: "end" (after the stage's last block) or "branch" (inside it, before its last conv)
    time_ms: float | None = None  # latency_budget: the conv's time alone (+ norm, act), ms; None: not timed

    def describe(self, before: Analysis, after: Analysis) -> str:
        """One line, the conv named by its module path (`before`: the pass's input, `after`: its output)."""
        gain = f", gain {self.gain:.4g}" if self.gain is not None else ""
        if self.kind == "remove":
            return f"remove {path_of(before, self.node)} (stage {self.stage}{gain}): {self.reason}"
        return f"insert {path_of(after, self.node)} (stage {self.stage}{gain}): {self.reason}"


@dataclass(frozen=True)
class Declined:
    """A change the organizer considered and did not make (one per stage for insertion), and why."""

    kind: str  # "insert" | "remove"
    stage: int | None
    node: str | None  # remove: the conv kept; insert: where the conv would have gone (None: no place)
    gain: float | None  # the gain it would have had / has
    reason: str


@dataclass
class OrganizerResult(PassResult):
    """declined: Declined records; analysis: fxrf.analyze of graph_module."""

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["declined"] = [asdict(x) for x in self.declined]
        return d


@dataclass(frozen=True)
class _Site:
    """Where and what to insert in one stage: after node `point`, conv(+norm)(+act) of `width` channels."""

    stage: int
    point: str
    width: int
    dims: int
    kernel: int
    bias: bool
    norm: nn.Module | None  # a batch norm to copy the hyper-parameters of
    act: Any  # nn.Module to copy, ("call_function" | "call_method", target, extra args, kwargs), or None
    dtype: torch.dtype
    device: torch.device
    note: str  # what of the stage's pattern was left out to stay exact, if anything
    training: bool  # the model's mode, for the new modules
    shape: tuple = ()  # the new conv's input: `point`'s output shape


def organize_stages(model: nn.Module, example_input, *, strategy: str = "greedy", alpha: float = DEFAULT_ALPHA,
                    threshold: float | None = DEFAULT_THRESHOLD, macs_budget: float | None = DEFAULT_MACS_BUDGET,
                    params_budget: float | None = None, remove_saturated: bool = True,
                    remove_below: float | None = None, kernel_size: int | None = 3,
                    max_insertions: int = 64, spatial_cap: bool | None = None, include=None,
                    exclude=None, latency_budget: float | None = None, device: str = "cpu", batch: int = 1,
                    latency=None) -> OrganizerResult:
    """Move convs to the stages where the 3DRF gain is highest; inserted convs start as the identity.

    strategy: "greedy" (default): remove convs with gain <= `remove_below`, insert while the gain exceeds
    `threshold`; "paper": keep the input model's number of convs (at least one per stage), swapping the lowest-gain
    removable conv for the highest-gain candidate while the candidate's gain is higher (`threshold`,
    `remove_below` and `remove_saturated` do not apply; see the module docstring).
    threshold: insert a conv only if its gain exceeds this (None: DEFAULT_THRESHOLD); remove_below: remove convs
    whose gain is at most this (None: `threshold`; 0.0: only saturated convs, gain exactly 0);
    macs_budget / params_budget: the most MACs / params of the result as a ratio to the input model (None: no
    limit); kernel_size: of the inserted convs (None: the kernel of the stage's last standard conv);
    max_insertions: the most convs inserted (greedy) or swaps made (paper);
    spatial_cap: passed to `fxrf.analyze` for every gain (None: True for "greedy", False for "paper").
    include / exclude: module-path globs (passes/select.py) of the convs the pass may remove; a stage gets a new
    conv only if every conv in it is selected (convs this call inserted always are). A pattern that matches no
    conv raises an InputError.
    latency_budget: the most predicted latency of the result as a ratio to the input model's (None: no limit,
    nothing is timed). The input model is timed whole once, each conv considered for insertion or removal alone
    (passes/latency.py: compiled, cached on disk); a change that would take the prediction (original + added -
    removed) over original * latency_budget is declined. The ranking by gain stays; the budget only limits
    (docs/organizer.md, "Latency budget"). latency: the latency.LatencyModel to time with (None:
    LatencyModel(device, batch)).
    `model` is not modified; the result's `graph_module` is a new GraphModule.

    >>> import fxrf, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    >>> r = fxrf.organize_stages(net, (1, 3, 16, 16), macs_budget=None)
    >>> r.summary["stage_convs"], r.summary["delta_3drf"]   # V_0 = 16*16*3; 5x5x3 -> 7x7x3 -> 9x9x3
    ([4], 1.084)

    The two convs added have gains (147-75)/75 e^(-3*75/768) = 0.7162 and (243-147)/147 e^(-3*147/768) = 0.3678;
    a fifth would have (363-243)/243 e^(-3*243/768) = 0.1911 <= threshold 0.3.
    """
    if strategy not in STRATEGIES:
        raise InputError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}")
    paper = strategy == "paper"
    cap = (not paper) if spatial_cap is None else bool(spatial_cap)
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    cutoff = threshold if remove_below is None else remove_below
    _check_arguments(threshold, cutoff, macs_budget, params_budget, kernel_size, max_insertions, latency_budget)
    work = private_copy(model, example_input)
    a = analyze(work, example_input, alpha=alpha, spatial_cap=cap)
    touch = _Touch(Selection(include, exclude), set())
    touch.selection.check(r.path for r in a.convs())
    clock = None if latency_budget is None else _start_clock(work, a, latency, device, batch, latency_budget)
    before, convs_before = total(a.costs), _convs_per_stage(a)
    changes, declined = [], []
    limits = (before.macs * macs_budget if macs_budget is not None else math.inf,
              before.params * params_budget if params_budget is not None else math.inf)
    if paper:
        _swap_paper(work, example_input, alpha, cap, limits, before, kernel_size, max_insertions, changes, declined,
                    touch, clock)
    else:
        if remove_saturated:
            a = _remove_saturated(work, example_input, alpha, cap, cutoff, changes, declined, touch, clock)
        _insert_greedy(work, example_input, alpha, cap, threshold, limits, before, kernel_size, max_insertions, a,
                       changes, declined, touch, clock)
    if any(c.kind == "remove" for c in changes):  # a removal can leave act_(Identity(act_(x))): two in-place
        for m in work.modules():  # writes to one tensor that backward needs; out of place computes the same
            if getattr(m, "inplace", None) is True:
                m.inplace = False
    finish(work)
    work = _renamed(work, type(model).__name__)
    a = analyze(work, example_input, alpha=alpha, spatial_cap=cap)
    after = total(a.costs)
    stage_convs = _convs_per_stage(a)
    summary = {
        "strategy": strategy, "alpha": alpha, "spatial_cap": cap,
        "threshold": None if paper else threshold,
        "remove_below": cutoff if remove_saturated and not paper else None,
        "macs_budget": macs_budget, "params_budget": params_budget, "kernel_size": kernel_size,
        "inserted": sum(c.kind == "insert" for c in changes), "removed": sum(c.kind == "remove" for c in changes),
        "declined": len(declined),
        "params_before": before.params, "params_after": after.params,
        "params_ratio": round(after.params / before.params, 4) if before.params else None,
        "macs_before": before.macs, "macs_after": after.macs,
        "macs_ratio": round(after.macs / before.macs, 4) if before.macs else None,
        "inserted_gain": round(sum(c.gain for c in changes if c.kind == "insert"), 4),
        "removed_gain": round(sum(c.gain for c in changes if c.kind == "remove"), 4),
        # the paper's Delta-3DRF: gains of the convs added minus gains of the convs removed, each at its position
        "delta_3drf": round(sum(c.gain if c.kind == "insert" else -c.gain for c in changes), 4),
        "convs_before": sum(convs_before), "convs_after": sum(stage_convs),
        "convs_per_stage_before": convs_before, "convs_per_stage_after": stage_convs, "stage_convs": stage_convs,
        "stage_resolutions": [list(s.resolution) for s in a.stages],
        "function_preserved": not any(c.kind == "remove" for c in changes),
        "selection": touch.selection.describe(),
        "latency_budget": latency_budget,
    }
    if clock is not None:
        summary["latency"] = clock.summary()
    return OrganizerResult(work, changes, summary, declined, a)


@dataclass(frozen=True)
class _Touch:
    """What include/exclude let the pass change: a selected conv, or one this call inserted (`own`: their paths)."""

    selection: Selection
    own: set

    def conv(self, path) -> bool:
        return path in self.own or self.selection.allows(path)

    def stage(self, a: Analysis, index: int) -> bool:
        """Whether the stage may get a new conv: every conv in it is selected."""
        return all(self.conv(r.path) for r in a.convs() if r.stage == index)


_NOT_SELECTED = "left alone: include/exclude do not select it"


def _renamed(gm: fx.GraphModule, class_name: str) -> fx.GraphModule:
    """`gm` under the input model's class name (deep copies of a GraphModule are all called "GraphModule")."""
    return copy_graph_module(gm, params="shared", class_name=class_name)


def _check_arguments(threshold, cutoff, macs_budget, params_budget, kernel_size, max_insertions, latency_budget):
    check_number("threshold", threshold)  # a finite gain >= 0: NaN would compare False everywhere
    check_number("remove_below", cutoff)
    for name, v in (("macs_budget", macs_budget), ("params_budget", params_budget)):
        if v is not None and not v > 0:
            raise InputError(f"{name} is a ratio after/before such as 1.25 (or None for no limit), got {v}")
    v = latency_budget
    if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
                          or not v > 0):
        raise InputError(f"latency_budget is a ratio of predicted latency after/before, a finite number > 0 such "
                         f"as 1.0 (or None for no limit), got {v!r}")
    if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0):
        raise InputError(f"kernel_size must be odd (an identity conv needs a centre tap), got {kernel_size}")
    if max_insertions < 0:
        raise InputError(f"max_insertions must be >= 0, got {max_insertions}")


# -- the latency budget ----------------------------------------------------------------------------------------


class _Clock:
    """The latency budget's running prediction: the input model timed whole, plus each conv inserted, minus each
    conv removed, those timed alone (`LatencyModel.time("S", ...)`: the conv, then the model's norm and activation).
    `now` is the one figure both the check and the update use: an accepted change never leaves it over `limit`
    (beyond float rounding)."""

    def __init__(self, lm, pattern, original: float, budget: float):
        self.lm, self.pattern, self.original, self.budget = lm, pattern, original, budget
        self.limit = original * budget
        self.now, self.added, self.removed = original, 0.0, 0.0
        self.untimed: list = []  # removed convs the latency model cannot time (grouped, functional): no saving

    def site(self, site: _Site) -> float:
        """Seconds of the conv `site` would insert."""
        return self.lm.time("S", _site_conv(site, torch.device("meta")), site.shape, self.pattern)

    def conv(self, gm, node: fx.Node, in_shape) -> float | None:
        """Seconds of a conv of the graph, or None where the latency model cannot time it: it times a standard
        nn.Conv2d (its signature has no groups, so a grouped conv would be priced as a dense one)."""
        m = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(m, nn.Conv2d) or m.groups != 1:
            return None
        return self.lm.time("S", m, tuple(in_shape), self.pattern)

    def over(self, t: float, base: float | None = None) -> str | None:
        """Why `base` (default: the prediction now) + `t` seconds breaks the budget, naming the figures; or None.
        A relative 1e-9 is rounding (a swap of two equal times, 0.01 - 0.001 + 0.001 > 0.01), not a breach."""
        new = (self.now if base is None else base) + t
        if new <= self.limit * (1 + 1e-9):
            return None
        return (f"predicted {_ms(new)} > {_ms(self.limit)}, {self.budget:.2f}x the input model's "
                f"{_ms(self.original)}")

    def add(self, t: float) -> None:
        self.now += t
        self.added += t

    def remove(self, t: float | None, name: str) -> None:
        if t is None:
            self.untimed.append(name)
            return
        self.now -= t
        self.removed += t

    def summary(self) -> dict:
        lm = self.lm
        return {"model": repr(lm), "device": lm.key, "batch": lm.batch, "mode": lm.mode,
                "original_ms": _round_ms(self.original), "added_ms": _round_ms(self.added),
                "removed_ms": _round_ms(self.removed), "predicted_ms": _round_ms(self.now),
                "limit_ms": _round_ms(self.limit), "untimed_removed": list(self.untimed)}


def _start_clock(work: fx.GraphModule, a: Analysis, lm, device: str, batch: int, budget: float) -> _Clock:
    """The input model timed whole (an eval-mode copy, compiled; cached by its structure) and the model's norm
    and activation, which every conv is timed with."""
    from .blocks import model_pattern
    from .latency import LatencyModel, input_shape

    flat = [s.index for s in a.stages if len(s.resolution) != 2]
    if flat:
        raise InputError(f"latency_budget: the latency model times 2-d convs only, and stage {flat[0]} is "
                         f"{len(a.stages[flat[0]].resolution)}-d: pass latency_budget=None")
    shape = input_shape(work, "latency_budget", "pass latency_budget=None")
    lm = LatencyModel(device, batch) if lm is None else lm
    whole = copy_graph_module(work, params="copy").eval()  # inference latency; `work`'s modules keep their mode
    return _Clock(lm, model_pattern(work), lm.time_model(whole, shape, "original"), budget)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def _round_ms(seconds: float) -> float:
    return round(seconds * 1e3, 6)


# -- removal ---------------------------------------------------------------------------------------------------


def _remove_saturated(gm, example_input, alpha, cap, cutoff, changes, declined, touch, clock) -> Analysis:
    """Remove convs with gain <= cutoff, last first, until a fresh analysis finds none left to remove.

    Within one analysis the convs are visited in reverse graph order: removing a conv changes the fields of the
    nodes after it only, so the gains of the convs still to visit stay exact.
    """
    while True:
        a = analyze(gm, example_input, alpha=alpha, spatial_cap=cap)
        kept: dict = {}  # the convs this pass could not remove, with the reason
        costs = a.costs
        removed = False
        for r in reversed(a.convs()):
            if r.gain is None or r.gain > cutoff:
                continue
            inexact = _inexact_gain(a, r, cutoff)
            if inexact is not None:
                kept[r.name] = Declined("remove", r.stage, r.name, r.gain, inexact)
                continue
            if not touch.conv(r.path):
                kept[r.name] = Declined("remove", r.stage, r.name, r.gain, _NOT_SELECTED)
                continue
            plan = _removal_plan(gm, a, r.name)
            if isinstance(plan, str):
                kept[r.name] = Declined("remove", r.stage, r.name, r.gain, plan)
                continue
            why = ("saturated: its input already sees the whole stage input (gain 0)" if r.gain == 0 else
                   f"gain {r.gain:.4f} <= {cutoff}")
            t = _removed_time(clock, gm, a, plan, r)
            changes.append(_remove(gm, plan, r, costs, why, t))
            removed = True
        if not removed:
            declined.extend(kept.values())
            return a


def _inexact_gain(a: Analysis, r, cutoff: float) -> str | None:
    """Why the gain of conv `r` (<= cutoff) cannot justify removing it, or None when it can.

    A node without an exact rule gets the conservative field (it sees everything its inputs see), which makes every
    conv after it in the stage look saturated; and a gate's global context can saturate a field the local path
    has not (NodeRecord.local_gain). Either way gain <= cutoff says nothing about the conv itself."""
    stage = a.stages[r.stage] if r.stage is not None else None
    starts = set(stage.inputs) if stage is not None else set()
    unsupported = {name: target for name, target, _ in a.unsupported}
    nodes = {n.name: n for n in a.graph_module.graph.nodes}
    seen, todo = set(), list(nodes[r.name].all_input_nodes)
    while todo:  # the conv's ancestors inside its stage (stage inputs are references: nothing before them counts)
        n = todo.pop()
        if n.name in seen or n.name in starts:
            continue
        seen.add(n.name)
        rec = a.get(n.name)
        if rec is not None and rec.name == n.name and rec.stage != r.stage:
            continue
        if n.name in unsupported:
            return (f"kept: its gain {r.gain:.4f} rests on the conservative field of {n.name} ({unsupported[n.name]}, "
                    f"no exact receptive-field rule) earlier in stage {r.stage}, not on an exact field; register a "
                    f"rule for that op (docs/architecture.md, 'Recipe: add an op') to let the organizer judge it")
        todo += n.all_input_nodes
    if r.local_gain is not None and r.gain <= cutoff < r.local_gain:
        return (f"kept: its gain {r.gain:.4f} rests on gate-induced saturation (a squeeze-excite gate or global "
                f"context earlier in stage {r.stage}); through the local path its gain is {r.local_gain:.4f}")
    return None


def _remove(gm, plan, r, costs, why: str, time_s: float | None = None) -> Change:
    """Erase the planned unit (conv, norm, activation); its consumers read the unit's input instead."""
    unit, src = plan
    names = tuple(n.name for n in unit)
    unit[-1].replace_all_uses_with(src)
    for n in reversed(unit):  # consumers before producers
        gm.graph.erase_node(n)
    return Change("remove", r.stage, r.name, r.gain, why + "; changes the function (retrain)", names, src.name,
                  -sum(costs[n].params for n in names if n in costs), -sum(costs[n].macs for n in names if n in costs),
                  time_ms=None if time_s is None else _round_ms(time_s))


def _removed_time(clock, gm, a: Analysis, plan, r) -> float | None:
    """latency_budget: the time the planned removal saves (counted in `clock`); None: not timed."""
    if clock is None:
        return None
    unit, src = plan
    t = clock.conv(gm, unit[0], a.record(src.name).shape)
    clock.remove(t, r.name)
    return t


def _removal_plan(gm, a: Analysis, name: str):
    """(nodes to erase: the conv, its norm and activation; the node their consumers read instead), or why not."""
    nodes = {n.name: n for n in gm.graph.nodes}
    conv = nodes[name]
    kinds = {k: c.kind for k, c in a.costs.items()}
    src = conv.args[0] if conv.args else None
    if not isinstance(src, fx.Node):
        return "its input is not a graph value"
    if len(conv.users) != 1:
        return f"its output has {len(conv.users)} consumers"
    unit = [conv]
    while len(unit[-1].users) == 1:  # the conv's own norm and activation go with it
        u = next(iter(unit[-1].users))
        data = [m for m in u.all_input_nodes if m.op != "get_attr"]
        if kinds.get(u.name) not in ("norm", "activation") or data != [unit[-1]]:
            break
        unit.append(u)
        if kinds[u.name] == "activation":
            break
    shape_in, shape_out = a.record(src.name).shape, a.record(unit[-1].name).shape
    if shape_in != shape_out:
        if len(shape_in) > 1 and len(shape_out) > 1 and shape_in[1] != shape_out[1]:
            return f"it changes the width ({shape_in[1]} -> {shape_out[1]} channels)"
        return f"it changes the shape {tuple(shape_in)} -> {tuple(shape_out)}"
    merge = _branch_merge(unit, src, kinds)
    if merge is not None:
        return f"it is the only conv of a branch that merges at {merge.name} (residual or parallel branch)"
    return unit, src


def _branch_merge(unit, src, kinds):
    """The merge node (add, cat, mul, ...) for which `unit` is the only weight layer on one of its branches."""
    def is_weight(n):
        return kinds.get(n.name) in _WEIGHT_KINDS

    before = set()  # weight-free ancestors of the unit's input: where a branch that skips only this conv can fork
    todo = [src]
    while todo:
        n = todo.pop()
        if n in before:
            continue
        before.add(n)
        if not is_weight(n):
            todo += n.all_input_nodes
    after, merges, todo = set(unit), [], list(unit[-1].users)  # weight-free descendants, and the merges there
    while todo:
        n = todo.pop()
        if n in after or is_weight(n) or n.op == "output":
            continue
        after.add(n)
        if len([m for m in n.all_input_nodes if m.op != "get_attr"]) > 1:
            merges.append(n)
        todo += list(n.users)
    for m in merges:
        for other in m.all_input_nodes:
            if other in after or other.op == "get_attr":
                continue
            seen, todo = set(), [other]  # does `other` reach back to the fork without passing through us?
            while todo:
                n = todo.pop()
                if n in before:
                    return m
                if n not in seen and n not in after:
                    seen.add(n)
                    todo += n.all_input_nodes
    return None


# -- insertion -------------------------------------------------------------------------------------------------


def _insert_greedy(work, example_input, alpha, cap, threshold, limits, original, kernel_size, max_insertions, a,
                   changes, declined, touch, clock):
    """Insert one conv at a time where the candidate graphs' analysis gives the highest gain (the cheaper place
    on a tie), while the gain exceeds the threshold and the budgets hold."""
    now = total(a.costs)
    used = [now.macs, now.params]
    closed: set = set()  # (stage, place) that will get nothing more: the graph there does not change any more
    while True:
        a = analyze(work, example_input, alpha=alpha, spatial_cap=cap)
        sites = {}
        for stage in a.stages:
            if not touch.stage(a, stage.index):
                if (stage.index, "end") not in closed:
                    declined.append(Declined("insert", stage.index, None, None, "include/exclude do not select "
                                                                               "every conv of the stage"))
                closed.update({(stage.index, "end"), (stage.index, "branch")})
                continue
            for place, site in _sites(a, stage, kernel_size).items():
                if (stage.index, place) in closed:
                    continue
                if isinstance(site, str):
                    declined.append(Declined("insert", stage.index, None, None, site))
                    closed.add((stage.index, place))
                else:
                    sites[stage.index, place] = site
        if not sites:
            return
        rows = []  # (gain, MACs, stage, place, params): one trial graph per place, every stage at once
        for place in _PLACES:
            rows += _score(work, example_input, alpha, cap, {s: x for (s, p), x in sites.items() if p == place},
                           place)
        for gain, macs, s, place, params in sorted(rows, key=lambda r: (-(r[0] if r[0] is not None else -1),) + r[1:4]):
            site, where, why = sites[s, place], _PLACES[place], None
            if gain is None or gain <= threshold:
                why = f"the next conv's gain {_fmt(gain)} <= threshold {threshold}"
            elif used[0] + macs > limits[0]:
                why = (f"the next conv (gain {gain:.4f}) would exceed the MACs budget "
                       f"({_ratio(used[0] + macs, original.macs, limits[0], 'MACs')})")
            elif used[1] + params > limits[1]:
                why = (f"the next conv (gain {gain:.4f}) would exceed the params budget "
                       f"({_ratio(used[1] + params, original.params, limits[1], 'params')})")
            elif clock is not None and (late := clock.over(t := clock.site(site))) is not None:
                why = f"the next conv (gain {gain:.4f}, {_ms(t)}) would exceed the latency budget ({late})"
            elif sum(c.kind == "insert" for c in changes) >= max_insertions:
                why = f"max_insertions ({max_insertions}) reached"
            if why is not None:
                declined.append(Declined("insert", s, site.point, gain, f"{where}: {why}"))
                closed.add((s, place))
                continue
            nodes = _insert(work, site, _prefix(work, s), meta=False)
            touch.own.add(nodes[0].target)
            if place == "end":  # a conv inside the block now would come before this one and change its gain
                closed.add((s, "branch"))
            used[0] += macs
            used[1] += params
            if clock is not None:
                clock.add(t)
            changes.append(Change("insert", s, nodes[0].name, gain,
                                  f"{where}: the highest gain of the next convs, {gain:.4f} > threshold {threshold}"
                                  + (f"; {site.note}" if site.note else ""),
                                  tuple(n.name for n in nodes), site.point, params, macs, place,
                                  None if clock is None else _round_ms(t)))
            break  # the graph changed: analyse again
        else:
            return


_PLACES = {"end": "after the stage's last block", "branch": "inside the stage's last block, before its last conv"}


# -- the paper's rule: a fixed number of convs -------------------------------------------------------------------


def _swap_paper(work, example_input, alpha, cap, limits, original, kernel_size, max_swaps, changes, declined,
                touch, clock):
    """Swap the removable conv of lowest gain for the candidate conv of highest gain while the candidate's gain is
    higher; one swap removes one conv and inserts one, so the number of convs never changes.

    The candidates are scored in a copy of the graph with the conv already removed, so a candidate in the same
    stage gets the gain it will have there. Ties: the later conv goes first (on a stage of identical convs, the
    last position), the cheaper candidate comes first. Positions are counted over the convs that have a gain (a
    conv that starts a stage, strided, has none): each stage keeps at least one of them, and a stage without one
    gets none, since its first conv's gain would be measured against a 1x1x1 field (large by construction).
    The budgets only skip candidates: the best candidate that fits them is the one compared with the conv removed.
    """
    now = total(analyze(work, example_input, alpha=alpha, spatial_cap=cap).costs)
    used = [now.macs, now.params]
    swaps = 0
    while True:
        a = analyze(work, example_input, alpha=alpha, spatial_cap=cap)
        counts = _convs_per_stage(a, with_gain=True)
        order = {r.name: i for i, r in enumerate(a.records)}
        low = sorted((r for r in a.convs() if r.gain is not None and r.stage is not None and counts[r.stage] > 1
                      and touch.conv(r.path)), key=lambda r: (r.gain, -order[r.name]))
        kept, victim = [], None
        for r in low:
            inexact = _inexact_gain(a, r, 0.0)
            if inexact is not None:
                kept.append(Declined("remove", r.stage, r.name, r.gain, f"paper: {inexact}"))
                continue
            trial = _graph_copy(work)
            plan = _removal_plan(trial, a, r.name)
            if isinstance(plan, str):
                kept.append(Declined("remove", r.stage, r.name, r.gain, f"paper: kept, {plan}"))
                continue
            victim = r
            break
        if victim is None:
            declined.extend(kept)
            declined.append(Declined("insert", None, None, None, "paper: no conv can be removed (every stage keeps "
                                                                  "one; the others would break the graph)"))
            return
        costs = a.costs
        t_victim = None if clock is None else clock.conv(trial, plan[0][0], a.record(plan[1].name).shape)
        removal = _remove(trial, plan, victim, costs, "")
        trial.recompile()
        t = analyze(trial, example_input, alpha=alpha, spatial_cap=cap)
        sites, reasons = {}, []
        positions = _convs_per_stage(t, with_gain=True)
        for stage in t.stages:
            if not touch.stage(t, stage.index):
                reasons.append(Declined("insert", stage.index, None, None, "paper: include/exclude do not select "
                                                                           "every conv of the stage"))
                continue
            if not positions[stage.index]:
                reasons.append(Declined("insert", stage.index, None, None, "paper: the stage has no conv with a gain "
                                        "(no position 1 to add to)"))
                continue
            for place, site in _sites(t, stage, kernel_size).items():
                if isinstance(site, str):
                    reasons.append(Declined("insert", stage.index, None, None, f"paper: {site}"))
                else:
                    sites[stage.index, place] = site
        rows = []
        for place in _PLACES:
            rows += _score(trial, example_input, alpha, cap, {s: x for (s, p), x in sites.items() if p == place},
                           place)
        rows = sorted((row for row in rows if row[0] is not None), key=lambda row: (-row[0],) + row[1:4])
        base = (used[0] + removal.macs, used[1] + removal.params)
        lat_base = None if clock is None else clock.now - (t_victim or 0.0)
        over, best, t_best = [], None, None  # the candidates of higher gain than `best` that break a budget, and why
        for row in rows:
            why = None
            if base[0] + row[1] > limits[0] or base[1] + row[4] > limits[1]:
                why = "the swap would exceed the MACs or params budget"
            elif clock is not None:
                t_best = clock.site(sites[row[2], row[3]])
                late = clock.over(t_best, lat_base)
                if late is not None:
                    why = (f"the swap ({_ms(t_best)} in, {_ms(t_victim) if t_victim is not None else 'untimed'} "
                           f"out) would exceed the latency budget ({late})")
            if why is None:
                best = row
                break
            over.append((row, why))
        stop = None
        if best is None or not best[0] > victim.gain:
            stop = (f"paper: the best candidate's gain {_fmt(best[0] if best else None)} <= {victim.gain:.4f}, the "
                    f"lowest gain of the removable convs ({victim.name}): nothing to swap")
        elif swaps >= max_swaps:
            stop = f"paper: max_insertions ({max_swaps}) swaps reached"
        if stop is not None:
            declined.extend(kept + reasons)
            for (g, macs, s, place, params), why in (x for x in over if best is None or x[0][0] > best[0]):
                declined.append(Declined("insert", s, sites[s, place].point, g,
                                         f"{_PLACES[place]}: paper: gain {g:.4f}, but {why}"))
            declined.append(Declined("insert", best[2] if best else None, sites[best[2], best[3]].point if best
                                     else None, best[0] if best else None, stop))
            return
        gain, macs, s, place, params = best
        site = sites[s, place]
        plan = _removal_plan(work, a, victim.name)  # the same plan on the working graph
        changes.append(_remove(work, plan, victim, costs,
                               f"paper: the lowest gain of the removable convs ({victim.gain:.4f}), swapped for a "
                               f"conv in stage {s} with gain {gain:.4f}", t_victim))
        nodes = _insert(work, site, _prefix(work, s), meta=False)
        touch.own.add(nodes[0].target)
        if clock is not None:  # removal first, as checked: now = (now - t_victim) + t_best
            clock.remove(t_victim, victim.name)
            clock.add(t_best)
        changes.append(Change("insert", s, nodes[0].name, gain,
                              f"{_PLACES[place]}: paper: the highest gain of the candidates, {gain:.4f} > "
                              f"{victim.gain:.4f} of {victim.name} (removed)" + (f"; {site.note}" if site.note else ""),
                              tuple(n.name for n in nodes), site.point, params, macs, place,
                              None if clock is None else _round_ms(t_best)))
        used[0], used[1] = base[0] + macs, base[1] + params
        swaps += 1


def _graph_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a copy of `gm`'s graph (same node names) sharing its modules: edit it to try a change."""
    return copy_graph_module(gm, params="shared")


def _score(work, example_input, alpha, cap, sites, place) -> list:
    """One candidate conv per stage, all in one copy of the graph (stages are independent: each stage's fields
    are referenced to its own input), analysed once: [(gain, MACs, stage, place, params)]."""
    if not sites:
        return []
    graph = fx.Graph()
    graph.output(graph.graph_copy(work.graph, {}), type_expr=None)
    trial = fx.GraphModule(work, graph)  # shares the modules; the candidates' modules live on the meta device
    units = {s: _insert(trial, site, _prefix(trial, s), meta=True) for s, site in sites.items()}
    t = analyze(trial, example_input, alpha=alpha, spatial_cap=cap)
    costs = t.costs
    rows = []
    for s, nodes in units.items():
        mine = [costs[n.name] for n in nodes if n.name in costs]
        rows.append((t.record(nodes[0].name).gain, sum(c.macs for c in mine), s, place, sum(c.params for c in mine)))
    return rows


def _insert(gm, site: _Site, prefix: str, meta: bool) -> list:
    """Insert conv (+norm) (+act) after `site.point`; its consumers read the new unit. Returns the new nodes."""
    graph = gm.graph
    point = next(n for n in graph.nodes if n.name == site.point)
    consumers = list(point.users)
    for name, module in _unit_modules(site, meta):
        gm.add_submodule(f"{prefix}.{name}", module)
    gm.get_submodule(prefix).training = site.training  # add_submodule made the container in training mode
    # inserting_after(point) would put every new node right after `point`, i.e. in reverse order
    with graph.inserting_before(point.next):
        x = graph.call_module(f"{prefix}.conv", (point,))
        nodes = [x]
        if site.norm is not None:
            nodes.append(x := graph.call_module(f"{prefix}.norm", (x,)))
        if isinstance(site.act, nn.Module):
            nodes.append(x := graph.call_module(f"{prefix}.act", (x,)))
        elif site.act is not None:
            op, target, extra, kwargs = site.act
            nodes.append(x := graph.create_node(op, target, (x, *extra), dict(kwargs)))
    for u in consumers:
        u.replace_input_with(point, x)
    gm.recompile()
    return nodes


def _unit_modules(site: _Site, meta: bool) -> list:
    """The new modules: a Dirac (identity) conv, a pass-through batch norm, a copy of the activation."""
    device = torch.device("meta") if meta else site.device
    kw = dict(device=device, dtype=site.dtype)
    conv = _site_conv(site, device)
    with torch.no_grad():
        nn.init.dirac_(conv.weight)
        if conv.bias is not None:
            conv.bias.zero_()
    out = [("conv", conv)]
    if site.norm is not None:  # eval: (x - 0) / sqrt((1 - eps) + eps) * 1 + 0 == x
        out.append(("norm", identity_norm(site.norm, site.width, dims=site.dims, **kw)))
    if isinstance(site.act, nn.Module):
        out.append(("act", copy.deepcopy(site.act)))
    for _, m in out:
        m.train(site.training)
    return out


def _site_conv(site: _Site, device: torch.device) -> nn.Module:
    """The conv `site` inserts (width to width, same size), uninitialised."""
    return getattr(nn, f"Conv{site.dims}d")(site.width, site.width, site.kernel, padding=site.kernel // 2,
                                            bias=site.bias, device=device, dtype=site.dtype)


def _prefix(gm, stage: int) -> str:
    k = 1
    while hasattr(gm, f"stage{stage}_extra{k}"):
        k += 1
    return f"stage{stage}_extra{k}"


# -- where a stage ends ----------------------------------------------------------------------------------------


def _sites(a: Analysis, stage: Stage, kernel_size: int | None) -> dict:
    """{place: _Site or the reason there is none} for one more conv in `stage`, at two places:

    "end": after the last node that all of the stage's data flows through (after the last block);
    "branch": inside the last block, after the activation that feeds its last conv (the latest activation before
    "end" that is not such a cut point: a residual branch), where the block may be narrower and the conv cheaper.
    """
    gm = a.graph_module
    rec = {r.name: r for r in a.records}
    members = [n for n in gm.graph.nodes if n.name in rec and rec[n.name].stage == stage.index
               and n.op != "get_attr"]
    convs = [n for n in members if rec[n.name].kernel is not None]
    if not convs:
        return {"end": "the stage holds no conv to take the pattern from"}
    maps = {n for n in members if _is_map(rec[n.name], stage)}
    inside = maps | _returning({n for n in members if n not in maps}, maps)  # + gates (SE) that come back
    exits = [n for n in maps if any(u not in inside for u in n.users)]
    if not exits:
        return {"end": "no value of the stage is used after it"}
    modules = dict(gm.named_modules())
    candidates = [n for n in reversed(members) if n in maps and _channels_first(rec[n.name], stage)]
    cuts = {p: _is_cut(p, exits, inside) for p in candidates}
    end = next((p for p in candidates if cuts[p]), None)
    last_block = []  # the branch nodes after the last fork (a cut point with several users) before `end`
    for q in candidates[candidates.index(end) + 1:] if end is not None else []:
        if cuts[q] and len(q.users) > 1:
            break
        if not cuts[q]:
            last_block.append(q)
    branch = next((q for q in last_block if _activation(q, modules) is not None and len(q.users) == 1
                   and rec[next(iter(q.users)).name].kernel is not None), None)
    out = {"end": (f"no single channels-first node carries all of the stage's outputs "
                   f"({', '.join(n.name for n in exits[:4])}{', ...' if len(exits) > 4 else ''})"
                   if end is None else _site(a, stage, end, convs, modules, kernel_size))}
    if branch is not None:
        out["branch"] = _site(a, stage, branch, convs, modules, kernel_size)
    return out


def _site(a: Analysis, stage: Stage, point, convs, modules, kernel_size: int | None) -> _Site:
    """A conv after `point` with the stage's pattern: its last standard conv's bias (and kernel, if
    kernel_size is None), the batch norm after its convs, and `point`'s activation if idempotent."""
    rec = {r.name: r for r in a.records}
    standard = [n for n in convs if rec[n.name].kernel == "standard"]
    template = (standard or convs)[-1]
    tmod = modules.get(template.target) if template.op == "call_module" else None
    kernel = kernel_size
    if kernel is None:
        ks = tuple(getattr(tmod, "kernel_size", (3,)))
        kernel = ks[0] if len(set(ks)) == 1 and ks[0] % 2 == 1 else 3
    notes = []
    norm = _norm_template(convs, modules)
    if norm is None and any(_is_batch_norm(u, modules) is False for c in convs for u in c.users):
        notes.append("the stage's norm cannot start as the identity: inserted without one")
    act = _activation(point, modules)
    if act is False:
        notes.append(f"{point.name}'s activation is not idempotent: inserted without one to stay exact")
        act = None
    weight = getattr(tmod, "weight", None)
    tm = point.meta.get("tensor_meta")
    return _Site(stage.index, point.name, rec[point.name].shape[1], len(stage.resolution), kernel,
                 getattr(tmod, "bias", None) is not None, norm, act,
                 weight.dtype if weight is not None else getattr(tm, "dtype", torch.float32),
                 weight.device if weight is not None else _device(a.graph_module), "; ".join(notes),
                 a.graph_module.training, tuple(rec[point.name].shape))


def _is_map(r, stage: Stage) -> bool:
    f = r.field
    return (f is not None and f.is_map and len(f.sp) == len(stage.resolution)
            and tuple(r.shape[ax] for ax in f.sp) == tuple(stage.resolution))


def _channels_first(r, stage: Stage) -> bool:
    d = len(stage.resolution)
    return len(r.shape) == 2 + d and tuple(r.field.sp) == tuple(range(2, 2 + d))


def _returning(attached: set, maps: set) -> set:
    """The attached nodes (global pools, gates) whose values flow back into the stage's maps (iterative: chains
    of attached nodes can be thousands long, e.g. window attention in a non-map layout)."""
    found, todo = set(), list(maps)
    while todo:
        for m in todo.pop().all_input_nodes:
            if m in attached and m not in found:
                found.add(m)
                todo.append(m)
    return found


def _is_cut(point, exits, inside) -> bool:
    """Whether every path from the stage's inputs to its exits passes through `point`."""
    seen, todo = set(), [e for e in exits if e is not point]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        ins = [m for m in n.all_input_nodes if m in inside]
        if not ins:  # a source of the stage (its input) reached without passing through `point`
            return False
        todo += [m for m in ins if m is not point]
    return True


def _is_batch_norm(node, modules):
    """True: an nn batch norm with running statistics (can pass through); False: another norm; None: no norm."""
    m = modules.get(node.target) if node.op == "call_module" else None
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.track_running_stats and m.running_var is not None
    if isinstance(m, (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)):
        return False
    if node.op == "call_function" and node.target in (F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm):
        return False
    return None


def _norm_template(convs, modules):
    """The batch norm that follows the stage's last conv that has one directly after it."""
    for c in reversed(convs):
        if len(c.users) == 1:
            u = next(iter(c.users))
            if _is_batch_norm(u, modules):
                return modules[u.target]
    return None


def _activation(point, modules):
    """The activation to repeat after the new conv: `point`'s own, if idempotent (None: `point` is not an
    activation; False: it is one, but applying it twice would change the function).

    act(act(x)) == act(x) (the op table's "idempotent" trait: ReLU, ReLU6, Hardtanh): after an identity conv and
    a pass-through norm on an act output, the act changes nothing."""
    if point.op not in ("call_module", "call_function", "call_method"):
        return None
    m = modules[point.target] if point.op == "call_module" else None
    op = default_table().lookup(point, m)
    if op is None or "activation" not in op.traits:
        return None
    if "idempotent" not in op.traits:
        return False
    if m is not None:
        return m
    extra = point.args[1:]
    if any(isinstance(v, fx.Node) for v in (*extra, *point.kwargs.values())):
        return False  # a bound computed in the graph: not repeated
    return (point.op, point.target, tuple(extra), dict(point.kwargs))


def _device(gm) -> torch.device:
    p = next(iter(gm.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


# -- reporting -------------------------------------------------------------------------------------------------


def _convs_per_stage(a: Analysis, with_gain: bool = False) -> list:
    """Convs per stage, in stage order (with_gain: only those with a gain, i.e. not starting their stage)."""
    counts = [0] * len(a.stages)
    for r in a.convs():
        if r.stage is not None and (r.gain is not None or not with_gain):
            counts[r.stage] += 1
    return counts


def _fmt(g) -> str:
    return "n/a" if g is None else f"{g:.4f}"


def _ratio(value, ref, limit, what) -> str:
    return f"{value / ref:.3f}x > {limit / ref:.3f}x of the input model's {what}" if ref else what
