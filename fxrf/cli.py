"""The `fxrf` command line (docs/cli.md).

    fxrf analyze MODEL --input 1,3,224,224 [--alpha 3] [--json] [--out report.json] [--strict]
                       [--plot fig.png] [--graph out.dot|out.graphml] [--depth N] [--width W] [--model-arg K=V]
    fxrf optimize MODEL --input 1,3,32,32 [--prune AMOUNT|macs=F|params=F [--importance l1|random]]
                        [--stages [--strategy greedy|paper] [--latency-budget R]]
                        [--kernels RECIPE [--objective macs|latency [--verify N]]] [--device cpu|cuda] [--batch N]
                        [--include GLOB] [--exclude GLOB] [--weights CKPT] [--seed N] [--model-arg K=V]
                        (--out opt.pt|opt.safetensors [--out opt.pt2] [--out opt.onnx] | --dry-run)
                        [--emit-source f.py]
                        [--force] [--json]
    fxrf models

MODEL is `torchvision:NAME`, `fxrf:NAME`, `timm:NAME`, `path/to/file.py:factory` or `package.module:factory` (loaded
by fxrf.sources, as are --weights and --calibrate). `--model-arg KEY=VALUE` passes a keyword argument to its factory
(VALUE is read as a Python literal: 100, 0.5, True, None, (1, 2), 'text'; anything else is taken as a string).
Exit status: 0 on success, 2 for bad usage / unknown model / bad --input / a result that cannot be saved as asked
(one line on stderr), 1 when the analysis itself fails. `--out` never replaces a file fxrf did not write (the
model's source, a checkpoint) without --force: sources fxrf writes start with the line `# fxrf-generated`.

This module imports torch only inside the commands: `fxrf --help` and `fxrf --version` do not pay for it.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import re
import sys

from .errors import FxrfError, InputError, UsageError
from .metric import DEFAULT_ALPHA
from .progress import progress, show
from .sources import first_line, load_batches, load_model, load_weights, plain

MODEL_HELP = "torchvision:NAME | fxrf:NAME | timm:NAME | file.py:factory | package.module:factory"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(f"{message} (see `fxrf {self.prog.split()[-1]} --help`)" if " " in self.prog
                         else f"{message} (see `fxrf --help`)")


# ------------------------------------------------------------------------------------------ argument values


def parse_input(text: str) -> tuple:
    """'1,3,224,224' -> (1, 3, 224, 224)."""
    if not re.fullmatch(r"\s*\d+(\s*[,x]\s*\d+)+\s*", text):
        raise UsageError(f"--input must be comma-separated integers such as 1,3,224,224, got {text!r}")
    shape = tuple(int(p) for p in re.split(r"[,x]", text))
    if any(s <= 0 for s in shape):
        raise UsageError(f"--input must be a batched shape of positive sizes such as 1,3,224,224, got {text!r}")
    return shape


def parse_inputs(texts: list) -> tuple:
    """The --input options: one shape, or a tuple of shapes for a model with several inputs (in forward's order)."""
    shapes = tuple(parse_input(t) for t in texts)
    return shapes[0] if len(shapes) == 1 else shapes


def _positive_number(text: str, must: str) -> float:
    """A finite number > 0 from `text`, else an argparse error: "must <must>, got <text>"."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must {must}, got {text!r}")
    return v


def _alpha(text: str) -> float:
    """--alpha: what the library accepts (fxrf.checks.check_number: finite, >= 0)."""
    from .checks import check_number
    try:
        return check_number("alpha", float(text))
    except (ValueError, InputError):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (the paper uses 3), got {text!r}") from None


def _budget(text: str) -> float:
    """--latency-budget: a ratio after/before, a finite number > 0."""
    return _positive_number(text, "be a ratio after/before, a finite number > 0 such as 1.0")


def _positive_int(text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def _rounds(text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text):
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0 (0: no check), got {text!r}")
    return int(text)


def _int(text: str) -> int:
    if not re.fullmatch(r"\s*-?\d+\s*", text):
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}")
    return int(text)


def parse_model_args(items) -> dict:
    """['num_classes=100', 'aux_loss=False', 'norm=batch'] -> {'num_classes': 100, 'aux_loss': False,
    'norm': 'batch'}: each VALUE is a Python literal where it parses as one, else a string.

    >>> parse_model_args(["num_classes=100", "aux_loss=False", "norm=batch", "sizes=(1, 2)", "name='x=y'"])
    {'num_classes': 100, 'aux_loss': False, 'norm': 'batch', 'sizes': (1, 2), 'name': 'x=y'}
    """
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"--model-arg must look like KEY=VALUE such as num_classes=100, got {item!r}")
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key] = value.strip()
    return out


# --------------------------------------------------------------------------------------------------- commands


def _check_outputs(args) -> None:
    """File names the analysis cannot use: refused before any work is done."""
    if getattr(args, "graph", None) and os.path.splitext(args.graph)[1].lower() not in (".dot", ".gv", ".graphml"):
        raise UsageError(f"--graph {args.graph}: use a .dot (Graphviz; `dot -Tsvg` makes an SVG of it) or .graphml "
                         f"file name")
    if getattr(args, "plot", None) and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install matplotlib (or fxrf's `plot` extra)")


def _cmd_analyze(args) -> int:
    _check_outputs(args)
    shape = parse_inputs(args.input)
    model = load_model(args.model, parse_model_args(args.model_arg))
    from .analysis import analyze
    try:
        with progress(f"analysing {args.model}"):
            a = analyze(model, shape, alpha=args.alpha, strict=args.strict)
    except InputError as e:
        raise UsageError(str(e).splitlines()[0]) from e
    a.model = args.model
    doc = a.to_dict()
    for path in (args.out, args.plot, args.graph):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    if args.plot:
        from .plot import plot_analysis
        plot_analysis(a, args.plot)
    if args.graph:
        from .graph import export_graph
        export_graph(a, args.graph)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(doc, fh, indent=1)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        from .report import table
        print(table(a, width=args.width, depth=args.depth))
    for path in (args.out, args.plot, args.graph):
        if path and not args.json:
            print(f"wrote {path}")
    return 0


def _optimize_checks(args):
    """Everything about the arguments that can be refused before building the model."""
    if not args.stages and not args.kernels and args.prune is None:
        raise UsageError("say what to optimize: --stages, --kernels RECIPE, --prune AMOUNT, or several")
    if args.prune is not None:
        _prune_spec(args.prune)
    if args.importance is not None and args.prune is None:
        raise UsageError("--importance ranks the channels --prune removes: use it with --prune")
    if not args.stages and args.latency_budget is not None:
        raise UsageError("--latency-budget limits the stage organizer: use it with --stages")
    if args.kernels:  # the decomposer's own check, before the model is built (the pipeline repeats it: cheap)
        from .passes.decomposer import check_options
        given = {k: v for k, v in (("objective", args.objective), ("verify", args.verify)) if v is not None}
        try:
            check_options(args.kernels, **given)
        except InputError as e:
            raise UsageError(f"--kernels {args.kernels}: {str(e).splitlines()[0]}") from e
    outs = args.out or []
    if not outs and not args.dry_run:
        raise UsageError("say where to write the result: --out optimized.pt (source + state_dict), --out "
                         "optimized.pt2 (torch.export) or --out optimized.onnx, or --dry-run to only see the plan")
    from .passes.export import SAVE_FORMATS, missing_onnx_packages
    from .passes.export.files import ONNX_INSTALL
    for out in outs:
        if os.path.splitext(out)[1].lower() not in SAVE_FORMATS:
            raise UsageError(f"--out {out}: use a .pt (source + state_dict, loads with plain torch.load), "
                             f".safetensors (source + safetensors weights), .pt2 (torch.export program) or .onnx "
                             f"(ONNX model) file name")
    kinds = [_out_kind(o) for o in outs]
    if any(kinds.count(k) > 1 for k in kinds):
        raise UsageError("--out takes at most one .pt (or .safetensors), one .pt2 and one .onnx file")
    missing = missing_onnx_packages() if "onnx" in kinds else []
    if missing:
        raise UsageError(f"--out {outs[kinds.index('onnx')]} needs {', '.join(missing)}: {ONNX_INSTALL}")
    if args.finetune and not (args.train or args.calibrate):
        raise UsageError("--finetune needs data to train on: --train DATA (or --calibrate DATA, used when --train is "
                         "not given)")
    if args.train and not args.finetune:
        raise UsageError("--train DATA is the fine-tuning data: give --finetune EPOCHS with it")
    if args.emit_source and not args.emit_source.endswith(".py"):
        raise UsageError(f"--emit-source {args.emit_source}: use a .py file name")
    _check_writable(args)


def _check_writable(args) -> None:
    """--out / --emit-source: refused before any work when they would replace a file fxrf did not write (the
    model's own source, a checkpoint), unless --force."""
    from .errors import SaveError
    from .passes.export import refuse_overwrite
    if args.dry_run:
        return
    try:
        for out in args.out or []:
            program = _out_kind(out) != "pt"
            source = _source_for(args, out) or (None if program else os.path.splitext(out)[0] + ".py")
            refuse_overwrite([p for p in (source, out) if p], overwrite=args.force, companion=source)
    except SaveError as e:
        raise UsageError(first_line(e)) from e


_OUT_KINDS = ("pt", "pt2", "onnx")  # --out's kinds, at most one file each, saved in this order


def _out_kind(out: str) -> str:
    """pt (source + state_dict: .pt, .pth, .safetensors), pt2 (torch.export program) or onnx."""
    ext = os.path.splitext(out)[1].lower()
    return {".pt2": "pt2", ".onnx": "onnx"}.get(ext, "pt")


def _source_for(args, out: str):
    """The --emit-source file that goes with `out`: with the .pt, else with the .pt2, else with the .onnx (the first
    kind of _OUT_KINDS that is written)."""
    if not args.emit_source:
        return None
    first = min((_OUT_KINDS.index(_out_kind(o)) for o in args.out), default=None)
    return args.emit_source if _OUT_KINDS.index(_out_kind(out)) == first else None


def _cmd_optimize(args) -> int:
    _optimize_checks(args)
    shape = parse_inputs(args.input)
    import torch
    torch.manual_seed(args.seed)  # the model's random init and anything a pass draws: the same every run
    model = load_model(args.model, parse_model_args(args.model_arg))
    if args.weights:
        load_weights(model, args.weights)
    from .optimize_report import before_after, optimize_summary
    from .passes.pipeline import optimize
    stages = None
    if args.stages:
        stages = {k: v for k, v in (("threshold", args.threshold), ("macs_budget", args.macs_budget),
                                    ("remove_below", args.remove_below),
                                    ("latency_budget", args.latency_budget)) if v is not None}
        stages.update(strategy=args.strategy, remove_saturated=not args.keep_saturated)
    kernels = None
    if args.kernels:
        kernels = {"recipe": args.kernels}  # the decomposer's defaults for what is not given
        kernels.update({k: v for k, v in (("objective", args.objective), ("verify", args.verify)) if v is not None})
    prune = None
    if args.prune is not None:
        prune = _prune_spec(args.prune)
        if args.importance is not None:
            prune["importance"] = args.importance
    # (a .npz's 'y' labels are read where these batches are also the fine-tuning data; calibration ignores them)
    calibration = load_batches(args.calibrate, "--calibrate", labels=bool(args.finetune and not args.train)) \
        if args.calibrate else None
    finetune = None
    if args.finetune:
        finetune = {"epochs": args.finetune, "seed": args.seed,
                    "data": load_batches(args.train, "--train", labels=True) if args.train else calibration}
    try:
        result = optimize(model, shape, stages=stages, kernels=kernels, prune=prune, alpha=args.alpha,
                          include=args.include,
                          exclude=args.exclude, device=args.device, batch=args.batch, calibration=calibration,
                          latency=_latency(args),
                          finetune=finetune,
                          goal=_goal(args), **({} if args.measure is None else {"measure": args.measure}),
                          progress=lambda what: progress(f"{what} of {args.model}"))
    except InputError as e:
        raise UsageError(str(e).splitlines()[0]) from e
    current, before, after = result.graph_module, result.before, result.after
    written, notes, groups = [], [], []
    form = _form(args, result)
    if not args.dry_run:
        from .passes.export import load_hint, save
        from .passes.export.hints import module_hint
        from .passes.export.module_form import save_module
        name = _class_name(model)
        try:
            with progress("saving"):
                for out in sorted(args.out, key=lambda o: _OUT_KINDS.index(_out_kind(o))):
                    if form == "module" and _out_kind(out) == "pt":  # the user's class: weights + structure plan
                        saved = save_module(result.model, model, result.plan, out, example_input=shape,
                                            overwrite=args.force)
                        written += saved
                        groups.append((saved, module_hint(saved, _build_expr(args), "fxrf.sources")))
                        continue
                    saved = save(result.model if form == "module" else current, out,
                                 source=_source_for(args, out), class_name=name, example_input=shape,
                                 overwrite=args.force)
                    written += saved
                    notes += saved.notes
                    # a source alone (beside a .pt2 or .onnx) has no state_dict to load: no hint of its own
                    group = [p for p in saved if _out_kind(out) == "pt" or p == out]
                    groups.append((group, load_hint(group, name)))
        except FxrfError as e:  # a file fxrf did not write, or what was written does not reload to the same outputs
            raise UsageError(f"cannot save the result: {first_line(e)}") from e
    if args.json:
        doc = result.to_dict()
        doc["before_after"] = before_after(before, after, result.summary["latency"])
        doc["calibration"] = result.summary["calibration"]
        doc["finetune"] = result.summary["finetune"]
        doc["goal"], doc["latency"] = result.summary["goal"], result.summary["latency"]
        doc["written"] = written
        doc["form"] = {"written": None if args.dry_run else form, **result.summary["form"]}
        doc["notes"] = notes
        print(json.dumps(doc, indent=1, default=str))
    else:
        print(optimize_summary(result, dry_run=args.dry_run))
        if result.summary["finetune"]:
            print(_finetune_line(result.summary["finetune"]))
    if written:
        print(f"wrote {', '.join(written)}")
        for note in notes:  # a batch fixed at the example's, and why
            print(note)
        print(_form_line(form, result, model))
        for _, hint in groups:
            print(f"load it with: {hint}")
    elif args.dry_run:  # with --json, stdout holds the JSON document alone
        if not args.json:
            print("would be " + _form_line(form, result, model))
        print("dry run: nothing written", file=sys.stderr if args.json else sys.stdout)
    return 0


def _form(args, result) -> str:
    """--form: "module" (the model's own class, weights + structure plan) where every change is local to a module,
    else "graph" (the GraphModule's source + weights); --emit-source asks for the graph form."""
    if args.form == "module" and result.form != "module":
        raise UsageError(f"--form module: the result cannot be the model's own class: {result.form_why}; use "
                         f"--form graph (or auto)")
    if args.form == "graph" or args.emit_source:
        return "graph"
    return result.form


def _form_line(form: str, result, model) -> str:
    cls = type(model).__name__
    if form == "module":
        return (f"written as {cls} itself (its own class, methods and outputs; the weights and a structure plan "
                f"that fxrf.apply makes again on a freshly built {cls}): every change is local to a module")
    why = "asked for (--form graph / --emit-source)" if result.form == "module" else result.form_why
    return f"written as a GraphModule (emitted source + weights), not as {cls}: {why}"


def _latency(args):
    """--mode eager: a LatencyModel that times eager (the pipeline makes a compiled one when none is given)."""
    if args.mode == "compile":
        return None
    from .passes.latency import LatencyModel
    try:
        return LatencyModel(args.device, args.batch, mode="eager")
    except InputError as e:
        raise UsageError(first_line(e)) from e


def _build_expr(args) -> str:
    """The Python that builds MODEL again, as the command line named it."""
    kwargs = parse_model_args(args.model_arg)
    return f"fxrf.sources.load_model({args.model!r}" + (f", {kwargs!r})" if kwargs else ")")


def _finetune_line(t: dict) -> str:
    """--finetune's figures on the held-out data: before, after (the state kept) and which epoch that is."""
    if t["metric"] is None:
        return f"fine-tuned {t['epochs']} epoch(s), last epoch kept: nothing validated ({t['validated_on']})"
    what = "accuracy" if t["metric"] == "accuracy" else "top-1 agreement with MODEL"
    kept = "the starting state: no epoch measured better" if t["kept_epoch"] == 0 else \
        f"epoch {t['kept_epoch']} of {t['epochs']}"
    return (f"fine-tuned {t['epochs']} epoch(s): validation {what} {t['before'] * 100:.2f}% -> {t['after'] * 100:.2f}% "
            f"(kept {kept}; measured on {t['validated_on']})")


def _goal(args) -> str:
    """--goal, else speed for --kernels alone (a user who asks only for kernels wants a faster model: it is
    measured, and kept only if faster) unless --measure 0 turns timing off; paper with --stages (the 3DRF-driven
    layout as asked)."""
    if args.goal is not None:
        return args.goal
    return "speed" if (args.kernels or args.prune is not None) and not args.stages and args.measure != 0 else "paper"


def _prune_spec(text: str) -> dict:
    """--prune 0.3 (the fraction of each layer's channels to remove), macs=0.5 or params=0.5 (the fraction of the
    model's to keep)."""
    key, _, value = text.rpartition("=")
    key = key.strip() or "amount"
    try:
        v = float(value)
    except ValueError:
        v = None
    if key not in ("amount", "macs", "params") or v is None or not (0 <= v < 1 if key == "amount" else 0 < v < 1):
        raise UsageError(f"--prune {text}: give the fraction of channels to remove (0.3), or macs=F / params=F, the "
                         f"fraction of the model's MACs / parameters to keep (0 < F < 1)")
    return {key: v}


def _class_name(model) -> str:
    name = re.sub(r"\W", "_", type(model).__name__)
    return name if name.isidentifier() and name != "GraphModule" else "Optimized"


def _cmd_models(args) -> int:
    from .models import MODELS
    for name in sorted(MODELS):
        doc = (MODELS[name].__doc__ or "").strip().splitlines()
        print(f"fxrf:{name:<22} {doc[0] if doc else ''}")
    return 0


# ----------------------------------------------------------------------------------------------------- parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    # the package is imported already (this module is in it): read its version without importing the root
    __version__ = getattr(sys.modules.get(__package__), "__version__", "unknown")

    def v(dist):
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"
    return f"fxrf {__version__} (torch {v('torch')}, torchvision {v('torchvision')}, Python {sys.version.split()[0]})"


def _model_options(p) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="a keyword argument for the model's constructor, repeatable, e.g. --model-arg num_classes=100;"
                        " VALUE is read as a Python literal (100, 0.5, True, None, (1, 2)), else as a string")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fxrf", description="3D receptive field analysis and CNN rewrites on torch.fx",
                epilog="MODEL: " + MODEL_HELP + ". docs/cli.md has every option and docs/workflow.md a whole run.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    an = sub.add_parser("analyze", help="annotate every node with its 3DRF and print a table or JSON")
    _model_options(an)
    an.add_argument("--input", required=True, action="append",
                    help="example input shape, e.g. 1,3,224,224; once per input of a model with several")
    an.add_argument("--alpha", type=_alpha, default=DEFAULT_ALPHA,
                    help=f"the gain's alpha, >= 0 (default {DEFAULT_ALPHA:g}, the paper's)")
    an.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    an.add_argument("--out", help="also write the JSON document to this file")
    an.add_argument("--strict", action="store_true", help="fail on ops without an exact rule")
    an.add_argument("--plot", help="draw the spatial/channel 3DRF and gains per stage to this image (matplotlib)")
    an.add_argument("--graph", help="export the annotated graph (.dot or .graphml, via networkx)")
    an.add_argument("--depth", type=_positive_int, metavar="N",
                    help="group the table's rows by the first N parts of their module path (torchinfo's depth)")
    an.add_argument("--width", type=_positive_int, metavar="COLUMNS",
                    help="the table's width (default: the terminal's, 80 when not a terminal)")
    an.set_defaults(run=_cmd_analyze)
    op = sub.add_parser("optimize", help="rewrite the model: stage-level organizer and/or kernel decomposer")
    _model_options(op)
    op.add_argument("--input", required=True, action="append",
                    help="example input shape, e.g. 1,3,32,32; once per input of a model with several")
    op.add_argument("--stages", action="store_true", help="run the stage-level organizer")
    op.add_argument("--strategy", default="greedy",
                    help="greedy (default): insert while the gain exceeds --threshold, remove convs at or below it; "
                         "paper: keep the number of convs, move them to where the gain is highest (the paper's "
                         "Tables 3-5, uncapped spatial field; see docs/organizer.md)")
    op.add_argument("--alpha", type=_alpha, default=DEFAULT_ALPHA, help=f"the gain's alpha, >= 0 (default {DEFAULT_ALPHA:g})")
    op.add_argument("--threshold", type=float, help="greedy: insert a conv where its gain exceeds this (default 0.3)")
    op.add_argument("--remove-below", type=float, help="greedy: remove convs whose gain is at most this "
                                                       "(default: the threshold; 0 removes only saturated convs)")
    op.add_argument("--macs-budget", type=float, help="max MACs ratio after/before (default 1.25)")
    op.add_argument("--latency-budget", type=_budget, metavar="RATIO",
                    help="--stages: max predicted latency ratio after/before on --device at --batch (the model and "
                         "each conv timed compiled once, cached in ~/.cache/fxrf; default: no limit)")
    op.add_argument("--keep-saturated", action="store_true", help="greedy: do not remove convs whose gain is 0")
    op.add_argument("--kernels", metavar="RECIPE", help="run the kernel decomposer: auto, DW+PW, DW+GPW-g4, ...")
    op.add_argument("--objective",
                    help="macs or latency: --kernels auto picks the fewest MACs (the default) or the least measured latency on --device "
                         "at --batch (each block timed compiled once, cached in ~/.cache/fxrf)")
    op.add_argument("--verify", type=_rounds, metavar="N",
                    help="--objective latency: rounds of whole-model timing (compiled, in alternation) that check "
                         "the choice against the MACs objective's and the unchanged model; the fastest is kept "
                         "(default: decompose's, 5; 0: no check)")
    op.add_argument("--device", default="cpu", help="--objective latency / --latency-budget: where to time, cpu or "
                                                    "cuda (default cpu)")
    op.add_argument("--prune", metavar="AMOUNT",
                    help="structural channel pruning (fxrf.prune), run first: 0.3 removes 30%% of each layer's "
                         "channels with everything coupled to them; macs=0.5 / params=0.5 keeps that fraction of "
                         "the model's MACs / parameters. With --calibrate, the thinned layers are refit by least "
                         "squares")
    op.add_argument("--importance", choices=("l1", "random"),
                    help="--prune: which channels go first: l1 (the smallest mean |weight|, the default) or random")
    op.add_argument("--goal", metavar="paper|speed",
                    help="speed (the default with --kernels alone): the steps priced in latency measured on "
                         "--device at --batch and the result kept only if the whole model is measured faster than "
                         "MODEL, by more than the noise, in --mode (else MODEL comes back unchanged); paper (the default with --stages, or "
                         "with --measure 0): the 3DRF-driven layout asked for, which may cost time")
    op.add_argument("--measure", type=_rounds, metavar="N",
                    help="time MODEL and the result, eager and compiled, each in alternation for N rounds (with a "
                         "second instance of MODEL as the resolution) and print both beside params and MACs; a "
                         "result slower than MODEL beyond that resolution is flagged on a line of its own "
                         "(--goal speed: 5 unless given; --goal paper: 0, nothing timed, unless given)")
    op.add_argument("--batch", type=_positive_int, default=1, help="--objective latency / --latency-budget: the "
                                                                   "batch size to time at (default 1)")
    op.add_argument("--mode", choices=("compile", "eager"), default="compile",
                    help="how the model is deployed, so how it is timed: compile (torch.compile, default) or eager; "
                         "--goal speed keeps the result only if it is faster in this mode")
    op.add_argument("--include", action="append", metavar="GLOB",
                    help="only convs whose module path matches this glob may change (repeatable; `layer4` covers "
                         "everything under it; a stage gets a new conv only if all its convs are included)")
    op.add_argument("--exclude", action="append", metavar="GLOB",
                    help="convs whose module path matches this glob stay as they are (repeatable)")
    op.add_argument("--calibrate", metavar="DATA",
                    help="inputs from the model's data to calibrate the result on before it is written (least-squares "
                         "fit of each decomposed block, norms re-estimated; 8 batches fit, 2 more held out to report "
                         "how close it computes to the model): a .pt tensor of inputs (N, ...), a .npz (its 'x' array or "
                         "its only one), or file.py:fn / package.module:fn returning an iterable of batches")
    op.add_argument("--finetune", type=_positive_int, metavar="EPOCHS",
                    help="after calibration, fine-tune the result against MODEL (knowledge distillation, "
                         "fxrf.distill) for EPOCHS epochs on --train DATA (default: the --calibrate data; labels "
                         "used where it has them: a .npz's 'y', (input, label) batches), keeping the epoch that "
                         "measured best on 10%% of it held out, the starting state included")
    op.add_argument("--train", metavar="DATA", help="--finetune's data, in --calibrate's forms (a .npz may add "
                                                    "'y': integer labels)")
    op.add_argument("--weights", metavar="CKPT", help="a state_dict of MODEL to load before the passes (.safetensors, "
                                                       "or torch.load with weights_only=True)")
    op.add_argument("--seed", type=_int, default=0, help="seed for the model's random init (default 0)")
    op.add_argument("--out", action="append", metavar="PATH",
                    help="where to write the result: X.pt writes X.py (the class) and X.pt (its state_dict); "
                         "X.safetensors the same with safetensors weights; X.pt2 a torch.export program and X.onnx "
                         "an ONNX model (pip install 'fxrf[onnx]'), both with a dynamic batch where the model allows; "
                         "repeat it for several (at most one of each kind). Each is reloaded and checked against the "
                         "result (onnxruntime for .onnx) before it is put in place")
    op.add_argument("--form", choices=("auto", "module", "graph"), default="auto",
                    help="what --out X.pt/.safetensors holds: module = MODEL's own class (the weights + X.plan.json, "
                         "a structure plan fxrf.apply makes again on a fresh MODEL), graph = the GraphModule's source "
                         "X.py + weights; auto (default): module where every change is local to a module")
    op.add_argument("--emit-source", metavar="FILE.py",
                    help="where the class goes (default: next to the .pt; with only a .pt2 or .onnx, none)")
    op.add_argument("--force", action="store_true", help="let --out / --emit-source replace files fxrf did not "
                                                          "write (without it they are refused)")
    op.add_argument("--dry-run", action="store_true", help="print the planned changes, write nothing")
    op.add_argument("--json", action="store_true", help="print what changed as JSON")
    op.set_defaults(run=_cmd_optimize)
    mo = sub.add_parser("models", help="list the paper's models bundled as fxrf:NAME")
    mo.set_defaults(run=_cmd_models)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "run", None):
            raise UsageError("a command is required: analyze, optimize or models (see `fxrf --help`)")
        with show():  # progress bars / lines on stderr for the long steps (fxrf.progress; FXRF_PROGRESS=0: none)
            return args.run(args)
    except UsageError as e:
        print(f"fxrf: error: {plain(str(e))}", file=sys.stderr)
        return 2
    except FxrfError as e:
        print(f"fxrf: {type(e).__name__}: {first_line(e) if str(e).strip() else ''}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `fxrf analyze ... | head`
        return 0
    except KeyboardInterrupt:
        print("fxrf: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in fxrf or in the model: one line; FXRF_TRACEBACK=1 shows where
        if os.environ.get("FXRF_TRACEBACK"):
            raise
        first = first_line(e) if str(e).strip() else ""
        print(f"fxrf: internal error: {type(e).__name__}: {first} (FXRF_TRACEBACK=1 shows the traceback; please "
              f"report it)", file=sys.stderr)
        return 1
