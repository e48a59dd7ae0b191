"""`fxrf.optimize`: the rewrite pipeline, one named step after another (the stage organizer, then the kernel
decomposer), each step a pass that returns a new model. The CLI's `fxrf optimize` and `fxrf.compile` call this; the
order is readable top to bottom in `optimize`, like inductor's `post_grad_passes`.

    >>> import torch.nn as nn, fxrf
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
    >>> r = fxrf.optimize(net, (1, 3, 16, 16), kernels="DW+PW")
    >>> [(c.target, c.recipe) for c in r.changes], list(r.steps)
    ([('2', 'DW+PW')], ['kernels'])
    >>> r.before.convs()[1].rf.volume == r.after.convs()[-1].rf.volume   # 5x5x3: the 3DRF kept
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from fxrf.analysis import Analysis, analyze
from fxrf.errors import InputError
from fxrf.metric import DEFAULT_ALPHA

from . import PassResult

STEPS = ("stages", "kernels")  # the order the steps run in


@dataclass
class OptimizeResult(PassResult):
    """What `optimize` did: `graph_module` the new model; `changes` and `declined` every step's records, in the
    order the steps ran; `steps` each step's own result by name ("stages": the organizer's, "kernels": the
    decomposer's); `before` / `after` (= `analysis`) the analyses of the input model and of the result, with the same
    spatial cap so their fields compare; `summary` the steps' summaries by name."""

    steps: dict = field(default_factory=dict)
    before: Analysis | None = field(default=None, repr=False)

    @property
    def after(self) -> Analysis | None:
        return self.analysis

    def to_dict(self) -> dict:
        return {name: r.to_dict() for name, r in self.steps.items()}


def _options(value, what: str, default_key: str | None = None) -> dict | None:
    """A step's option: False/None (skip), True (defaults), a dict of the pass's keyword arguments, or (kernels) a
    recipe string."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, dict):
        return dict(value)
    if default_key is not None and isinstance(value, str):
        return {default_key: value}
    raise InputError(f"{what}={value!r}: give True, a dict of the pass's keyword arguments"
                     + (f", or a {default_key} string" if default_key else "") + ", or None")


def optimize(model: nn.Module, example_input, *, stages: bool | dict | None = None,
             kernels: str | dict | None = None, alpha: float = DEFAULT_ALPHA, include=None, exclude=None,
             device: str = "cpu", batch: int = 1, latency=None, progress=None) -> OptimizeResult:
    """Rewrite `model` (never modified) by the steps asked for, in order: `stages` (organize_stages: True or its
    keyword arguments, e.g. {"strategy": "paper"}), then `kernels` (decompose: a recipe such as "auto" or "DW+PW",
    or its keyword arguments, e.g. {"recipe": "auto", "objective": "latency"}). `alpha`, `include` / `exclude`
    (module-path globs), `device`, `batch` and `latency` (a LatencyModel) are given to every step that takes them.
    progress: a context-manager factory called with a description around each step (the CLI's line on stderr).
    """
    organize, decompose_opts = _options(stages, "stages"), _options(kernels, "kernels", "recipe")
    if organize is None and decompose_opts is None:
        raise InputError("say what to optimize: stages=True (the organizer), kernels='auto' or a recipe (the "
                         "decomposer), or both")
    if decompose_opts is not None:  # refused before any step runs: a bad option must not cost an organizer run
        from .decomposer import CHECKED, check_options
        check_options(**{k: v for k, v in decompose_opts.items() if k in CHECKED})
    step = progress or _quiet
    shared = {"include": include, "exclude": exclude, "device": device, "batch": batch, "latency": latency}
    current, steps, cap = model, {}, True
    if organize is not None:
        from .organizer import organize_stages
        with step(f"organizing the stages ({organize.get('strategy', 'greedy')})"):
            r = organize_stages(current, example_input, **{"alpha": alpha, **shared, **organize})
        current, steps["stages"], cap = r.graph_module, r, r.summary.get("spatial_cap", True)
    if decompose_opts is not None:
        from .decomposer import DEFAULT_RECIPE, decompose
        with step(f"decomposing the kernels ({decompose_opts.get('recipe', DEFAULT_RECIPE)})"):
            r = decompose(current, example_input, **{**shared, **decompose_opts})
        current, steps["kernels"] = r.graph_module, r
    with step("analysing the result"):  # one spatial cap for both, so their fields compare (the organizer's)
        before = analyze(model, example_input, alpha=alpha, spatial_cap=cap)
        after = analyze(current, example_input, alpha=alpha, spatial_cap=cap)
    changes = [c for r in steps.values() for c in r.changes]
    declined = [d for r in steps.values() for d in r.declined]
    summary = {name: r.summary for name, r in steps.items()}
    return OptimizeResult(current, changes, summary, declined, after, steps=steps, before=before)


class _quiet:
    def __init__(self, what: str):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
