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

import copy
from dataclasses import dataclass, field

import torch.nn as nn

from fxrf.analysis import Analysis, analyze
from fxrf.errors import InputError
from fxrf.metric import DEFAULT_ALPHA
from fxrf.progress import progress as default_progress

from . import PassResult

STEPS = ("prune", "stages", "kernels")  # the order the steps run in
GOALS = ("paper", "speed")  # what the asked steps are for: the 3DRF-driven layout as asked, or a faster model
DEFAULT_GOAL = "paper"
MEASURE_ROUNDS = 5  # whole-model timing rounds, in alternation, when goal="speed" measures by default
CALIBRATION_BATCHES = 8  # batches the least-squares fit and the norms see (fxrf/training/calibrate.py: 8 suffice)
HOLDOUT_BATCHES = 2  # batches after those, kept out of the fit, on which the result is compared with the model


@dataclass
class OptimizeResult(PassResult):
    """What `optimize` did: `graph_module` the new model; `changes` and `declined` every step's records, in the
    order the steps ran; `steps` each step's own result by name ("stages": the organizer's, "kernels": the
    decomposer's); `before` / `after` (= `analysis`) the analyses of the input model and of the result, with the same
    spatial cap so their fields compare; `summary` the steps' summaries by name."""

    steps: dict = field(default_factory=dict)
    before: Analysis | None = field(default=None, repr=False)
    model: nn.Module | None = field(default=None, repr=False)  # the user's class, changed module by module, or
    # graph_module where a change is not local to a module (form_why says which)
    plan: dict | None = None  # the structure plan that `fxrf.apply` makes again on a fresh model (form "module")
    form_why: str | None = None  # why the user's class could not be kept (form "graph")

    @property
    def after(self) -> Analysis | None:
        return self.analysis

    @property
    def form(self) -> str:
        """"module": `model` is the user's own class (it has a plan); "graph": the emitted GraphModule."""
        return "module" if self.plan is not None else "graph"

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
             kernels: str | dict | None = None, prune: float | dict | None = None, alpha: float = DEFAULT_ALPHA, include=None, exclude=None,
             device: str = "cpu", batch: int = 1, latency=None, calibration=None,
             calibration_batches: int = CALIBRATION_BATCHES, holdout_batches: int = HOLDOUT_BATCHES,
             goal: str = DEFAULT_GOAL, measure: int | None = None, keep_class: bool = True,
             progress=None, finetune: dict | None = None) -> OptimizeResult:
    """Rewrite `model` (never modified) by the steps asked for, in order: `prune` (fxrf.prune: the fraction of
    channels to remove, or its keyword arguments, e.g. {"macs": 0.5}; it runs on the user's model and the later
    steps on its result, with `calibration` refitting the layers it thinned), `stages` (organize_stages: True or its
    keyword arguments, e.g. {"strategy": "paper"}), then `kernels` (decompose: a recipe such as "auto" or "DW+PW",
    or its keyword arguments, e.g. {"recipe": "auto", "objective": "latency"}). `alpha`, `include` / `exclude`
    (module-path globs), `device`, `batch` and `latency` (a LatencyModel) are given to every step that takes them.
    calibration: batches of inputs (tensors or (input, label) tuples: a DataLoader, a list) from the model's data.
    With them the result is calibrated before it is returned (calibrate.py): each decomposed block's last conv is fit
    by least squares to its conv's output and every batch norm re-estimated (the organizer's removals: the norms
    only), on the first `calibration_batches` batches; the next `holdout_batches` are held out to report, in
    summary["calibration"], how close the result computes to `model` right after the weight transfer and after the
    calibration (relative output error, top-1 agreement). Without them, summary["calibration"] is None and a
    result whose function changed needs calibration or fine-tuning before use.
    finetune: {"epochs": N, "data": batches, ...} (any other keys are fxrf.distill's keyword arguments) fine-tunes
    the result after calibration against `model` (the teacher) by knowledge distillation on `data` (inputs or
    (input, label) batches; default: `calibration`), keeping the state that measured best on data held out of it,
    the calibrated one included; summary["finetune"] has the validation figures before and after and the epoch
    kept (FitResult.validation_summary). None: no fine-tuning.
    goal: "paper" (default): the steps as asked, the paper's 3DRF-driven layout, which may cost time; "speed": the
    steps priced in measured latency on `device` at `batch` (the decomposer's objective="latency" for recipe "auto",
    the organizer's latency_budget=1.0, unless given), and the result kept only if it is measured faster than the
    model in the mode deployed (`latency`'s, compiled by default), else the model comes back unchanged
    (summary["latency"]["kept"] says which, and why). With both `prune` and `kernels` (and no `stages`), "speed"
    chooses between the rewrites: the pruned model, the decomposed model and the pruned model decomposed are timed
    with the model in alternation, and the fastest goes on (summary["choice"]: each one's time ratio, the noise).
    measure: rounds of whole-model timing, eager and compiled, each in alternation (the model, the result and a
    second instance of the model, whose ratio to the first is the resolution of a ratio on this machine),
    reported in summary["latency"] (per mode in ["modes"]; the top-level figures are `latency`'s mode, the one
    deployed: compiled unless `latency` says otherwise; ["slower_modes"]: where the result returned is slower than
    the model beyond the noise); None: MEASURE_ROUNDS with goal="speed", 0 (nothing timed) otherwise.
    keep_class: hand the result back as `model`'s own class where every change is local to a module (user_model.py):
    `result.model` is then a copy of `model` changed by module surgery (same class, methods and output type) and
    `result.plan` the structure plan `fxrf.apply` makes again on a fresh model; `result.form` says which form
    `result.model` has ("module" or "graph", the emitted GraphModule) and `result.form_why` why not "module".
    progress: a context-manager factory called with a description around each step (default: fxrf.progress's
    bar or line on stderr, shown only inside fxrf.progress.show() -- the CLI's -- or with FXRF_PROGRESS=1).
    """
    organize, decompose_opts = _options(stages, "stages"), _options(kernels, "kernels", "recipe")
    prune_opts = {"amount": prune} if isinstance(prune, (int, float)) and not isinstance(prune, bool) else \
        _options(prune, "prune")
    if organize is None and decompose_opts is None and prune_opts is None:
        raise InputError("say what to optimize: stages=True (the organizer), kernels='auto' or a recipe (the "
                         "decomposer), prune=0.3 (channel pruning), or several")
    if goal not in GOALS:
        raise InputError(f"goal {goal!r} is unknown; use {' or '.join(map(repr, GOALS))}")
    rounds = (MEASURE_ROUNDS if goal == "speed" else 0) if measure is None else measure
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise InputError(f"measure={measure!r}: give the rounds of whole-model timing, an int >= 0 (0: none)")
    if goal == "speed" and rounds == 0:
        raise InputError("goal='speed' keeps the result only if it is measured faster: give measure >= 1 (or None)")
    if goal == "speed":  # price each step in measured time, unless the caller chose otherwise
        if decompose_opts is not None and str(decompose_opts.get("recipe", "auto")).strip().lower() == "auto":
            decompose_opts.setdefault("objective", "latency")
        if organize is not None and organize.get("strategy", "greedy") == "greedy":
            organize.setdefault("latency_budget", 1.0)
    if rounds and latency is None:
        from .latency import LatencyModel
        latency = LatencyModel(device, batch)
    if decompose_opts is not None:  # refused before any step runs: a bad option must not cost an organizer run
        from .decomposer import CHECKED, check_options
        check_options(**{k: v for k, v in decompose_opts.items() if k in CHECKED})
    step = progress or default_progress  # quiet unless fxrf.progress.show() or FXRF_PROGRESS=1
    data = None if calibration is None else _split(calibration, calibration_batches, holdout_batches)
    fold_after = False
    if data is not None and decompose_opts is not None:  # fit_blocks needs the original channel order: fold after
        fold_after, decompose_opts["fold"] = decompose_opts.get("fold", True), False
    shared = {"include": include, "exclude": exclude, "device": device, "batch": batch, "latency": latency}
    current, steps, cap, choice = model, {}, True, None
    if goal == "speed" and prune_opts is not None and decompose_opts is not None and organize is None:
        # two rewrites for one goal: each alone and both, timed against the model; the fastest goes on
        current, steps, choice = _choose(model, example_input, prune_opts, decompose_opts, shared, data, latency,
                                         rounds, step)
    if choice is None and prune_opts is not None:  # on the user's model: the steps after it edit its pruned copy
        from .prune import prune as prune_pass
        opts = {"include": include, "exclude": exclude, **prune_opts}
        if data is not None and (organize is not None or decompose_opts is not None):
            # calibrated before the next step reads it (alone, it is calibrated below, where the report compares)
            opts.setdefault("calibration", data[0])
            opts.setdefault("calibration_batches", max(1, len(data[0]) - 1))
        with step("pruning channels"):
            r = prune_pass(current, example_input, **opts)
        current, steps["prune"] = r.model, r
    if choice is None and organize is not None:
        from .organizer import organize_stages
        with step(f"organizing the stages ({organize.get('strategy', 'greedy')})"):
            r = organize_stages(current, example_input, **{"alpha": alpha, **shared, **organize})
        current, steps["stages"], cap = r.graph_module, r, r.summary.get("spatial_cap", True)
    if choice is None and decompose_opts is not None:
        from .decomposer import DEFAULT_RECIPE, decompose
        with step(f"decomposing the kernels ({decompose_opts.get('recipe', DEFAULT_RECIPE)})"):
            r = decompose(current, example_input, **{**shared, **decompose_opts})
        current, steps["kernels"] = r.graph_module, r
    calibrated = None
    if data is not None:
        with step("calibrating"):
            current, calibrated = _calibrate(model, example_input, steps, current, data, fold_after)
    tuned = None
    if finetune is not None:  # distillation from `model`, after calibration; the result stays where it was
        from fxrf.training.distill import distill, finetune_options
        opts = finetune_options(finetune, calibration)
        with step(f"fine-tuning against the model ({opts['epochs']} epoch(s))"):
            where = next((p.device for p in current.parameters()), None)
            fit = distill(current, model, opts.pop("data"), **opts)
            current, tuned = fit.model.to(where) if where is not None else fit.model, fit.validation_summary()
    with step("analysing the result"):  # one spatial cap for both, so their fields compare (the organizer's)
        before = analyze(model, example_input, alpha=alpha, spatial_cap=cap)
        after = analyze(current, example_input, alpha=alpha, spatial_cap=cap)
    changes = [c for r in steps.values() for c in r.changes]
    declined = [d for r in steps.values() for d in r.declined]
    timed = None
    if rounds:  # both modes, each in alternation (progress: fxrf.progress bars in LatencyModel.compare)
        timed = _measure(model, current, before, latency, rounds)
        if not changes:  # the result has the model's own structure: a difference measured is noise, not a slowdown
            timed["slower_modes"] = []
        # measured faster means faster by more than two instances of the model differ (the noise): a ratio of 0.97
        # when the instances differ by 5% is not a measurement that the result is faster
        if goal == "speed" and timed["result_vs_model"] >= 1 - timed["noise"]:  # the model comes back
            timed["kept"], timed["slower_modes"] = "model", []
            timed["why"] = (f"the result ran {timed['result_vs_model']:.3f}x the model's time "
                            f"{_mode_name(timed['mode'])}, not faster beyond the noise ({timed['noise']:.3f}: two "
                            f"instances of the model): nothing measured faster, so nothing is changed")
            from . import private_copy
            current = private_copy(model, example_input)
            after = analyze(current, example_input, alpha=alpha, spatial_cap=cap)
            declined += [Reverted(c, timed["why"]) for c in changes]
            changes = []
            calibrated = tuned = None  # they were of the result, which is not what comes back
    summary = {name: r.summary for name, r in steps.items()}
    summary["calibration"] = calibrated
    summary["finetune"] = tuned
    summary["function_preserved"] = _preserved(steps) or (timed is not None and timed.get("kept") == "model")
    summary["goal"], summary["latency"], summary["choice"] = goal, timed, choice
    from .user_model import Lifted
    lifted = Lifted(None, None, "keep_class=False")
    if keep_class:
        with step("handing back the model's own class"):  # a result taken back has no step's change to make
            reverted = timed is not None and timed.get("kept") == "model"
            lifted = _lift(model, current, {} if reverted else steps, example_input)
    summary["form"] = {"form": "module" if lifted.plan is not None else "graph", "why": lifted.why}
    return OptimizeResult(current, changes, summary, declined, after, steps=steps, before=before,
                          model=lifted.model if lifted.model is not None else current, plan=lifted.plan,
                          form_why=lifted.why)


def _choose(model, example_input, prune_opts, decompose_opts, shared, data, latency, rounds, step):
    """goal="speed" given both prune and kernels: the pruned model, the decomposed model and the pruned model
    decomposed, timed with the model (and a second instance of it: the noise) in alternation in the deployed
    mode; (the fastest one's output, its steps, what was measured)."""
    import dataclasses

    from .decomposer import DEFAULT_RECIPE, decompose
    from .latency import paired_ratio
    from .prune import calibrate, prune as prune_pass
    with step("pruning channels"):
        rp = prune_pass(model, example_input, **{"include": shared["include"], "exclude": shared["exclude"],
                                                 **prune_opts})
    thin = rp if data is None else dataclasses.replace(rp, model=calibrate(rp, rp.model, data[0])[0])
    with step(f"decomposing the kernels ({decompose_opts.get('recipe', DEFAULT_RECIPE)}), of the model and of the "
              f"pruned model"):
        rk = decompose(model, example_input, **{**shared, **decompose_opts})
        rb = decompose(thin.model, example_input, **{**shared, **decompose_opts})
    cands = {"prune": ({"prune": rp}, rp.model), "kernels": ({"kernels": rk}, rk.graph_module),
             "prune+kernels": ({"prune": thin, "kernels": rb}, rb.graph_module)}
    shape = (latency.batch,) + tuple(_first_input(example_input)[1:])
    models = {"model": copy.deepcopy(model).eval(), "model (2nd instance)": copy.deepcopy(model).eval()}
    models.update({k: copy.deepcopy(m).eval() for k, (_, m) in cands.items()})
    times = latency.compare(models, shape, rounds, fresh=True)
    ratios = {k: round(paired_ratio(times, k, "model"), 4) for k in cands}
    noise = round(abs(paired_ratio(times, "model (2nd instance)", "model") - 1), 4)
    chosen = min(ratios, key=ratios.get)
    choice = {"mode": latency.mode, "device": latency.device, "batch": latency.batch, "rounds": rounds,
              "ratios": ratios, "noise": noise, "chosen": chosen,
              "ms": {k: round(1e3 * sorted(v)[len(v) // 2], 4) for k, v in times.items()}}
    return cands[chosen][1], cands[chosen][0], choice


def _first_input(example_input) -> tuple:
    """The shape of the (first) example input."""
    from fxrf.trace import _as_shapes
    return tuple(_as_shapes(example_input)[0].shape)


def _lift(model, current, steps: dict, example_input):
    """The user's class back: the pruner's module form (its own plan), then the other steps' changes lifted onto it
    (user_model.lift), the two plans one after the other."""
    from .user_model import Lifted, lift
    pruned = steps.get("prune")
    if pruned is None:
        return lift(model, current, steps, example_input)
    if pruned.plan is None:
        return Lifted(None, None, pruned.form_why)
    rest = {k: v for k, v in steps.items() if k != "prune"}
    if not rest:
        return Lifted(current, pruned.plan, None)
    lifted = lift(pruned.model, current, rest, example_input)
    if lifted.plan is None:
        return lifted
    plan = dict(lifted.plan, changes=pruned.plan["changes"] + lifted.plan["changes"], **{"class": pruned.plan["class"]})
    return Lifted(lifted.model, plan, None)


@dataclass(frozen=True)
class Reverted:
    """A change a step made that goal="speed" took back with the rest: the whole result was not measured faster."""

    change: object
    reason: str

    def describe(self, before=None, after=None) -> str:
        return f"taken back: {self.change.describe(before, after)} ({self.reason})"


MEASURED_MODES = ("eager", "compile")  # both timed by measure=N: what a user runs as is, and compiled


def _mode_name(mode: str) -> str:
    return "compiled" if mode == "compile" else mode


def _measure(model, result, before: Analysis, latency, rounds: int) -> dict:
    """The model, the result and a second instance of the model, timed in alternation for `rounds` rounds, eager
    and compiled (`latency.in_mode`): per mode each one's time, the result's per-round ratio to the model (median)
    and the noise: how far from 1 the two instances of one model are, the smallest ratio this machine resolves
    now. The top-level figures are those of `latency`'s mode (the one deployed: what goal="speed" decides on);
    `slower_modes` the modes where the result is slower than the model beyond the noise."""
    from .latency import input_shape, paired_ratio
    shape = input_shape(before.graph_module, "fxrf.optimize(measure=...)", "pass measure=0")
    # copies in eval mode, as deployed (the result is returned in the model's mode, untouched)
    models = {"model": copy.deepcopy(model).eval(), "result": copy.deepcopy(result).eval(),
              "model (2nd instance)": copy.deepcopy(model).eval()}
    modes = {}
    for mode in MEASURED_MODES:
        times = latency.in_mode(mode).compare(models, shape, rounds, fresh=True)
        ratio = paired_ratio(times, "result", "model")
        noise = abs(paired_ratio(times, "model (2nd instance)", "model") - 1)
        modes[mode] = {"ms": {k: round(1e3 * sorted(v)[len(v) // 2], 4) for k, v in times.items()},
                       "result_vs_model": round(ratio, 4), "noise": round(noise, 4), "slower": ratio > 1 + noise}
    own = modes[latency.mode]
    return {"device": latency.device, "batch": latency.batch, "mode": latency.mode, "rounds": rounds,
            "modes": modes, "ms": own["ms"], "result_vs_model": own["result_vs_model"], "noise": own["noise"],
            "slower": own["slower"], "slower_modes": [m for m, d in modes.items() if d["slower"]], "kept": "result"}


def _split(calibration, fit: int, held: int) -> tuple[list, list]:
    """(fit batches, held-out batches) of input tensors from the first fit + held batches of `calibration`."""
    from fxrf.training.calibrate import input_batches
    for name, v, least in (("calibration_batches", fit, 1), ("holdout_batches", held, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise InputError(f"{name} must be an int >= {least}, got {v!r}")
    xs = input_batches(calibration, fit + held)
    if not xs:
        raise InputError("calibration holds no batch: give an iterable of input tensors or (input, label) batches")
    cut = max(1, len(xs) - held)  # the fit gets at least one batch; held-out ones only from the rest
    return xs[:cut], xs[cut:]


def _preserved(steps: dict) -> bool:
    """Whether every step kept the model's function exactly (inserted identity convs do; a removal or a weight
    transfer into factorized blocks does not)."""
    for name, r in steps.items():
        if name == "stages" and not r.summary.get("function_preserved", True):
            return False
        if name in ("kernels", "prune") and r.changes:
            return False
    return True


def _calibrate(model, example_input, steps: dict, current, data, fold_after: bool):
    """Fit the decomposed blocks (else re-estimate the norms) on the fit batches; report against `model` on the
    held-out ones (on the fit batches when none is held out, and say so)."""
    from fxrf.training.calibrate import fidelity, fit_blocks, recalibrate_bn
    fit, held = data
    judge = held or fit
    transfer = fidelity(model, current, judge)
    out = {"batches": len(fit), "held_out": len(held), "measured_on": "held-out batches" if held else
           "the calibration batches themselves (give more batches than calibration_batches to hold some out)"}
    if "kernels" in steps:
        source = steps["stages"].graph_module if "stages" in steps else \
            steps["prune"].model if "prune" in steps else model  # what decompose was given
        c = fit_blocks(source, steps["kernels"], fit, batches=len(fit))
        current = c.graph_module
        out.update(blocks=c.summary["blocks"], fitted=c.summary["fitted"],
                   block_error_before=c.summary["mean_error_before"], block_error_after=c.summary["mean_error_after"])
        if fold_after:
            from .fold import fold_permutations
            folded = fold_permutations(current, example_input)
            current, out["folds"] = folded.graph_module, folded.summary
    elif list(steps) == ["prune"]:  # the thinned layers refit by least squares, the norms re-estimated
        from .prune import calibrate
        current, fits = calibrate(steps["prune"], current, fit)
        out.update(fits, pruned=True)
    else:
        current = recalibrate_bn(current, fit, batches=len(fit))
        out["norms_only"] = True
    out["transfer"], out["calibrated"] = transfer, fidelity(model, current, judge)
    return current, out
