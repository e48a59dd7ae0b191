"""The `fxrf` command line.

    fxrf analyze MODEL --input 1,3,224,224 [--alpha 3] [--json] [--out report.json] [--strict]
                       [--plot fig.png] [--graph out.dot|out.graphml]
    fxrf optimize MODEL --input 1,3,32,32 [--stages [--strategy greedy|paper]] [--kernels RECIPE]
                        --out optimized.pt [--emit-source f.py]
    fxrf models

MODEL is `torchvision:NAME` (random weights, no download), `fxrf:NAME` (the paper's models, see `fxrf models`),
`path/to/file.py:factory`, or `package.module:factory`; a factory is any callable returning an nn.Module.
Exit status: 0 on success, 2 for bad usage / unknown model / bad --input (one line on stderr), 1 when the
analysis itself fails.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import sys
from typing import Callable

import torch.nn as nn

from .errors import FxrfError, InputError


class UsageError(Exception):
    """Bad command-line usage: exit 2 with one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(f"{message} (see `fxrf {self.prog.split()[-1]} --help`)" if " " in self.prog
                         else f"{message} (see `fxrf --help`)")


def parse_input(text: str) -> tuple:
    """'1,3,224,224' -> (1, 3, 224, 224)."""
    if not re.fullmatch(r"\s*\d+(\s*[,x]\s*\d+)+\s*", text):
        raise UsageError(f"--input must be comma-separated integers such as 1,3,224,224, got {text!r}")
    shape = tuple(int(p) for p in re.split(r"[,x]", text))
    if any(s <= 0 for s in shape):
        raise UsageError(f"--input must be a batched shape of positive sizes such as 1,3,224,224, got {text!r}")
    return shape


def load_model(spec: str) -> nn.Module:
    """Build the model a MODEL argument names (see the module docstring)."""
    factory = _factory(spec)
    try:
        model = factory()
    except Exception as e:
        raise UsageError(f"building {spec!r} failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def _factory(spec: str) -> Callable[[], nn.Module]:
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise UsageError(f"MODEL must look like torchvision:resnet50, fxrf:vgg16_cifar, path/to/file.py:factory or "
                         f"package.module:factory, got {spec!r}")
    if source == "torchvision":
        import torchvision.models as tvm
        names = set(tvm.list_models(module=tvm))
        if name not in names:
            close = sorted(n for n in names if n.startswith(name[:4]))[:5]
            raise UsageError(f"unknown torchvision model {name!r}" + (f" (did you mean {', '.join(close)}?)"
                                                                       if close else "; see torchvision.models.list_models()"))
        return lambda: tvm.get_model(name, weights=None)
    if source == "fxrf":
        from .models import MODELS
        if name not in MODELS:
            raise UsageError(f"unknown fxrf model {name!r}; `fxrf models` lists them")
        return MODELS[name]
    if source.endswith(".py"):
        if not os.path.exists(source):
            raise UsageError(f"no such file: {source}")
        mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(source))[0], source)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            raise UsageError(f"importing {source} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as e:
            raise UsageError(f"cannot import module {source!r}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"{source} has no callable {name!r}")
    return fn


def _cmd_analyze(args) -> int:
    from .analysis import analyze
    shape = parse_input(args.input)
    model = load_model(args.model)
    try:
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
    print(json.dumps(doc, indent=1) if args.json else a.table())
    for path in (args.out, args.plot, args.graph):
        if path and not args.json:
            print(f"wrote {path}")
    return 0


def _cmd_optimize(args) -> int:
    import torch
    shape = parse_input(args.input)
    model = load_model(args.model)
    if not args.stages and not args.kernels:
        raise UsageError("say what to optimize: --stages, --kernels RECIPE, or both")
    current, report = model, {}
    try:
        if args.stages:
            from .passes.organizer import organize_stages
            greedy_only = [f for f, v in (("--threshold", args.threshold), ("--remove-below", args.remove_below),
                                          ("--keep-saturated", args.keep_saturated or None)) if v is not None]
            if args.strategy == "paper" and greedy_only:
                raise UsageError(f"{', '.join(greedy_only)} only work{'' if len(greedy_only) > 1 else 's'} with "
                                 f"--strategy greedy (the paper strategy keeps the number of convs and compares gains "
                                 f"with each other)")
            given = {k: v for k, v in (("threshold", args.threshold), ("macs_budget", args.macs_budget),
                                       ("remove_below", args.remove_below)) if v is not None}
            r = organize_stages(current, shape, strategy=args.strategy, alpha=args.alpha,
                                remove_saturated=not args.keep_saturated, **given)
            current, report["stages"] = r.graph_module, r.to_dict()
        if args.kernels:
            from .passes.decomposer import decompose
            r = decompose(current, shape, recipe=args.kernels)
            current, report["kernels"] = r.graph_module, r.to_dict()
    except InputError as e:
        raise UsageError(str(e).splitlines()[0]) from e
    torch.save(current, args.out)
    if args.emit_source:
        from .passes.export import emit_source
        emit_source(current, args.emit_source)
    print(json.dumps(report, indent=1, default=str) if args.json else _optimize_summary(report))
    print(f"wrote {args.out}" + (f" and {args.emit_source}" if args.emit_source else ""))
    return 0


def _change_line(c) -> str:
    if isinstance(c, dict) and "recipe" in c and "conv" in c:  # the decomposer's
        return (f"{c['conv']} -> {c['recipe']} (stage {c.get('stage')}): 3DRF {c.get('rf_conv')} -> "
                f"{c.get('rf_block')}")
    if not isinstance(c, dict) or "kind" not in c:
        return str(c)
    where = ", ".join(f"{k} {c[k]:.4g}" if isinstance(c[k], float) else f"{k} {c[k]}"
                      for k in ("stage", "gain") if c.get(k) is not None)
    what = c.get("node") or c.get("block") or ""
    return f"{c['kind']} {what} ({where})" + (f": {c['reason']}" if c.get("reason") else "")


def _optimize_summary(report: dict) -> str:
    lines = []
    for name, r in report.items():
        s = r.get("summary", {})
        lines.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in s.items() if not isinstance(v, (dict, list))))
        for c in r.get("changes", []):
            lines.append("  " + _change_line(c))
    return "\n".join(lines)


def _cmd_models(args) -> int:
    from .models import MODELS
    for name in sorted(MODELS):
        doc = (MODELS[name].__doc__ or "").strip().splitlines()
        print(f"fxrf:{name:<22} {doc[0] if doc else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fxrf", description="3D receptive field analysis and CNN rewrites on torch.fx")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    an = sub.add_parser("analyze", help="annotate every node with its 3DRF and print a table or JSON")
    an.add_argument("model", help="torchvision:NAME | fxrf:NAME | file.py:factory | package.module:factory")
    an.add_argument("--input", required=True, help="example input shape, e.g. 1,3,224,224")
    an.add_argument("--alpha", type=float, default=3.0, help="the gain's alpha (default 3, the paper's Table 2)")
    an.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    an.add_argument("--out", help="also write the JSON document to this file")
    an.add_argument("--strict", action="store_true", help="fail on ops without an exact rule")
    an.add_argument("--plot", help="draw the spatial/channel 3DRF and gains per stage to this image (matplotlib)")
    an.add_argument("--graph", help="export the annotated graph (.dot or .graphml, via networkx)")
    an.set_defaults(run=_cmd_analyze)
    op = sub.add_parser("optimize", help="rewrite the model: stage-level organizer and/or kernel decomposer")
    op.add_argument("model", help="torchvision:NAME | fxrf:NAME | file.py:factory | package.module:factory")
    op.add_argument("--input", required=True, help="example input shape, e.g. 1,3,32,32")
    op.add_argument("--stages", action="store_true", help="run the stage-level organizer")
    op.add_argument("--strategy", choices=("greedy", "paper"), default="greedy",
                    help="greedy (default): insert while the gain exceeds --threshold, remove convs at or below it; "
                         "paper: keep the number of convs, move them to where the gain is highest (the paper's "
                         "Tables 3-5, uncapped spatial field; see docs/organizer.md)")
    op.add_argument("--alpha", type=float, default=3.0)
    op.add_argument("--threshold", type=float, help="greedy: insert a conv where its gain exceeds this (default 0.3)")
    op.add_argument("--remove-below", type=float, help="greedy: remove convs whose gain is at most this "
                                                       "(default: the threshold; 0 removes only saturated convs)")
    op.add_argument("--macs-budget", type=float, help="max MACs ratio after/before (default 1.25)")
    op.add_argument("--keep-saturated", action="store_true", help="greedy: do not remove convs whose gain is 0")
    op.add_argument("--kernels", metavar="RECIPE", help="run the kernel decomposer: auto, DW+PW, DW+GPW-g4, ...")
    op.add_argument("--out", required=True, help="where to torch.save the optimized GraphModule")
    op.add_argument("--emit-source", help="also write readable PyTorch code of the new architecture")
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
            raise UsageError("a command is required: analyze or models (see `fxrf --help`)")
        return args.run(args)
    except UsageError as e:
        print(f"fxrf: error: {e}", file=sys.stderr)
        return 2
    except FxrfError as e:
        print(f"fxrf: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `fxrf analyze ... | head`
        return 0
