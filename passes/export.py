"""Write a GraphModule as plain, readable PyTorch source: one nn.Module class, submodules declared in __init__,
the graph's code as forward.

    >>> import importlib.util, os, tempfile, torch, torch.nn as nn, fxrf
    >>> gm = fxrf.trace(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), (1, 3, 8, 8))
    >>> path = os.path.join(tempfile.mkdtemp(), "net.py")
    >>> src = emit_source(gm, path, class_name="Net")
    >>> print(src.split("class Net")[1].split("def forward")[0].strip())
    (nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("0", nn.Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)))
            self.add_module("1", nn.ReLU())
    >>> spec = importlib.util.spec_from_file_location("net", path)
    >>> mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    >>> net = mod.Net(); net.load_state_dict(gm.state_dict())
    <All keys matched successfully>
    >>> x = torch.rand(1, 3, 8, 8); torch.equal(net(x), gm(x))
    True

emit_source writes the architecture: load the weights with `model.load_state_dict(graph_module.state_dict())`.
Tensors outside the state dict (non-persistent buffers, constants fx makes from tensors created in forward) are
written as literals when small; larger ones are declared as persistent buffers, so that `save` puts their values
in the weights file. A submodule that cannot be rebuilt from its constructor arguments raises a SaveError naming
it. An exported graph's output structure (a ModelOutput, a dict) is rebuilt by name in the forward.

`save` writes what a fresh process loads with plain torch (what `fxrf optimize --out` writes): for a `.pt` path
the source next to it (`net.py`) plus the class's state_dict (`net.pt`, plain tensors); for `.safetensors` the
same with the weights as safetensors; for a `.pt2` path a `torch.export` program. It reloads what it wrote and
compares outputs before putting the files in place (a SaveError otherwise), and never replaces a file fxrf did not
write (every source it writes starts with the line MARKER) unless overwrite=True. `load_hint` is the one line of
Python that loads them back:

    >>> d = tempfile.mkdtemp()
    >>> save(gm, os.path.join(d, "net.pt"), class_name="Net") == [os.path.join(d, "net.py"), os.path.join(d, "net.pt")]
    True
    >>> import sys; sys.path.insert(0, d)
    >>> from net import Net
    >>> m = Net(); m.load_state_dict(torch.load(os.path.join(d, "net.pt"), weights_only=True))
    <All keys matched successfully>
    >>> torch.equal(m(x), gm(x))
    True
    >>> sys.path.remove(d)
"""
from __future__ import annotations

import collections
import copy
import importlib
import importlib.util
import inspect
import itertools
import json
import keyword
import math
import os
import re
import shutil
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from fxrf.errors import SaveError

from .util import fetch_attr

__all__ = ["emit_source", "save", "load_hint", "load_weights_file", "fxrf_wrote", "refuse_overwrite", "SAVE_FORMATS",
           "MARKER"]

# state_dict + source (torch.save, torch.save, safetensors); a torch.export program
SAVE_FORMATS = (".pt", ".pth", ".safetensors", ".pt2")
MARKER = "# fxrf-generated"  # the first line of every source fxrf writes: fxrf may overwrite such a file
MARKER_KEY = "fxrf"  # the same mark in a .safetensors file's metadata and a .pt2 archive's extra files
_counter = itertools.count()

_MAX_LITERAL = 4096  # constant tensors up to this many elements are written inline


def emit_source(gm: fx.GraphModule, path, *, class_name: str | None = None, overwrite: bool = False) -> str:
    """Write `gm` as an importable Python module defining one nn.Module class; return the source.

    Refuses (SaveError) to replace a file fxrf did not write (see `fxrf_wrote`) unless overwrite=True."""
    refuse_overwrite([str(path)], overwrite=overwrite)
    src, _ = _source(gm, class_name)
    Path(path).write_text(src)
    return src


def _source(gm: fx.GraphModule, class_name: str | None, weights: str | None = None) -> tuple:
    """(the module's source, the names of the tensors its class declares persistent although `gm` does not keep
    them in its state dict: non-persistent buffers and constants too large to write inline, whose values must
    travel in the weights file)."""
    name = _identifier(class_name or type(gm).__name__)
    graph = gm.graph
    if type(graph._codegen) is not fx.graph.CodeGen:  # an exported graph's pytree code (restoring a ModelOutput)
        graph = _flat_graph(graph)  # reads self._in_spec / self._out_spec, which the emitted class lacks
    code = graph.python_code(root_module="self")
    needs: set = set()  # modules the constructors need (classes outside torch.nn)
    promoted: list = []
    init = _init_lines(gm, needs, promoted)
    used = {k: v for k, v in code.globals.items() if re.search(rf"\b{re.escape(k)}\b", code.src)}
    imports, preamble = _imports(used, needs, code.src)
    top, forward = _split(code.src)
    lines = [
        f"{MARKER}: written by fxrf.passes.export; fxrf may overwrite this file"
        + (f" (weights: {weights})" if weights else ""),
        f'"""{name}: written by fxrf.passes.export from a torch.fx GraphModule.',
        "",
        ("The architecture only; load the weights with model.load_state_dict(graph_module.state_dict())."
         if weights is None else f"The architecture; its weights are in {weights}."),
        '"""',
        *imports,
        "",
        *preamble,
        *top,
        "",
        "",
        f"class {name}(nn.Module):",
        "    def __init__(self):",
        "        super().__init__()",
        *("        " + line for line in init),
        "",
        *("    " + line if line.strip() else "" for line in forward),
        "",
    ]
    src = "\n".join(lines)
    compile(src, f"<{name}>", "exec")  # fail here rather than at import time
    return src, promoted


def _flat_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of a pytree-coded graph (torch.export's) with plain code: tensors in as placeholders, and the output
    rebuilt in the graph itself from its out_spec (a ModelOutput, dict, namedtuple ... constructed by name), so the
    emitted class returns what the GraphModule returns."""
    spec = graph._codegen.pytree_info.out_spec
    graph = copy.deepcopy(graph)
    graph.set_codegen(fx.graph.CodeGen())
    if spec is None:
        return graph
    out = next(n for n in graph.nodes if n.op == "output")
    leaves = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    with graph.inserting_before(out):
        out.args = (_rebuild(spec, iter(leaves), graph),)
    return graph


def _children(spec) -> list:
    return list(spec.children()) if hasattr(spec, "children") and callable(spec.children) else spec.children_specs


def _rebuild(spec, leaves, graph: fx.Graph):
    """The fx argument (nested tuples/lists/dicts and constructor calls) that builds `spec`'s structure."""
    if spec.is_leaf():
        return next(leaves)
    kids = [_rebuild(c, leaves, graph) for c in _children(spec)]
    t, ctx = spec.type, spec.context
    if t in (tuple, list):
        return t(kids)
    if t is dict:
        return dict(zip(ctx, kids))
    if t is collections.OrderedDict:
        return graph.call_function(collections.OrderedDict, (tuple(zip(ctx, kids)),))
    if isinstance(t, type) and issubclass(t, tuple) and hasattr(t, "_fields"):  # a namedtuple
        return graph.call_function(t, tuple(kids))
    if isinstance(t, type) and issubclass(t, dict) and all(isinstance(k, str) and k.isidentifier() for k in ctx):
        return graph.call_function(t, (), dict(zip(ctx, kids)))  # a ModelOutput: Cls(logits=...)
    raise SaveError(f"cannot write the output type {t.__module__}.{t.__qualname__} as source: save a .pt2 "
                    f"(torch.export program) instead")


# -- save: write, reload, compare --------------------------------------------------------------------------------


def save(gm: fx.GraphModule, path, *, source=None, class_name: str | None = None, example_input=None,
         overwrite: bool = False) -> list:
    """Write `gm` so that a fresh process loads it back with plain torch; return the paths written.

    path ending in .pt or .pth: the source (`emit_source`, to `source` or next to `path` with the .py suffix) and
    the class's state_dict with torch.save (tensors only: `torch.load(path, weights_only=True)` reads it).
    path ending in .safetensors: the source and the state_dict as safetensors (needs `pip install safetensors`).
    path ending in .pt2: a `torch.export` program of `gm` in eval mode, written with torch.export.save; `source`,
    if given, is written as well.

    Before anything is written in place, what was written is reloaded from disk (the source imported, the
    weights read with weights_only=True and loaded strictly, or the program loaded) and its outputs on
    `example_input` (a tensor, a shape, or None for the shape `gm` was traced with) compared with `gm`'s, both in
    eval mode: a difference raises SaveError and leaves the destination untouched. Existing files that fxrf did not
    write (`fxrf_wrote`) are never replaced unless overwrite=True.
    """
    path = str(path)
    ext = Path(path).suffix.lower()
    if ext not in SAVE_FORMATS:
        raise SaveError(f"cannot save to {path!r}: use a .pt or .safetensors (state_dict + source) or .pt2 "
                        f"(torch.export) file name")
    source = str(source) if source else (None if ext == ".pt2" else str(Path(path).with_suffix(".py")))
    targets = [p for p in (source, path) if p]
    if len(set(map(os.path.abspath, targets))) < len(targets):
        raise SaveError(f"the source and the weights would both be written to {path!r}: give them different names")
    refuse_overwrite(targets, overwrite=overwrite, companion=source)
    x = _example(gm, example_input)
    expected = _run(gm, x, "the model")
    for p in targets:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".fxrf-save-") as tmp:
        staged = {p: os.path.join(tmp, f"{i}{Path(p).suffix}") for i, p in enumerate(targets)}
        if ext == ".pt2":
            _write_program(gm, x, staged[path])
            _compare(expected, _run(torch.export.load(staged[path]).module(), x, path), path)
            if source:  # the class alone (its weights are in the program): checked with gm's own tensors
                src, _ = _source(gm, class_name)
                Path(staged[source]).write_text(src)
                model = _load_class(staged[source], _identifier(class_name or type(gm).__name__))()
                model.load_state_dict({k: fetch_attr(gm, k) for k in model.state_dict()}, strict=True)
                _compare(expected, _run(model.to(x.device), x, source), source)
        else:
            name = _identifier(class_name or type(gm).__name__)
            src, _ = _source(gm, class_name, weights=os.path.basename(path))
            Path(staged[source]).write_text(src)
            model = _load_class(staged[source], name)()
            _write_weights(_weights_of(gm, model, path), staged[path], ext)
            try:
                model.load_state_dict(load_weights_file(staged[path]), strict=True)
            except RuntimeError as e:
                raise SaveError(f"the saved weights do not load into the saved class {name}: "
                                f"{_first_line(e)}") from e
            _compare(expected, _run(model.to(x.device), x, path), path)
        for p in targets:  # every check passed: move the files in place
            shutil.move(staged[p], p)
    return targets


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return " ".join(text.splitlines()[:2]) if text else type(e).__name__


def _example(gm: fx.GraphModule, example_input):
    """The input to compare on: the one given (a tensor or a shape) or a random one of the traced shape."""
    if isinstance(example_input, torch.Tensor):
        return example_input
    device = next((t.device for t in gm.state_dict().values()), torch.device("cpu"))
    if example_input is not None:
        return torch.randn(*example_input, device=device)
    metas = [n.meta.get("tensor_meta") for n in gm.graph.nodes if n.op == "placeholder"]
    if len(metas) != 1 or metas[0] is None or not hasattr(metas[0], "shape"):
        raise SaveError("save needs example_input (a tensor or a shape) to check what it writes: pass it")
    m = metas[0]
    if m.dtype.is_floating_point:
        return torch.randn(*m.shape, dtype=m.dtype, device=device)
    return torch.zeros(*m.shape, dtype=m.dtype, device=device)


def _run(model: nn.Module, x, what: str):
    """model(x) in eval mode without autograd; every module's own training flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:  # (not model.eval(): a torch.export module refuses it; its ATen calls carry the mode)
        m.training = False
    try:
        with torch.no_grad():
            return model(x)
    except Exception as e:
        raise SaveError(f"running {what} on the example input {tuple(x.shape)} failed: {type(e).__name__}: "
                        f"{_first_line(e)}; nothing was written") from e
    finally:
        for m, training in modes:
            m.training = training


def _compare(expected, got, what: str) -> None:
    """SaveError unless `got` has `expected`'s structure and values (tight tolerance: the same ops run)."""
    from torch.utils._pytree import tree_flatten
    a, spec_a = tree_flatten(expected)
    b, spec_b = tree_flatten(got)
    if _shape_of(spec_a) != _shape_of(spec_b):
        raise SaveError(f"reloading {what} gives a {type(got).__name__} where the model returns a "
                        f"{type(expected).__name__} ({spec_b} vs {spec_a}); nothing was written")
    for i, (u, v) in enumerate(zip(a, b)):
        if isinstance(u, torch.Tensor):
            ok = (isinstance(v, torch.Tensor) and u.shape == v.shape and u.dtype == v.dtype
                  and (torch.allclose(u, v.to(u.device), rtol=1e-5, atol=1e-6 * (1 + float(u.abs().max())),
                                      equal_nan=True) if u.is_floating_point() and u.numel() else torch.equal(u, v.to(u.device))))
            if not ok:
                diff = (float((u.double() - v.to(u.device).double()).abs().max()) if isinstance(v, torch.Tensor)
                        and u.shape == v.shape else "shape")
                raise SaveError(f"reloading {what} does not reproduce the model: output {i} differs (max abs "
                                f"difference {diff}); nothing was written. Save a .pt2 (torch.export program) instead "
                                f"or report it")
        elif u != v:
            raise SaveError(f"reloading {what} does not reproduce the model: output {i} is {v!r}, not {u!r}; "
                            f"nothing was written")


def _shape_of(spec):
    """A TreeSpec as nested (type, context, children), fx's immutable containers read as the plain ones."""
    from torch.fx.immutable_collections import immutable_dict, immutable_list
    t = {immutable_dict: dict, immutable_list: list}.get(spec.type, spec.type)
    return None if spec.is_leaf() else (t, spec.context, [_shape_of(c) for c in _children(spec)])


def _load_class(source: str, name: str) -> type:
    """Import the written source from disk under a fresh module name and return its class."""
    mod_name = f"_fxrf_saved_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(mod_name, source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # as a real import would (dataclasses and pickling look it up)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise SaveError(f"the written source does not import: {type(e).__name__}: {_first_line(e)}") from e
    finally:
        sys.modules.pop(mod_name, None)
    return getattr(module, name)


def _weights_of(gm: fx.GraphModule, model: nn.Module, path: str) -> dict:
    """The values of exactly the class's state-dict keys, from `gm`: no key the class lacks (an unused
    num_batches_tracked, the second name of a tied weight), every non-persistent buffer the class declares
    persistent."""
    out = {}
    for k in model.state_dict():
        try:
            t = fetch_attr(gm, k)
        except AttributeError as e:
            raise SaveError(f"the saved class has {k!r}, which the graph module lacks; cannot write {path}") from e
        out[k] = t.detach().to("cpu" if path.lower().endswith(".safetensors") else t.device).clone().contiguous()
    return out


def _write_weights(sd: dict, path: str, ext: str) -> None:
    if ext == ".safetensors":
        _safetensors().save_file(sd, path, metadata={MARKER_KEY: "written by fxrf.passes.export"})
    else:
        torch.save(sd, path)


def _write_program(gm: fx.GraphModule, x, path: str) -> None:
    modes = [(m, m.training) for m in gm.modules()]
    gm.eval()  # a deployable program: batch norms use their running statistics, dropout is off
    try:
        program = torch.export.export(gm, (x,))
    except Exception as e:
        raise SaveError(f"torch.export cannot export the result: {type(e).__name__}: {_first_line(e)}") from e
    finally:
        for m, training in modes:
            m.training = training
    torch.export.save(program, path, extra_files={MARKER_KEY: "written by fxrf.passes.export"})


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:
        raise SaveError("reading or writing .safetensors needs the safetensors package: pip install safetensors") from e
    return safetensors.torch


def load_weights_file(path: str) -> dict:
    """A state dict from `path`: safetensors for .safetensors, else torch.load(weights_only=True) explicitly, so that
    no pickle code runs whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says."""
    if str(path).lower().endswith(".safetensors"):
        return _safetensors().load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


# -- which files fxrf wrote ---------------------------------------------------------------------------------------


def fxrf_wrote(path: str, companion: str | None = None) -> bool:
    """Whether the existing file `path` is one fxrf wrote (and may therefore overwrite):
    a .py whose first line starts with MARKER; a .pt2 holding the extra file `fxrf`; a .safetensors whose metadata
    has the key `fxrf`; a .pt/.pth whose companion source (`companion`, default the .py beside it) starts with
    MARKER and names it as its weights (torch.save files carry no metadata of their own)."""
    path = str(path)
    ext = Path(path).suffix.lower()
    try:
        if ext == ".py":
            with open(path, encoding="utf-8", errors="replace") as fh:
                return fh.readline().startswith(MARKER)
        if ext == ".pt2":
            with zipfile.ZipFile(path) as z:
                return any(n.endswith(f"/extra/{MARKER_KEY}") for n in z.namelist())
        if ext == ".safetensors":
            with open(path, "rb") as fh:  # the header: 8 bytes of length, then JSON with "__metadata__"
                n = int.from_bytes(fh.read(8), "little")
                head = json.loads(fh.read(n)) if 0 < n < 100_000_000 else {}
            return MARKER_KEY in (head.get("__metadata__") or {})
        companion = companion or str(Path(path).with_suffix(".py"))
        with open(companion, encoding="utf-8", errors="replace") as fh:
            first = fh.readline()
        return first.startswith(MARKER) and f"(weights: {os.path.basename(path)})" in first
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


def refuse_overwrite(paths, *, overwrite: bool = False, companion: str | None = None) -> None:
    """SaveError naming the first existing file of `paths` that fxrf did not write, unless overwrite=True."""
    if overwrite:
        return
    for p in paths:
        if os.path.exists(p) and (os.path.isdir(p) or not fxrf_wrote(p, companion)):
            raise SaveError(f"{p} exists and was not written by fxrf (it may be your model's source or checkpoint); "
                            f"choose another name or pass overwrite=True (--force on the command line)")


def load_hint(paths, class_name: str) -> str:
    """One line of Python that loads what `save` wrote (the first .pt2, else the source and the state_dict)."""
    paths = [str(p) for p in paths]
    program = next((p for p in paths if p.lower().endswith(".pt2")), None)
    if program is not None:
        return f'import torch; model = torch.export.load("{program}").module()'
    source = next(p for p in paths if p.endswith(".py"))
    weights = next(p for p in paths if not p.endswith(".py"))
    folder, stem = os.path.split(os.path.splitext(source)[0])
    name = _identifier(class_name)
    if stem.isidentifier() and not keyword.iskeyword(stem):
        where = f'import sys; sys.path.insert(0, "{folder}"); ' if folder else ""
        get = f"from {stem} import {name}; "
    else:  # not importable by name: load the file by path
        where = ""
        get = (f'import importlib.util as u; s = u.spec_from_file_location("m", "{source}"); '
               f'mod = u.module_from_spec(s); s.loader.exec_module(mod); {name} = mod.{name}; ')
    if weights.lower().endswith(".safetensors"):
        return (f'import torch; from safetensors.torch import load_file; {where}{get}model = {name}(); '
                f'model.load_state_dict(load_file("{weights}"))')
    return f'import torch; {where}{get}model = {name}(); model.load_state_dict(torch.load("{weights}"))'


def _identifier(name: str) -> str:
    name = re.sub(r"\W", "_", name)
    if not name or name[0].isdigit() or keyword.iskeyword(name):
        name = f"Model_{name}"
    return name


def _split(src: str) -> tuple:
    """(module-level lines before forward, e.g. fx.wrap registrations; the forward function's lines)."""
    lines = src.strip("\n").splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("def forward"))
    return [line for line in lines[:at] if line.strip()], lines[at:]


# -- imports for the names the generated code uses --------------------------------------------------------------


def _imports(globals_: dict, needs: set, src: str) -> tuple:
    """Import lines and assignments that define every global name the generated code uses."""
    imports = ["import math"] if {"inf", "nan"} & set(globals_) else []
    imports += ["import torch"] + (["import torch.fx"] if "torch.fx." in src else []) + ["import torch.nn as nn"]
    imports += [f"import {m}" for m in sorted(needs) if m != "torch"]
    preamble = []
    for gname, obj in sorted(globals_.items()):
        if gname in ("torch", "nn", "math"):
            continue
        if gname in ("inf", "nan"):
            preamble.append(f"{gname} = math.{gname}")
        elif gname == "NoneType":
            preamble.append("NoneType = type(None)")
        elif isinstance(obj, types.ModuleType):
            imports.append(f"import {obj.__name__}" if obj.__name__ == gname else f"import {obj.__name__} as {gname}")
        elif isinstance(obj, str) and obj.startswith("torch.") and isinstance(_resolve(*obj.rsplit(".", 1)), type):
            preamble.append(f"{gname} = {obj}")  # a type annotation fx keeps as a string, e.g. torch.Tensor
        elif isinstance(obj, (str, int, float, bool)) or obj is None:
            preamble.append(f"{gname} = {obj!r}")
        else:
            mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
            if not mod or not qual or _resolve(mod, qual) is not obj:
                raise SaveError(f"the graph's code uses {gname} = {obj!r}, which cannot be imported by name; "
                                f"write the module with GraphModule.to_folder instead")
            first, _, rest = qual.partition(".")  # `from m import f`: the submodule m may be shadowed by f
            imports.append(f"from {mod} import {first}" + ("" if first == gname and not rest else f" as _{gname}"))
            if rest or first != gname:
                preamble.append(f"{gname} = _{gname}" + (f".{rest}" if rest else ""))
    return imports, preamble


def _resolve(mod: str, qual: str):
    try:
        obj = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError):
        return None


# -- __init__: the submodules, parameters and buffers the graph uses --------------------------------------------


def _init_lines(gm: fx.GraphModule, needs: set, promoted: list) -> list:
    lines, declared = [], {""}
    leaves = set()

    def container(path: str):  # an empty nn.Module for every prefix of a used name that is not a leaf itself
        if path in declared:
            return
        parent, _, child = path.rpartition(".")
        container(parent)
        lines.append(_assign(parent, child, "nn.Module()"))
        declared.add(path)

    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in leaves:
            parent, _, child = node.target.rpartition(".")
            container(parent)
            lines.append(_assign(parent, child, _module_expr(node.target, gm.get_submodule(node.target), needs)))
            leaves.add(node.target)
            declared.add(node.target)
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in declared:
            continue
        parent, _, child = node.target.rpartition(".")
        if any(parent == leaf or parent.startswith(leaf + ".") for leaf in leaves):
            continue  # owned by a leaf module, which creates it
        container(parent)
        lines.append(_tensor_line(gm, parent, child, node.target, promoted))
        declared.add(node.target)
    return lines


def _ref(path: str) -> str:
    """`self.a.b` for a dotted path, with getattr for parts that are not identifiers ("0")."""
    out = "self"
    for part in path.split(".") if path else ():
        out = f"{out}.{part}" if part.isidentifier() and not keyword.iskeyword(part) else f'getattr({out}, "{part}")'
    return out


def _assign(parent: str, child: str, expr: str) -> str:
    if child.isidentifier() and not keyword.iskeyword(child):
        return f"{_ref(parent)}.{child} = {expr}"
    return f'{_ref(parent)}.add_module("{child}", {expr})'


def _tensor_line(gm, parent: str, child: str, target: str, promoted: list) -> str:
    owner = gm.get_submodule(parent) if parent else gm
    t = fetch_attr(gm, target)
    if not isinstance(t, torch.Tensor):
        raise SaveError(f"get_attr {target!r} is a {type(t).__name__}, not a tensor; cannot write it as source")
    empty = f"torch.empty({tuple(t.shape)}, dtype={t.dtype})"
    if child in owner._parameters:
        return f'{_ref(parent)}.register_parameter("{child}", nn.Parameter({empty}, requires_grad={t.requires_grad}))'
    if child in owner._buffers and child not in owner._non_persistent_buffers_set:
        return f'{_ref(parent)}.register_buffer("{child}", {empty})'
    # not in gm's state dict (a non-persistent buffer, or a constant fx made): its value must be written somewhere
    if t.device.type == "meta":
        return f'{_ref(parent)}.register_buffer("{child}", {empty}, persistent=False)  # values unknown (meta)'
    if t.numel() <= _MAX_LITERAL and not t.is_complex() and (not t.is_floating_point() or bool(t.isfinite().all())):
        value = f"torch.tensor({t.detach().cpu().tolist()!r}, dtype={t.dtype})"
        return f'{_ref(parent)}.register_buffer("{child}", {value}, persistent=False)'
    promoted.append(target)  # too large (or not finite) to write inline: the weights file carries it
    return (f'{_ref(parent)}.register_buffer("{child}", {empty})  # non-persistent in the original; its values '
            f'are in the weights file')


def _module_expr(target: str, m: nn.Module, needs: set) -> str:
    """A constructor call that rebuilds `m` (same type, hyper-parameters and parameter shapes)."""
    cls = type(m)
    if getattr(nn, cls.__name__, None) is cls:
        expr = f"nn.{cls.__name__}({m.extra_repr()})"
        if _rebuilds(expr, m):
            return expr
    mod, qual = cls.__module__, cls.__qualname__
    if _resolve(mod, qual) is cls:
        head = f"nn.{cls.__name__}" if getattr(nn, cls.__name__, None) is cls else f"{mod}.{qual}"
        expr = f"{head}({_init_arguments(m)})"
        if _rebuilds(expr, m, mod):
            if not head.startswith("nn."):
                needs.add(mod)
            return expr
    raise SaveError(f"cannot write submodule {target!r} ({mod}.{qual}) as source: neither its repr nor its "
                    f"attributes give back its constructor arguments")


# Constructor arguments that a module does not keep under their own name.
_ARGUMENTS = {
    nn.MultiheadAttention: lambda m: {"bias": m.in_proj_bias is not None, "add_bias_kv": m.bias_k is not None},
}


def _init_arguments(m: nn.Module) -> str:
    """Constructor arguments read back from same-named attributes (the usual nn.Module convention)."""
    args = []
    known = next((f(m) for cls, f in _ARGUMENTS.items() if isinstance(m, cls)), {})
    for p in list(inspect.signature(type(m).__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype"):
            continue
        if p.name in known:
            args.append(f"{p.name}={known[p.name]!r}")
        elif hasattr(m, p.name) and not isinstance(getattr(m, p.name), (nn.Module, torch.Tensor)):
            args.append(f"{p.name}={getattr(m, p.name)!r}")
        elif p.name == "bias" and isinstance(getattr(m, "bias", None), (torch.Tensor, type(None))):
            args.append(f"bias={getattr(m, 'bias', None) is not None}")
    return ", ".join(args)


def _rebuilds(expr: str, m: nn.Module, extra_module: str | None = None) -> bool:
    env = {"nn": nn, "torch": torch, "inf": math.inf, "nan": math.nan}
    if extra_module:
        env[extra_module.split(".")[0]] = importlib.import_module(extra_module.split(".")[0])
        importlib.import_module(extra_module)
    try:
        with torch.device("meta"):
            built = eval(expr, env)  # noqa: S307 (our own expression, from the module's repr)
    except Exception:
        return False
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    return (type(built) is type(m) and built.extra_repr() == m.extra_repr()
            and {k: tuple(v.shape) for k, v in built.state_dict().items()} == shapes)
