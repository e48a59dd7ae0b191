"""emit_source: a GraphModule as one readable nn.Module class (submodules declared in __init__, the graph's code as
forward); an exported graph's output structure rebuilt by name."""
from __future__ import annotations

import collections
import copy
import importlib
import inspect
import keyword
import math
import re
import types
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from fxrf.errors import SaveError

from ..util import fetch_attr
from .files import MARKER, refuse_overwrite

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


def init_kwargs(m: nn.Module) -> dict:
    """Constructor arguments read back from same-named attributes (the usual nn.Module convention), by name."""
    out = {}
    known = next((f(m) for cls, f in _ARGUMENTS.items() if isinstance(m, cls)), {})
    for p in list(inspect.signature(type(m).__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype"):
            continue
        if p.name in known:
            out[p.name] = known[p.name]
        elif hasattr(m, p.name) and not isinstance(getattr(m, p.name), (nn.Module, torch.Tensor)):
            out[p.name] = getattr(m, p.name)
        elif p.name == "bias" and isinstance(getattr(m, "bias", None), (torch.Tensor, type(None))):
            out["bias"] = getattr(m, "bias", None) is not None
    return out


def _init_arguments(m: nn.Module) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in init_kwargs(m).items())


def same_build(built: nn.Module, m: nn.Module) -> bool:
    """Whether `built` (a fresh construction, e.g. on the meta device) is `m` rebuilt: its type, hyper-parameters and
    parameter shapes."""
    return (type(built) is type(m) and built.extra_repr() == m.extra_repr()
            and {k: tuple(v.shape) for k, v in built.state_dict().items()}
            == {k: tuple(v.shape) for k, v in m.state_dict().items()})


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
    return same_build(built, m)
