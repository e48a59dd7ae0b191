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

The weights are not written: load them with `model.load_state_dict(graph_module.state_dict())`. Constant tensors
that are not in the state dict (rare; fx makes them from tensors created in forward) are written as literals when
small. A submodule that cannot be rebuilt from its constructor arguments raises a ValueError naming it.

`save` writes what current torch loads without `weights_only=False` (what `fxrf optimize --out` writes): for a
`.pt` path the source next to it (`opt.py`) plus the state_dict (`opt.pt`, plain tensors); for a `.pt2` path a
`torch.export` program. `load_hint` is the one line of Python that loads them back:

    >>> d = tempfile.mkdtemp()
    >>> save(gm, os.path.join(d, "net.pt"), class_name="Net") == [os.path.join(d, "net.py"), os.path.join(d, "net.pt")]
    True
    >>> import sys; sys.path.insert(0, d)
    >>> from net import Net
    >>> m = Net(); m.load_state_dict(torch.load(os.path.join(d, "net.pt")))    # weights_only=True, the default
    <All keys matched successfully>
    >>> torch.equal(m(x), gm(x))
    True
    >>> sys.path.remove(d)
"""
from __future__ import annotations

import copy
import importlib
import inspect
import keyword
import math
import os
import re
import types
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from .util import fetch_attr

__all__ = ["emit_source", "save", "load_hint", "SAVE_FORMATS"]

SAVE_FORMATS = (".pt", ".pth", ".pt2")  # state_dict + source; state_dict + source; torch.export program

_MAX_LITERAL = 4096  # constant tensors up to this many elements are written inline


def emit_source(gm: fx.GraphModule, path, *, class_name: str | None = None) -> str:
    """Write `gm` as an importable Python module defining one nn.Module class; return the source."""
    name = _identifier(class_name or type(gm).__name__)
    graph = gm.graph
    if type(graph._codegen) is not fx.graph.CodeGen:  # an exported graph's pytree code (restoring a ModelOutput)
        graph = copy.deepcopy(graph)  # reads self._in_spec / self._out_spec, which the emitted class lacks: write
        graph.set_codegen(fx.graph.CodeGen())  # the flat form, tensors in and the output's leaves out
    code = graph.python_code(root_module="self")
    needs: set = set()  # modules the constructors need (classes outside torch.nn)
    init = _init_lines(gm, needs)
    used = {k: v for k, v in code.globals.items() if re.search(rf"\b{re.escape(k)}\b", code.src)}
    imports, preamble = _imports(used, needs, code.src)
    top, forward = _split(code.src)
    lines = [
        f'"""{name}: written by fxrf.passes.export.emit_source from a torch.fx GraphModule.',
        "",
        "The architecture only; load the weights with model.load_state_dict(graph_module.state_dict()).",
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
    compile(src, str(path), "exec")  # fail here, naming the file, rather than at import time
    Path(path).write_text(src)
    return src


def save(gm: fx.GraphModule, path, *, source=None, class_name: str | None = None, example_input=None) -> list:
    """Write `gm` so that default `torch.load` / `torch.export.load` read it back; return the paths written.

    path ending in .pt or .pth: the source (`emit_source`, to `source` or next to `path` with the .py suffix) and
    `gm.state_dict()` with torch.save (tensors only: `torch.load(path)` works with weights_only=True, the default).
    path ending in .pt2: a `torch.export` program of `gm` in eval mode traced with `example_input` (a tensor, or a
    shape for a random one), written with torch.export.save; `source`, if given, is written as well.
    """
    path = str(path)
    ext = Path(path).suffix.lower()
    if ext not in SAVE_FORMATS:
        raise ValueError(f"cannot save to {path!r}: use a .pt (state_dict + source) or .pt2 (torch.export) file name")
    written = []
    for p in (path, source):
        if p and Path(p).parent != Path("."):
            Path(p).parent.mkdir(parents=True, exist_ok=True)
    if ext == ".pt2":
        if example_input is None:
            raise ValueError("saving a torch.export program (.pt2) needs an example input")
        x = example_input if isinstance(example_input, torch.Tensor) else torch.randn(*example_input)
        was = gm.training
        gm.eval()  # a deployable program: batch norms use their running statistics, dropout is off
        try:
            program = torch.export.export(gm, (x,))
        finally:
            gm.train(was)
        if source:
            emit_source(gm, source, class_name=class_name)
            written.append(str(source))
        torch.export.save(program, path)
        return written + [path]
    source = str(source) if source else str(Path(path).with_suffix(".py"))
    emit_source(gm, source, class_name=class_name)
    torch.save({k: v.detach().clone() for k, v in gm.state_dict().items()}, path)
    return [source, path]


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
                raise ValueError(f"the graph's code uses {gname} = {obj!r}, which cannot be imported by name; "
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


def _init_lines(gm: fx.GraphModule, needs: set) -> list:
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
        lines.append(_tensor_line(gm, parent, child, node.target))
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


def _tensor_line(gm, parent: str, child: str, target: str) -> str:
    owner = gm.get_submodule(parent) if parent else gm
    t = fetch_attr(gm, target)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"get_attr {target!r} is a {type(t).__name__}, not a tensor; cannot write it as source")
    empty = f"torch.empty({tuple(t.shape)}, dtype={t.dtype})"
    if child in owner._parameters:
        return f'{_ref(parent)}.register_parameter("{child}", nn.Parameter({empty}, requires_grad={t.requires_grad}))'
    if child in owner._buffers:
        persistent = child not in owner._non_persistent_buffers_set
        return f'{_ref(parent)}.register_buffer("{child}", {empty}, persistent={persistent})'
    if t.device.type == "meta" or t.numel() > _MAX_LITERAL:  # a constant outside the state dict
        if t.device.type != "meta":
            raise ValueError(f"constant tensor {target!r} has {t.numel()} elements, too many to write inline")
        return f'{_ref(parent)}.register_buffer("{child}", {empty}, persistent=False)  # values unknown (meta)'
    return f'{_ref(parent)}.register_buffer("{child}", torch.tensor({t.tolist()!r}, dtype={t.dtype}), persistent=False)'


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
    raise ValueError(f"cannot write submodule {target!r} ({mod}.{qual}) as source: neither its repr nor its "
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
