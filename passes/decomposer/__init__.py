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

The package, one job per module: `options` (what `decompose` accepts, checked once: `check_options`; the run
context `Run`), `records` (what it reports), `plan` (the eligible convs and the `auto` search), `apply` (the
surgery and the build of one result), `verdict` (stage ends, the quality and compact checks, stage reports),
`verify` (objective="latency": the whole-model check).
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from fxrf.analysis import analyze
from fxrf.cost import total

from .. import finish, private_copy
from ..blocks import Recipe, model_pattern
from ..select import Selection
from .apply import _build
from .options import (AUTO, CHECKED, DEFAULT_OBJECTIVE, DEFAULT_RECIPE, DEFAULT_VERIFY, OBJECTIVES, Options, Run,
                      check_options)
from .plan import _search, eligible_sites
from .records import CLOSE, KEEP, BlockChange, Declined, Decomposition, RFRow, Site, StageReport, Trial
from .verdict import StageCheck, _stage_costs, rf_row, same_rf, stage_ends, stage_quality
from .verify import VERIFY_MARGIN, _verified

__all__ = ["AUTO", "CHECKED", "CLOSE", "DEFAULT_OBJECTIVE", "DEFAULT_RECIPE", "DEFAULT_VERIFY", "KEEP", "OBJECTIVES",
           "VERIFY_MARGIN", "BlockChange", "Declined", "Decomposition", "Options", "RFRow", "Run", "Site",
           "StageCheck", "StageReport", "Trial", "check_options", "decompose", "eligible_sites", "rf_row", "same_rf",
           "stage_ends", "stage_quality"]


def decompose(model: nn.Module, example_input, recipe: str | Recipe = DEFAULT_RECIPE, *,
              transfer_weights: bool = True, skip_first: bool = True, fold: bool = True,
              candidates: Sequence[str | Recipe] | None = None, catalog: Sequence | None = None,
              include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None,
              objective: str = DEFAULT_OBJECTIVE, device: str = "cpu", batch: int = 1, latency=None,
              verify: int = DEFAULT_VERIFY) -> Decomposition:
    """Replace standard convs of `model` by factorized blocks; the model itself is not modified.

    recipe: "auto", or a catalog recipe applied everywhere eligible ("DW+PW", "DW+GPW-g4", "DW+RPW-g4-o50",
    "GC+shuffle-g4", "PW+DW+PW-e6", "S"). transfer_weights: initialise each block from its conv (transfer.py).
    skip_first: keep the model's first conv. fold: fold the inserted channel rotations/shuffles into neighbouring
    convs where possible. candidates: the recipes "auto" tries (None: those the catalog marks). catalog: the block
    kinds recipe names are read from (None: blocks.CATALOG; a catalog with more rows registers blocks for this call
    only, see docs/decomposer.md). include / exclude: module-path globs (passes/select.py): only convs whose path
    matches an `include` pattern (None: all) and no `exclude` pattern are replaced; a pattern that matches no conv
    raises an InputError.
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
    The checks that need no model (`check_options`) come first. No alpha: the rules compare 3DRFs, never gains.
    """
    options = check_options(recipe, objective=objective, verify=verify, candidates=candidates, catalog=catalog)
    if objective == "latency" and latency is None:
        from ..latency import LatencyModel
        latency = LatencyModel(device, batch)
    gm = finish(private_copy(model, example_input))  # dead branches dropped first: they are no sites
    before = analyze(gm, example_input)
    selection = Selection(include, exclude)
    selection.check(r.path for r in before.convs())
    sites = [s for s in eligible_sites(gm, before, skip_first) if selection.allows(before.record(s.node).path)]
    run = Run(options, before, stage_ends(before),  # the ends read now: the edits rewrite this graph in place
              tuple(sites), {s.node: gm.get_submodule(s.target) for s in sites}, model_pattern(gm), example_input,
              selection, total(before.costs), _stage_costs(before), fold, transfer_weights, latency)
    if options.recipe is not None:
        return _build(run, gm, {s.node: options.recipe for s in sites}, {})
    plan, tried = _search(run, gm, objective)
    if objective == "latency" and verify:
        return _verified(run, gm, plan, tried)  # the whole-model check
    return _build(run, gm, plan, tried)
