"""What `decompose` accepts, checked once (`check_options`, which `decompose` and `fxrf.optimize` call before any
work), and the frozen context one call builds once and hands to the search, every build and the whole-model check
(`Run`)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

from fxrf.analysis import Analysis
from fxrf.cost import Cost
from fxrf.errors import InputError

from ..blocks import CATALOG, Pattern, Recipe, auto_candidates, check_catalog, parse
from ..select import Selection
from .records import KEEP

OBJECTIVES = ("macs", "latency")  # what recipe="auto" minimises
AUTO = "auto"  # the recipe that picks a block per stage
DEFAULT_RECIPE, DEFAULT_OBJECTIVE, DEFAULT_VERIFY = AUTO, OBJECTIVES[0], 5
CHECKED = ("recipe", "objective", "verify", "candidates", "catalog")  # the options `check_options` reads


@dataclass(frozen=True)
class Options:
    """The checked options: `recipe` None for "auto", which tries `candidates` (parsed) per stage."""

    catalog: tuple
    recipe: Recipe | None
    candidates: tuple
    objective: str
    verify: int

    @property
    def name(self) -> str:
        return AUTO if self.recipe is None else self.recipe.name


def check_options(recipe: str | Recipe = DEFAULT_RECIPE, *, objective: str = DEFAULT_OBJECTIVE,
                  verify: int = DEFAULT_VERIFY, candidates: Sequence[str | Recipe] | None = None,
                  catalog: Sequence | None = None) -> Options:
    """`decompose`'s options that need no model, checked and parsed (InputError naming the fix otherwise); the
    rest of its keyword arguments are checked where they are read. `fxrf.optimize` calls it before its first step,
    so a bad option costs no organizer run.

        >>> check_options("DW+PW").recipe.name, check_options().recipe   # "auto": no one recipe
        ('DW+PW', None)
        >>> [r.name for r in check_options().candidates][:3]   # what "auto" tries: those the catalog marks
        ['DW+PW', 'DW+GPW-g2', 'DW+GPW-g4']
        >>> check_options("DW+PW", objective="latency")
        Traceback (most recent call last):
        ...
        fxrf.errors.InputError: objective='latency' chooses among candidates: use recipe='auto' ...
    """
    catalog = check_catalog(CATALOG if catalog is None else catalog)
    if objective not in OBJECTIVES:
        raise InputError(f"objective {objective!r} is unknown; use {' or '.join(OBJECTIVES)}")
    auto = isinstance(recipe, str) and recipe.strip().lower() == AUTO
    if objective == "latency" and not auto:
        raise InputError(f"objective='latency' chooses among candidates: use recipe='auto' (with candidates=[...] "
                         f"to restrict them), not recipe={recipe!r}")
    if isinstance(verify, bool) or not isinstance(verify, int) or verify < 0:
        raise InputError(f"verify={verify!r}: give the rounds of whole-model timing, an int >= 0 (0: no check)")
    if not auto:
        return Options(catalog, parse(recipe, catalog), (), objective, verify)
    tried = auto_candidates(catalog) if candidates is None else candidates
    return Options(catalog, None, tuple(parse(c, catalog) for c in tried), objective, verify)


@dataclass(frozen=True)
class Run:
    """One `decompose` call's context, built once before any plan is applied."""

    options: Options
    before: Analysis  # the private copy before any edit
    ends: dict  # stage_ends(before), read before the edits rewrite that graph in place
    sites: tuple  # the eligible convs the selection allows (Site), graph order
    convs: dict  # {site node: its conv module}, the original modules (a build swaps them out of its graph)
    pattern: Pattern  # the model's norm and activation, repeated inside the blocks
    example_input: Any
    selection: Selection
    cost_before: Cost
    stage_cost_before: dict  # {stage: (params, macs)}
    fold: bool
    transfer_weights: bool
    latency: Any  # a latency.LatencyModel, or None: nothing is timed

    @cached_property  # timed on first use, by the first build: after the search's own timings, as before
    def sites_ms(self) -> float | None:
        """Every eligible conv's time alone: what the predictions in summary["latency"] and ["verified"] scale by."""
        if self.latency is None:
            return None
        return 1e3 * sum(self.latency.time(KEEP, self.convs[s.node], s.in_shape, self.pattern) for s in self.sites)

    @property
    def objective(self) -> str | None:
        """The objective as the summary reports it (None: a fixed recipe, nothing was chosen)."""
        return self.options.objective if self.options.recipe is None else None
