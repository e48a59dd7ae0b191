"""The kernel-level decomposer: replace standard k x k convs by factorized blocks under the paper's two rules.

- Quality: for the same input, the 3DRF of the new stage equals the original stage's. Measured with the stage input
  as the reference, at the stage's end nodes (the maps of the stage that something outside it reads): spatial
  extents equal and channel counts equal. A strided conv starts a stage; its block starts the stage one layer
  earlier (at the strided depthwise conv), so that stage's input is not the same tensor any more: there the block
  itself must reach the conv's 3DRF (alone, as in Figure 4) and the stage's ends must see at least what they saw,
  with channels counted as fractions of each stage's input.
- Compact: removing any one factorized kernel from a block makes its 3DRF smaller. Measured on the block alone
  with its own input as the reference (the paper's Figure 4), the removed conv passed through (blocks.measure).

Both are read off `fxrf.analyze` on the candidate graph, never computed by hand. A fixed recipe is applied to
every eligible conv (a standard k x k conv called once, all but the first conv when skip_first) and the verdicts
are reported per stage; recipe="auto" picks per stage the cheapest candidate (MACs, then parameters) that meets
both. DW+RPW rotates its groups against the previous grouped layer of its stage (not the first one of a stage: a
stage's input channels are all distinct, so a rotation there changes nothing); the rotations are then folded into
a neighbouring conv where one can take them (fold.py) and what remains is counted.

    >>> import torch, torch.nn as nn, fxrf
    >>> m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    ...                   nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()).eval()
    >>> r = fxrf.decompose(m, (2, 3, 8, 8), recipe="DW+PW")
    >>> [(c.conv, c.recipe, c.quality_layer, c.compact) for c in r.changes]
    [('_3', 'DW+PW', True, True)]
    >>> [(s.blocks, s.quality, s.compact) for s in r.stages]
    [(('DW+PW',), True, True)]
    >>> r.graph_module(torch.rand(2, 3, 8, 8)).shape
    torch.Size([2, 32, 8, 8])
    >>> fxrf.decompose(m, (2, 3, 8, 8), recipe="DW+PW", exclude=["3"]).changes   # module path "3": left alone
    []

The result (`Decomposition`) keeps what happened in typed fields: `changes` (a BlockChange per replaced conv),
`folds` (a fold.FoldChange per channel permutation folded into a conv), `declined` (a Declined per conv whose
recipe could not apply), `stages` (a StageReport per stage of the original graph) and `summary` (totals);
`to_dict()` gives them as JSON-ready dicts.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Sequence

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxrf.analysis import Analysis, analyze, map_size
from fxrf.cost import total
from fxrf.errors import InputError
from fxrf.metric import DEFAULT_ALPHA

from . import PassResult, finish, private_copy
from .blocks import CATALOG, Recipe, auto_candidates, build, check_catalog, emit, load, measure, model_pattern, parse
from .blocks import cost as block_cost
from .fold import fold_in_place
from .latency import input_shape, paired_ratio
from .select import Selection
from .util import call_counts, copy_graph_module, module_of

KEEP, CLOSE = parse("S"), parse("DW+PW")
OBJECTIVES = ("macs", "latency")

# ------------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Site:
    """An eligible conv of the original graph."""

    node: str
    target: str
    stage: int
    in_shape: tuple
    starts_stage: bool  # a strided conv: its output starts the stage


@dataclass(frozen=True)
class BlockChange:
    """One conv replaced by a block."""

    conv: str  # node replaced
    target: str  # module path (now the Block container)
    stage: int
    recipe: str
    output: str  # the node that now stands for the conv's output
    shift: int  # DW+RPW: channels the groups are rotated by against the previous grouped layer (0: none)
    rf_conv: str  # 3DRF of the conv alone, its input as the reference (e.g. 3x3x64)
    rf_block: str  # the same for the block
    quality_block: bool  # the block alone reaches the conv's 3DRF (Figure 4)
    quality_layer: bool | None  # in the model, the block's output has the conv's 3DRF (None: starts a stage)
    compact: bool
    params_before: int  # the conv's own cost, and the block's (intermediate norms included)
    params_after: int
    macs_before: int
    macs_after: int
    transfer_error: float | None  # ||W - block's linear map||_F / ||W||_F, None without transfer

    def describe(self, before=None, after=None) -> str:
        return f"replace {self.target} by {self.recipe} (stage {self.stage}): 3DRF {self.rf_conv} -> {self.rf_block}"


@dataclass(frozen=True)
class Declined:
    """A planned conv the recipe cannot replace (kept as it is)."""

    conv: str
    recipe: str
    reason: str


class RFRow(NamedTuple):
    """A 3DRF as the stage verdicts compare it, referenced to its stage's input of c0 channels."""

    spatial: tuple
    channel: int
    channel_mean: float
    c0: int


class Trial(NamedTuple):
    """One assignment recipe="auto" tried for a stage, in the order tried."""

    assignment: str  # e.g. "DW+GPW-g8", "DW+GPW-g8 + DW+PW" (closed by one DW+PW block)
    macs: int
    params: int
    quality: bool | None  # None: not checked (not compact)
    compact: bool
    time_ms: float | None = None  # objective="latency": the stage's measured time with it (latency.py)


@dataclass(frozen=True)
class StageReport:
    stage: int
    resolution: tuple
    channels: int  # c_0 of the original stage
    convs: tuple  # the eligible convs, graph order
    blocks: tuple  # what each became ("S": kept)
    quality: bool  # the stage's 3DRF equals the original's
    compact: bool  # every block of the stage is compact
    ends: tuple  # ((end node before, its node after), ...)
    rf_before: tuple  # per end node an RFRow (spatial, channel, channel_mean, c_0), stage input as the reference
    rf_after: tuple
    params_before: int  # over every node of the stage
    params_after: int
    macs_before: int
    macs_after: int
    moved_start: bool = False  # a strided block starts the stage earlier: compared "at least", see the module doc
    tried: tuple = ()  # auto: a Trial (assignment, macs, params, quality, compact) per assignment, in the order tried


@dataclass
class Decomposition(PassResult):
    """What `decompose` did. graph_module: the new model; changes: a BlockChange per replaced conv (graph order);
    folds: a fold.FoldChange per inserted permutation folded into a conv; declined: a Declined per conv its recipe
    could not replace; stages: a StageReport per stage of the original graph; summary: totals (params and MACs
    before and after, counts, verdicts, the stage reports as dicts)."""

    folds: list = field(default_factory=list)
    stages: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = super().to_dict()  # changes, summary (which holds the stages and the declined convs as dicts)
        d["folds"] = [asdict(f) for f in self.folds]
        return d


# ----------------------------------------------------------------------------------------------------- the pass


def decompose(model: nn.Module, example_input, recipe: str | Recipe = "auto", *, transfer_weights: bool = True,
              skip_first: bool = True, fold: bool = True, candidates: Sequence[str | Recipe] | None = None,
              alpha: float = DEFAULT_ALPHA, catalog: Sequence | None = None,
              include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None,
              objective: str = "macs", device: str = "cpu", batch: int = 1, latency=None,
              verify: int = 5) -> Decomposition:
    """Replace standard convs of `model` by factorized blocks; the model itself is not modified.

    recipe: "auto", or a catalog recipe applied everywhere eligible ("DW+PW", "DW+GPW-g4", "DW+RPW-g4-o50",
    "GC+shuffle-g4", "PW+DW+PW-e6", "S"). transfer_weights: initialise each block from its conv (transfer.py).
    skip_first: keep the model's first conv. fold: fold the inserted channel rotations/shuffles into neighbouring
    convs where possible. candidates: the recipes "auto" tries (None: those the catalog marks). alpha: the 3DRF
    metric's alpha. catalog: the block kinds recipe names are read from (None: blocks.CATALOG; a catalog with
    more rows registers blocks for this call only, see docs/decomposer.md). include / exclude: module-path globs
    (passes/select.py): only convs whose path matches an `include` pattern (None: all) and no `exclude` pattern
    are replaced; a pattern that matches no conv raises an InputError.
    objective: what recipe="auto" minimises among the assignments that meet quality and compact: "macs" (MACs,
    then params; deterministic and free) or "latency" (the stage's measured time on `device` at batch `batch`,
    keeping a block only where it is faster than the conv it replaces; see docs/decomposer.md). latency: a
    latency.LatencyModel to price with (None: LatencyModel(device, batch), compiled, cached on disk); given with
    objective="macs", the chosen blocks are still priced, in summary["latency"].
    verify (objective="latency"): blocks timed alone mispredict their time inside the compiled model (inductor
    fuses neighbours; the machine's load moves between timings), so the whole model the latency objective chose is
    timed against the one the MACs objective chooses and the unchanged model, compiled, in alternation for
    `verify` rounds; the latency choice is kept only if it is faster than the MACs choice by VERIFY_MARGIN (the
    median of per-round ratios), and a rewrite only if it is faster than the unchanged model (summary["verified"]:
    the times, the choice, the prediction errors). 0: no check (the per-block choice is returned as it is).
    """
    catalog = check_catalog(CATALOG if catalog is None else catalog)
    if objective not in OBJECTIVES:
        raise InputError(f"objective {objective!r} is unknown; use {' or '.join(OBJECTIVES)}")
    is_auto = isinstance(recipe, str) and recipe.strip().lower() == "auto"
    if objective == "latency" and not is_auto:
        raise InputError(f"objective='latency' chooses among candidates: use recipe='auto' (with candidates=[...] "
                         f"to restrict them), not recipe={recipe!r}")
    if objective == "latency" and latency is None:
        from .latency import LatencyModel
        latency = LatencyModel(device, batch)
    if isinstance(verify, bool) or not isinstance(verify, int) or verify < 0:
        raise InputError(f"verify={verify!r}: give the rounds of whole-model timing, an int >= 0 (0: no check)")
    gm = finish(private_copy(model, example_input))  # dead branches dropped first: they are no sites
    before = analyze(gm, example_input, alpha=alpha)
    ends = stage_ends(before)  # read these now: the edits below rewrite this graph in place
    cost_before, stage_cost_before = total(before.costs), _stage_costs(before)
    pattern = model_pattern(gm)
    selection = Selection(include, exclude)
    selection.check(r.path for r in before.convs())
    sites = [s for s in eligible_sites(gm, before, skip_first) if selection.allows(before.record(s.node).path)]
    tried: dict = {}
    if is_auto:
        recipes = [parse(c, catalog) for c in (auto_candidates(catalog) if candidates is None else candidates)]
        if objective == "latency":
            plan, tried = _auto_latency(gm, before, ends, sites, pattern, example_input, recipes, alpha, latency)
        else:
            plan, tried = _auto(gm, before, ends, sites, pattern, example_input, recipes, alpha)
        name = "auto"
    else:
        r = parse(recipe, catalog)
        plan, name = {s.node: r for s in sites}, r.name
    # every eligible conv's time alone: what the predictions in summary["latency"] and ["verified"] scale by
    sites_ms = None if latency is None else 1e3 * sum(
        latency.time(KEEP, gm.get_submodule(s.target), s.in_shape, pattern) for s in sites)
    common = (before, ends, cost_before, stage_cost_before, sites, pattern, example_input, alpha, fold,
              transfer_weights, latency, sites_ms, name, objective if is_auto else None, selection)
    if not (objective == "latency" and verify):
        return _build(gm, plan, tried, *common)
    # the whole-model check: the latency choice against the MACs choice and the unchanged model, in alternation
    macs_plan, macs_tried = _auto(gm, before, ends, sites, pattern, example_input, recipes, alpha)
    if _same_plan(plan, {}) and _same_plan(macs_plan, {}):
        return _build(gm, plan, tried, *common)  # nothing replaced either way: nothing to compare
    options = {"latency": (plan, tried), "macs": (macs_plan, macs_tried), "original": ({}, tried)}
    if _same_plan(macs_plan, plan):
        del options["macs"]
    built = {k: _build(copy_graph_module(gm, params="copy"), p, t, *common) for k, (p, t) in options.items()}
    times = latency.compare({k: r.graph_module for k, r in built.items()}, input_shape(
        before.graph_module, "decompose(objective='latency', verify>0)", "pass verify=0"), verify)
    pick = _pick(times)
    result = built[pick]
    result.summary["verified"] = _verdict(times, pick, built, verify, sites_ms / 1e3)
    return result


VERIFY_MARGIN = 0.03  # the latency choice replaces the MACs choice only if measured this much faster


def _pick(times: dict) -> str:
    """The model the whole-model check keeps, by per-round ratios (`paired_ratio`): the MACs choice (the
    deterministic default) unless the latency choice is faster by VERIFY_MARGIN (two timings of one model
    differ by 1-3% here); then the unchanged model if that rewrite is not faster than it."""
    pick = "latency"
    if "macs" in times and paired_ratio(times, "latency", "macs") >= 1 - VERIFY_MARGIN:
        pick = "macs"
    return pick if paired_ratio(times, pick, "original") < 1 else "original"


def _same_plan(a: dict, b: dict) -> bool:
    keep = lambda plan: {k: v.name for k, v in plan.items() if not v.keeps}  # noqa: E731
    return keep(a) == keep(b)


def _verdict(times: dict, pick: str, built: dict, rounds: int, sites_s: float) -> dict:
    """What the whole-model check measured (per model: its best round, and its time relative to the unchanged
    model's, the median of per-round ratios), and how well the per-block latency model predicted it. Two
    predictions from the measured original and the blocks' times alone (error = predicted / measured - 1):
    additive = measured(original) - sum over the replaced convs of (conv time - block time); scaled =
    measured(original) * (1 - that saving / the sum of the times of every eligible conv), i.e. the block times
    taken as right relative to the convs' and the whole model scaled by them (on a CPU, convs timed alone sum to
    20-30% more than the compiled model, so the additive one overstates the saving)."""
    base = min(times["original"])
    rows = {}
    for k, ts in times.items():
        t = min(ts)
        saved = built[k].summary["latency"]["saved_ms"] / 1e3
        additive, scaled = base - saved, base * (1 - saved / sites_s) if sites_s > 0 else base
        rows[k] = {"ms": round(t * 1e3, 4), "rounds_ms": [round(x * 1e3, 4) for x in ts],
                   "vs_original": round(paired_ratio(times, k, "original"), 4),
                   "additive_ms": round(additive * 1e3, 4), "scaled_ms": round(scaled * 1e3, 4),
                   "additive_error": round(additive / t - 1, 4) if t > 0 else None,
                   "scaled_error": round(scaled / t - 1, 4) if t > 0 else None,
                   "replaced": built[k].summary["replaced"], "macs": built[k].summary["macs_after"]}
    return {"rounds": rounds, "chosen": pick, "margin": VERIFY_MARGIN, "models": rows,
            "latency_vs_macs": round(paired_ratio(times, "latency", "macs"), 4) if "macs" in times else None,
            "sites_ms": round(sites_s * 1e3, 4), "speedup": round(1 / rows[pick]["vs_original"], 4)
            if rows[pick]["vs_original"] > 0 else None}


def _build(gm, plan, tried, before, ends, cost_before, stage_cost_before, sites, pattern, example_input, alpha,
           fold, transfer_weights, latency, sites_ms, name, objective, selection) -> Decomposition:
    """Apply `plan` to `gm` (a private copy, edited in place), fold, check every stage, and report."""
    applied = _apply(gm, sites, plan, pattern, transfer_weights)
    priced = _priced(latency, applied, pattern, sites_ms) if latency is not None else None
    finish(gm)
    folds, fold_summary = [], {"permutations": 0, "folded": 0, "remaining": 0, "remaining_nodes": []}
    if fold and applied.permutations:
        inputs = {n.name: n.args[0].name for n in gm.graph.nodes if n.name in applied.permutations}
        folded = fold_in_place(gm, example_input, nodes=set(applied.permutations))
        gm, folds, fold_summary = folded.graph_module, folded.changes, folded.summary
        gone = {c.node for c in folds}
        for conv, out in list(applied.renamed.items()):
            while out in gone:  # a folded shuffle was the block's last node: its input stands for it now
                out = inputs[out]
            applied.renamed[conv] = out
    else:
        fold_summary["remaining"] = fold_summary["permutations"] = len(applied.permutations)
        fold_summary["remaining_nodes"] = list(applied.permutations)
    after = analyze(gm, example_input, alpha=alpha)
    changes = [_change(d, before, after, applied.renamed, pattern) for d in applied.replaced]
    checks = stage_quality(before, ends, after, applied.renamed, _moved(applied, pattern))
    stages = _stage_reports(before, stage_cost_before, after, sites, changes, checks, tried)
    cb, ca = cost_before, total(after.costs)
    rewritten = [s for s in stages if any(b != "S" for b in s.blocks)]
    summary = {
        "recipe": name, "params_before": cb.params, "params_after": ca.params, "macs_before": cb.macs,
        "macs_after": ca.macs, "replaced": len(changes), "declined": len(applied.declined),
        "quality": all(s.quality for s in rewritten), "compact": all(s.compact for s in rewritten),
        "permutations_inserted": len(applied.permutations), "permutations_folded": fold_summary["folded"],
        "permutations_remaining": fold_summary["remaining"], "remaining_permutations": fold_summary["remaining_nodes"],
        "stages": [asdict(s) for s in stages], "declined_convs": [asdict(d) for d in applied.declined],
        "selection": selection.describe(), "objective": objective, "latency": priced,
    }
    return Decomposition(gm, changes, summary, declined=list(applied.declined), analysis=after, folds=list(folds),
                         stages=stages)


def eligible_sites(gm: fx.GraphModule, a: Analysis, skip_first: bool = True) -> list[Site]:
    """Standard k x k convs (nn.Conv2d, one group, called once with one input) inside a stage, graph order."""
    modules = dict(gm.named_modules())
    calls = call_counts(gm)
    convs = [n for n in gm.graph.nodes if _is_conv(n, modules)]
    starts = {name for s in a.stages for name in s.inputs}
    sites = []
    for node in convs:
        mod = module_of(node, modules)
        if skip_first and node is convs[0]:
            continue
        if not isinstance(mod, nn.Conv2d) or mod.groups != 1 or tuple(mod.kernel_size) == (1, 1):
            continue
        if calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
            continue
        rec = a.record(node.name)
        if rec.stage is None:
            continue
        shape = tuple(node.args[0].meta["tensor_meta"].shape)
        sites.append(Site(node.name, node.target, rec.stage, shape, node.name in starts))
    return sites


def _is_conv(node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(module_of(node, modules), nn.modules.conv._ConvNd)
    return node.op == "call_function" and node.target in (F.conv1d, F.conv2d, F.conv3d)


@dataclass(frozen=True)
class _Replaced:
    """A conv `_apply` replaced, before the analysis of the result gives its BlockChange."""

    site: Site
    recipe: Recipe
    conv: nn.Conv2d  # the original module
    output: str  # the block's last node
    shift: int
    error: float | None  # transfer error (None without transfer)


@dataclass
class _Applied:
    replaced: list = field(default_factory=list)  # _Replaced, graph order
    declined: list = field(default_factory=list)  # Declined
    renamed: dict = field(default_factory=dict)  # conv node -> the node standing for its output
    permutations: list = field(default_factory=list)  # inserted roll / shuffle nodes


def _apply(gm: fx.GraphModule, sites, plan: dict, pattern, transfer: bool) -> _Applied:
    """Edit `gm` (a private copy) in place: each planned site's conv becomes its block."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    out = _Applied()
    grouped_before: set = set()  # stages that already have a rotated (DW+RPW) layer
    for site in sites:
        recipe = plan.get(site.node, KEEP)
        if recipe.keeps:
            continue
        conv = gm.get_submodule(site.target)
        reason = recipe.inapplicable(conv)
        if reason:
            out.declined.append(Declined(site.node, recipe.name, reason))
            continue
        shift = 0
        if recipe.kind.rotates:
            shift = recipe.shift(conv) if site.stage in grouped_before else 0
            grouped_before.add(site.stage)
        block, program = build(recipe, conv, pattern, shift)
        error = load(block, recipe, conv) if transfer else None
        node = nodes[site.node]
        parent, _, leaf = site.target.rpartition(".")
        (gm.get_submodule(parent) if parent else gm).add_module(leaf, block)  # the Block takes the conv's place
        with graph.inserting_before(node):
            new = emit(graph, site.target, program, node.args[0])
        node.replace_all_uses_with(new[-1])
        graph.erase_node(node)
        out.renamed[site.node] = new[-1].name
        out.permutations += [n.name for n, (op, arg) in zip(new, program) if op == "roll" or arg == "shuffle"]
        out.replaced.append(_Replaced(site, recipe, conv, new[-1].name, shift, error))
    return out


# ------------------------------------------------------------------------------------------------------ auto


class _Assignment(NamedTuple):
    label: str
    recipes: tuple  # a Recipe per eligible conv of the stage, graph order


class _Option(NamedTuple):
    macs: int
    params: int
    order: int  # position in the candidate list (the tie-break)
    label: str
    used: list  # the recipes, KEEP where one cannot apply


def _assignments(recipes, n: int) -> list[_Assignment]:
    """A stage's candidates: every recipe throughout; and every grouped recipe closed by one DW+PW block (its
    dense pointwise completes the channel field in one step) or opened by one (a strided first conv must reach its
    own 3DRF alone, see the module doc)."""
    out = [_Assignment("S", (KEEP,) * n)]
    for r in recipes:
        out.append(_Assignment(r.name, (r,) * n))
        if n >= 2 and r.groups > 1:
            out.append(_Assignment(f"{r.name} + DW+PW", (r,) * (n - 1) + (CLOSE,)))
            out.append(_Assignment(f"DW+PW + {r.name}", (CLOSE,) + (r,) * (n - 1)))
    return out


def _auto(gm, before, ends, sites, pattern, example_input, recipes, alpha):
    """Per stage, the cheapest assignment (MACs, then params, then catalog order) whose blocks are compact and
    whose stage meets quality. The quality of an assignment is read from one analysis of the whole model with it
    applied to every stage (stages are independent: each has its own reference), built on a copy whose parameters
    live on the meta device; a verdict is computed only when a stage's search reaches that assignment."""
    by_stage: dict = {}
    for s in sites:
        by_stage.setdefault(s.stage, []).append(s)
    verdicts: dict = {}

    def quality(label: str) -> dict:
        if label not in verdicts:
            plan = {}
            for ss in by_stage.values():
                plan.update({s.node: r for s, r in zip(ss, dict(_assignments(recipes, len(ss))).get(label, ()))})
            skel = copy_graph_module(gm, params="meta")
            applied = _apply(skel, sites, plan, pattern, transfer=False)
            finish(skel)
            checks = stage_quality(before, ends, analyze(skel, example_input, alpha=alpha), applied.renamed,
                                   _moved(applied, pattern))
            verdicts[label] = {k: c.ok for k, c in checks.items()}
        return verdicts[label]

    plan, tried = {}, {}
    for stage, ss in by_stage.items():
        convs = [gm.get_submodule(s.target) for s in ss]
        options = []
        for order, (label, assignment) in enumerate(_assignments(recipes, len(ss))):
            used = [r if not r.inapplicable(c) else KEEP for r, c in zip(assignment, convs)]
            if label != "S" and all(u.keeps for u in used):
                continue
            cs = [block_cost(u, c, s.in_shape, pattern) for u, c, s in zip(used, convs, ss)]
            options.append(_Option(sum(c.macs for c in cs), sum(c.params for c in cs), order, label, used))
        log = []
        for o in sorted(options, key=lambda o: (o.macs, o.params, o.order)):
            compact = all(measure(u, c, s.in_shape, pattern).compact
                          for u, c, s in zip(o.used, convs, ss) if not u.keeps)
            ok = None if not compact else True if o.label == "S" else quality(o.label)[stage]
            log.append(Trial(o.label, o.macs, o.params, ok, compact))
            if ok:
                plan.update({s.node: u for s, u in zip(ss, o.used)})
                break
        tried[stage] = tuple(log)
    return plan, tried


def _auto_latency(gm, before, ends, sites, pattern, example_input, recipes, alpha, latency):
    """Per stage, the fastest assignment (measured stage time, then MACs, then catalog order) whose blocks are
    compact and whose stage meets quality. Each assignment of `_assignments` is first pruned: a block stays only
    where the latency model times it faster than the conv it replaces (with the DW+RPW rotation as `_apply` would
    emit it: none for the first rotated block of a stage), S elsewhere. Pruning changes the assignment, so each
    pruned assignment's quality is checked on its own (one analysis of the model with only that stage rewritten,
    on a meta copy)."""
    by_stage: dict = {}
    for s in sites:
        by_stage.setdefault(s.stage, []).append(s)
    verdicts: dict = {}

    def quality(stage, ss, used) -> bool:
        key = (stage, tuple(u.name for u in used))
        if key not in verdicts:
            skel = copy_graph_module(gm, params="meta")
            applied = _apply(skel, ss, {s.node: u for s, u in zip(ss, used)}, pattern, transfer=False)
            finish(skel)
            checks = stage_quality(before, ends, analyze(skel, example_input, alpha=alpha), applied.renamed,
                                   _moved(applied, pattern))
            verdicts[key] = checks[stage].ok
        return verdicts[key]

    plan, tried = {}, {}
    for stage, ss in by_stage.items():
        convs = [gm.get_submodule(s.target) for s in ss]
        conv_s = [latency.time(KEEP, c, s.in_shape, pattern) for c, s in zip(convs, ss)]
        options, seen = [], set()
        for order, (label, assignment) in enumerate(_assignments(recipes, len(ss))):
            used = [r if not r.inapplicable(c) else KEEP for r, c in zip(assignment, convs)]
            if any(not u.keeps and not measure(u, c, s.in_shape, pattern).compact
                   for u, c, s in zip(used, convs, ss)):
                continue  # not compact: no pruning can make it so, and timing it would be wasted
            pruned, times, rotated = [], [], False
            for u, c, s, t_conv in zip(used, convs, ss, conv_s):
                t = t_conv
                if not u.keeps:
                    shift = u.shift(c) if rotated else 0
                    t_block = latency.time(u, c, s.in_shape, pattern, shift)
                    if t_block < t_conv:
                        t = t_block
                        rotated = rotated or u.kind.rotates
                    else:
                        u = KEEP
                pruned.append(u)
                times.append(t)
            key = tuple(u.name for u in pruned)
            if key in seen:
                continue
            seen.add(key)
            slower = [s.node for s, a, b in zip(ss, used, pruned) if not a.keeps and b.keeps]
            name = f"{label} (S where slower: {', '.join(slower)})" if slower else label
            cs = [block_cost(u, c, s.in_shape, pattern) for u, c, s in zip(pruned, convs, ss)]
            options.append((sum(times), sum(c.macs for c in cs), order, name, pruned, sum(c.params for c in cs)))
        log = []
        for t, macs, _, name, pruned, params in sorted(options, key=lambda o: o[:3]):
            ok = all(u.keeps for u in pruned) or quality(stage, ss, pruned)
            log.append(Trial(name, macs, params, ok, True, round(t * 1e3, 4)))
            if ok:
                plan.update({s.node: u for s, u in zip(ss, pruned)})
                break
        tried[stage] = tuple(log)
    return plan, tried


def _priced(latency, applied: "_Applied", pattern, sites_ms: float) -> dict:
    """What the latency model says of the blocks placed: per replaced conv its time and the block's, totals, and
    `sites_ms`, the sum of the times of every eligible conv (kept or replaced)."""
    rows = []
    for d in applied.replaced:
        t_conv = latency.time(KEEP, d.conv, d.site.in_shape, pattern)
        t_block = latency.time(d.recipe, d.conv, d.site.in_shape, pattern, d.shift)
        rows.append({"conv": d.site.node, "recipe": d.recipe.name, "shift": d.shift, "conv_ms": t_conv * 1e3,
                     "block_ms": t_block * 1e3})
    return {"model": repr(latency), "device": latency.key, "batch": latency.batch, "mode": latency.mode,
            "sites": rows, "conv_ms": sum(r["conv_ms"] for r in rows), "block_ms": sum(r["block_ms"] for r in rows),
            "saved_ms": sum(r["conv_ms"] - r["block_ms"] for r in rows), "sites_ms": sites_ms}


# ---------------------------------------------------------------------------------------------------- verdicts


def stage_ends(a: Analysis) -> dict:
    """{stage: names of its end nodes}: maps at the stage's resolution that something outside the stage reads."""
    def inside(name, s):
        r = a.get(name)
        return (r is not None and r.stage == s and r.field is not None and r.field.is_map
                and map_size(r.field, r.shape) == tuple(a.stages[s].resolution))

    ends = {s.index: [] for s in a.stages}
    for node in a.graph_module.graph.nodes:
        r = a.get(node.name)
        if r is None or r.stage is None or not inside(node.name, r.stage):
            continue
        if any(not inside(u.name, r.stage) for u in node.users):
            ends[r.stage].append(node.name)
    return ends


@dataclass(frozen=True)
class StageCheck:
    ok: bool
    ends: tuple
    before: tuple
    after: tuple
    moved: bool = False


def rf_row(rf, c0: int) -> RFRow | None:
    return RFRow(tuple(rf.spatial), rf.channel, rf.channel_mean, c0) if rf is not None else None


def same_rf(a: tuple | None, b: tuple | None, at_least: bool = False) -> bool:
    """Equal 3DRFs (b >= a with at_least): spatial extents, and channel counts as fractions of each stage's input."""
    if a is None or b is None:
        return a is b
    (sa, ca, ma, c0a), (sb, cb, mb, c0b) = a, b
    if at_least:
        return (all(x <= y for x, y in zip(sa, sb)) and ca * c0b <= cb * c0a
                and ma * c0b <= mb * c0a * (1 + 1e-9) + 1e-9)
    return sa == sb and ca * c0b == cb * c0a and math.isclose(ma * c0b, mb * c0a, rel_tol=1e-9, abs_tol=1e-9)


def _moved(applied: "_Applied", pattern) -> dict:
    """{stage: whether its strided blocks reach their convs' 3DRF alone} for the stages a strided block starts."""
    out: dict = {}
    for d in applied.replaced:
        if d.site.starts_stage:
            shape = d.site.in_shape
            mb, mc = measure(d.recipe, d.conv, shape, pattern), measure(KEEP, d.conv, shape, pattern)
            ok = mb.rf.spatial == mc.rf.spatial and mb.rf.channel == mc.rf.channel
            out[d.site.stage] = out.get(d.site.stage, True) and ok
    return out


def stage_quality(before: Analysis, ends: dict, after: Analysis, renamed: dict, moved: dict | None = None) -> dict:
    """{stage: StageCheck} comparing the 3DRF at every end node (`stage_ends(before)`) of each original stage with
    the new graph's (`renamed`: original conv node -> the node that stands for its output now). `moved`: {stage:
    its strided blocks reach their convs' 3DRF alone} for the stages that a strided block now starts."""
    moved = moved or {}
    out = {}
    for s, names in ends.items():
        rows_b, rows_a, pairs = [], [], []
        for name in names:
            rb = before.record(name)
            new = renamed.get(name, name)
            ra = after.get(new)
            c0 = after.stages[ra.stage].channels if ra is not None and ra.stage is not None else None
            rows_b.append(rf_row(rb.rf, before.stages[s].channels))
            rows_a.append(rf_row(ra.rf, c0) if ra is not None and c0 is not None else None)
            pairs.append((name, new))
        ok = all(same_rf(x, y, at_least=s in moved) for x, y in zip(rows_b, rows_a)) and moved.get(s, True)
        out[s] = StageCheck(ok, tuple(pairs), tuple(rows_b), tuple(rows_a), s in moved)
    return out


def _change(done: _Replaced, before, after, renamed, pattern) -> BlockChange:
    site, recipe, conv, shift, error = done.site, done.recipe, done.conv, done.shift, done.error
    out = renamed[site.node]
    mc, mb = measure(KEEP, conv, site.in_shape, pattern), measure(recipe, conv, site.in_shape, pattern)
    layer = None
    if not site.starts_stage:
        ra = after.record(out)
        layer = same_rf(rf_row(before.record(site.node).rf, before.stages[site.stage].channels),
                        rf_row(ra.rf, after.stages[ra.stage].channels) if ra.stage is not None else None)
    return BlockChange(site.node, site.target, site.stage, recipe.name, out, shift, mc.rf_text, mb.rf_text,
                       mb.rf.spatial == mc.rf.spatial and mb.rf.channel == mc.rf.channel, layer, mb.compact,
                       mc.params, mb.params, mc.macs, mb.macs, error)


def _stage_costs(a: Analysis) -> dict:
    out: dict = {}
    costs = a.costs
    for r in a.records:
        c = costs.get(r.name)
        if r.stage is not None and c is not None:
            p, m = out.get(r.stage, (0, 0))
            out[r.stage] = (p + c.params, m + c.macs)
    return out


def _stage_reports(before, cost_b, after, sites, changes, checks, tried) -> list:
    cost_a = _stage_costs(after)
    by_conv = {c.conv: c for c in changes}
    reports = []
    for st in before.stages:
        ss = [s for s in sites if s.stage == st.index]
        blocks = tuple(by_conv[s.node].recipe if s.node in by_conv else "S" for s in ss)
        chk = checks[st.index]
        # the same stage in the new graph: the one its end nodes fall in
        idx_after = {after.record(n).stage for _, n in chk.ends if after.record(n).stage is not None}
        pb, mb = cost_b.get(st.index, (0, 0))
        pa, ma = (sum(cost_a.get(i, (0, 0))[0] for i in idx_after), sum(cost_a.get(i, (0, 0))[1] for i in idx_after))
        reports.append(StageReport(
            st.index, tuple(st.resolution), st.channels, tuple(s.node for s in ss), blocks, chk.ok,
            all(by_conv[s.node].compact for s in ss if s.node in by_conv), chk.ends, chk.before, chk.after,
            pb, pa, mb, ma, chk.moved, tried.get(st.index, ())))
    return reports
