"""One run of the organizer: its options, checked once, and everything the strategies read, in one frozen `Run`
that `organize_stages` builds once."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from fxrf.analysis import Analysis, analyze
from fxrf.checks import check_number
from fxrf.cost import Cost
from fxrf.errors import InputError

from ..select import Selection

__all__ = ["STRATEGIES", "DEFAULT_THRESHOLD", "DEFAULT_MACS_BUDGET", "Run", "check_options"]

STRATEGIES = ("greedy", "paper")

# A conv must add more 3DRF gain than this to be worth having. Table 2: an extra conv with gain 0.29 (Variant-3)
# bought +0.07% accuracy, within noise, while gains of 1.6-1.7 bought +0.8%. 0.3 sits just above that, and on
# CIFAR VGG16 it yields the paper's Table 3 layout 5,4,2,1,1 exactly (any threshold in (0.2974, 0.3679) does).
DEFAULT_THRESHOLD = 0.3
DEFAULT_MACS_BUDGET = 1.25  # at most +25% MACs over the input model (the paper's VGG16-opt: 310M -> 370M, +19%)

NOT_SELECTED = "left alone: include/exclude do not select it"

# Reuse what an analysis already knows: a candidate conv's records from its point's fields (fxrf.analysis.extend),
# a round's analysis for the next round while the graph has not changed. False: analyse every graph whole, which
# gives the same result, slower (tests/test_incremental.py compares the two).
INCREMENTAL = True


@dataclass(frozen=True)
class Run:
    """What every step of one organizer run reads: the settings, the input model's cost and the budgets' limits,
    the include/exclude selection and the latency clock (None: no latency budget)."""

    example_input: Any
    alpha: float
    cap: bool  # spatial_cap of every analysis
    threshold: float  # insert a conv only above this gain
    cutoff: float  # remove a conv at or below this gain (remove_below)
    original: Cost  # the input model's total cost
    limits: tuple  # (MACs, params): the most the result may have (math.inf: no limit)
    kernel_size: int | None
    max_insertions: int  # greedy: the most convs inserted; paper: the most swaps
    selection: Selection
    clock: Any = None  # budget.Clock: the latency budget's running prediction (the one mutable part)
    incremental: bool = True  # INCREMENTAL when the run started
    # units.score's rows by candidate, with the stage field of its point they were computed from (a later round
    # whose analysis kept that very Field, in the same stage, gets the same row)
    scored: dict = field(default_factory=dict)

    def analyze(self, gm) -> Analysis:
        return analyze(gm, self.example_input, alpha=self.alpha, spatial_cap=self.cap)

    def may_change(self, path, own=()) -> bool:
        """Whether the pass may remove the conv at `path`: selected, or inserted by this run (`own`: their paths)."""
        return path in own or self.selection.allows(path)

    def may_grow(self, a: Analysis, index: int, own=()) -> bool:
        """Whether stage `index` may get a new conv: every conv in it may change."""
        return all(self.may_change(r.path, own) for r in a.convs() if r.stage == index)


def check_options(strategy: str, **options) -> None:
    """Refuse what organize_stages cannot run, before any work: an unknown strategy, greedy-only options with the
    paper strategy, a number out of range. `options` are organize_stages' keyword arguments, as given."""
    if strategy not in STRATEGIES:
        raise InputError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}")
    greedy_only = [name for name, given in (("threshold", options["threshold"] is not None),
                                            ("remove_below", options["remove_below"] is not None),
                                            ("remove_saturated=False", options["remove_saturated"] is False))
                   if given]
    if strategy == "paper" and greedy_only:  # the same rule the CLI applied to --threshold, --remove-below, ...
        raise InputError(f"{', '.join(greedy_only)} only work{'' if len(greedy_only) > 1 else 's'} with "
                         f"strategy='greedy' (the paper strategy keeps the number of convs and compares gains with "
                         f"each other)")
    threshold = DEFAULT_THRESHOLD if options["threshold"] is None else options["threshold"]
    check_number("threshold", threshold)  # a finite gain >= 0: NaN would compare False everywhere
    check_number("remove_below", threshold if options["remove_below"] is None else options["remove_below"])
    for name in ("macs_budget", "params_budget"):
        v = options[name]
        if v is not None and not v > 0:
            raise InputError(f"{name} is a ratio after/before such as 1.25 (or None for no limit), got {v}")
    v = options["latency_budget"]
    if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
                          or not v > 0):
        raise InputError(f"latency_budget is a ratio of predicted latency after/before, a finite number > 0 such "
                         f"as 1.0 (or None for no limit), got {v!r}")
    k = options["kernel_size"]
    if k is not None and (k < 1 or k % 2 == 0):
        raise InputError(f"kernel_size must be odd (an identity conv needs a centre tap), got {k}")
    if options["max_insertions"] < 0:
        raise InputError(f"max_insertions must be >= 0, got {options['max_insertions']}")


def limits(original: Cost, macs_budget: float | None, params_budget: float | None) -> tuple:
    """(MACs, params) the result may have at most, from the budgets (ratios to `original`; None: no limit)."""
    return (original.macs * macs_budget if macs_budget is not None else math.inf,
            original.params * params_budget if params_budget is not None else math.inf)


def convs_per_stage(a: Analysis, with_gain: bool = False) -> list:
    """Convs per stage, in stage order (with_gain: only those with a gain, i.e. not starting their stage)."""
    counts = [0] * len(a.stages)
    for r in a.convs():
        if r.stage is not None and (r.gain is not None or not with_gain):
            counts[r.stage] += 1
    return counts


def fmt(g) -> str:
    return "n/a" if g is None else f"{g:.4f}"
