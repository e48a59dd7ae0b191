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

import dataclasses

import torch.fx as fx
import torch.nn as nn
from torch.fx._lazy_graph_module import _LazyGraphModule

from fxrf.analysis import analyze, rebind
from fxrf.cost import as_meta, node_cost, params_by_node, total
from fxrf.metric import DEFAULT_ALPHA
from fxrf.ops import default_table
from fxrf.shapes import reuse_meta_runs

from .. import finish, private_copy
from ..select import Selection
from ..util import copy_graph_module, keep_modes
from .budget import start_clock
from . import context
from .context import DEFAULT_MACS_BUDGET, DEFAULT_THRESHOLD, STRATEGIES, Run, check_options, convs_per_stage, limits
from .greedy import insert_greedy
from .greedy import remove_saturated as remove_saturated_convs
from .paper import swap_paper
from .result import Change, Declined, OrganizerResult

# The package's modules, one job each: result (what it returns), context (the options, checked once, and the run
# context), sites (where a stage can take one more conv), units (the inserted unit; scoring candidates), removal,
# greedy and paper (the two strategies), budget (the latency clock).
__all__ = ["organize_stages", "Change", "Declined", "OrganizerResult", "DEFAULT_THRESHOLD", "DEFAULT_MACS_BUDGET",
           "STRATEGIES"]


def _signatures(gm) -> dict:
    """{node name: everything fxrf.cost reads of the node but the parameters it owns}: its call, its module and the
    shapes of its arguments and output."""
    meta = lambda v: as_meta(gm, v)  # noqa: E731
    return {n.name: (n.op, n.target, gm.get_submodule(n.target) if n.op == "call_module" else None,
                     fx.node.map_aggregate(n.args, meta), fx.node.map_aggregate(n.kwargs, meta), meta(n))
            for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")}


def _costs(gm, costs: dict, signatures: dict) -> dict:
    """fxrf.cost.model_cost(gm), taking each node's cost from `costs` (the input model's) where the node is the
    same call on the same shapes (`signatures`: the input model's): only its parameters are counted again (which
    node owns a shared tensor can change). A ViT's attention modules are costed by running them, twice otherwise."""
    table = default_table()
    params = params_by_node(gm, table)
    now = _signatures(gm)
    out = {}
    for n in gm.graph.nodes:
        old = costs.get(n.name)
        if old is not None and n.name in now and _same(now[n.name], signatures.get(n.name)):
            c = dataclasses.replace(old, params=params.get(n.name, 0))
        else:
            c = node_cost(gm, n, table, params)
        if c is not None:
            out[n.name] = c
    return out


def _same(a, b) -> bool:
    try:
        return a is not None and b is not None and a[2] is b[2] and a[:2] == b[:2] and a[3:] == b[3:]
    except RuntimeError:  # a tensor among the arguments: compare as unequal
        return False


def _lazy(gm):
    """The same GraphModule (its modules, in their modes), generating its code only when it is read or run: every
    conv inserted regenerated the whole model's code (30 ms a round on resnet152), and only the result's is read."""
    out = keep_modes(_LazyGraphModule(gm, gm.graph, type(gm).__name__), gm)
    out.meta.update(gm.meta)
    return out


@reuse_meta_runs()  # one model analysed many times: its attention modules run on meta tensors once
def organize_stages(model: nn.Module, example_input, *, strategy: str = "greedy", alpha: float = DEFAULT_ALPHA,
                    threshold: float | None = None, macs_budget: float | None = DEFAULT_MACS_BUDGET,
                    params_budget: float | None = None, remove_saturated: bool = True,
                    remove_below: float | None = None, kernel_size: int | None = 3,
                    max_insertions: int = 64, spatial_cap: bool | None = None, include=None,
                    exclude=None, latency_budget: float | None = None, device: str = "cpu", batch: int = 1,
                    latency=None) -> OrganizerResult:
    """Move convs to the stages where the 3DRF gain is highest; inserted convs start as the identity.

    strategy: "greedy" (default): remove convs with gain <= `remove_below`, insert while the gain exceeds
    `threshold`; "paper": keep the input model's number of convs (at least one per stage), swapping the lowest-gain
    removable conv for the highest-gain candidate while the candidate's gain is higher (see the module docstring;
    `threshold`, `remove_below` and `remove_saturated=False` have no meaning there: an InputError).
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
    check_options(strategy, threshold=threshold, remove_below=remove_below, remove_saturated=remove_saturated,
                  macs_budget=macs_budget, params_budget=params_budget, latency_budget=latency_budget,
                  kernel_size=kernel_size, max_insertions=max_insertions)
    paper = strategy == "paper"
    cap = (not paper) if spatial_cap is None else bool(spatial_cap)
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    cutoff = threshold if remove_below is None else remove_below
    work = _lazy(private_copy(model, example_input))
    a = analyze(work, example_input, alpha=alpha, spatial_cap=cap)
    selection = Selection(include, exclude)
    selection.check(r.path for r in a.convs())
    clock = None if latency_budget is None else start_clock(work, a, latency_budget, lm=latency, device=device,
                                                            batch=batch)
    before, convs_before = total(a.costs), convs_per_stage(a)
    seen = (a.costs, _signatures(work)) if context.INCREMENTAL else None  # to reuse for the result's costs
    run = Run(example_input=example_input, alpha=alpha, cap=cap, threshold=threshold, cutoff=cutoff,
              original=before, limits=limits(before, macs_budget, params_budget), kernel_size=kernel_size,
              max_insertions=max_insertions, selection=selection, clock=clock, incremental=context.INCREMENTAL)
    changes, declined = [], []
    # each analysis of a large model holds GBs of fields (vit_h_14: ~1.5 GB): none is kept past its last use, and
    # one is handed on only to the next step that reads the same graph
    now, a = total(a.costs), (a if run.incremental else None)
    if paper:
        changes, declined = swap_paper(run, work, a)
        a = None
    else:
        if remove_saturated:
            changes, declined, a = remove_saturated_convs(run, work, a)
            now, a = total(a.costs), (a if run.incremental else None)
        inserted, refused, a = insert_greedy(run, work, now, a)
        changes, declined = changes + inserted, declined + refused
    if any(c.kind == "remove" for c in changes):  # a removal can leave act_(Identity(act_(x))): two in-place
        a = None  # (the flags change what the analysis reads: analyse again)
        for m in work.modules():  # writes to one tensor that backward needs; out of place computes the same
            if getattr(m, "inplace", None) is True:
                m.inplace = False
    finish(work)
    # under the input model's class name (deep copies of a GraphModule are all called "GraphModule")
    work = copy_graph_module(work, params="shared", class_name=type(model).__name__)
    # the last round's analysis, when finish left its graph as it was (nothing dead): the same records
    a = None if a is None or not run.incremental else rebind(a, work, type(model).__name__)
    a = a if a is not None else analyze(work, example_input, alpha=alpha, spatial_cap=cap)
    if seen is not None:
        a.__dict__["costs"] = _costs(work, *seen)  # (Analysis.costs is a cached property)
    after = total(a.costs)
    stage_convs = convs_per_stage(a)
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
        "convs_per_stage_before": convs_before, "stage_convs": stage_convs,
        "stage_resolutions": [list(s.resolution) for s in a.stages],
        "function_preserved": not any(c.kind == "remove" for c in changes),
        "selection": selection.describe(),
        "latency_budget": latency_budget,
    }
    if clock is not None:
        summary["latency"] = clock.summary()
    return OrganizerResult(work, changes, summary, declined, a)
