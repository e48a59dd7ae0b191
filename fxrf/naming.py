"""How fxrf names a node or an op in messages and reports (`call_module 'layer1.0.conv1' (nn.Conv2d)`)."""
from __future__ import annotations

import keyword

import torch
import torch.fx as fx
import torch.fx.graph


def _keyword_safe(format_target):
    """torch.fx writes a module path's parts as attributes (`self.d.in`), a SyntaxError where a part is a Python
    keyword (an nn.ModuleDict key "in"), in every GraphModule, export's included. Such a part is written as
    `getattr(self.d, "in")`, as fx already does for parts that are not identifiers; every other path is written
    by torch's own function."""
    if getattr(format_target, "fxrf_keyword_safe", False):
        return format_target

    def fmt(base: str, target: str) -> str:
        parts = target.split(".")
        if not any(keyword.iskeyword(p) for p in parts):
            return format_target(base, target)
        for p in parts:
            base = f"{base}.{p}" if p.isidentifier() and not keyword.iskeyword(p) else f"getattr({base}, {p!r})"
        return base

    fmt.fxrf_keyword_safe = True
    return fmt


if callable(getattr(torch.fx.graph, "_format_target", None)):  # a private helper: left alone if torch drops it
    torch.fx.graph._format_target = _keyword_safe(torch.fx.graph._format_target)


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """`call_module 'layer1.0.conv1' (nn.Conv2d)`-style name of a node for error messages."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return f"{node.op} '{node.target}' ({_type_name(type(mod))}) [node {node.name}]"
    if node.op in ("call_function", "call_method"):
        return f"{node.op} {op_name(node)} [node {node.name}]"
    return f"{node.op} '{node.target}' [node {node.name}]"


def op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):  # aten.conv2d.default -> aten.conv2d
        return f"{t.namespace}.{t.overloadpacket.__name__}"
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", repr(t))
    mod = {"_operator": "operator", "torch._C._nn": "F", "torch.nn.functional": "F", "torch._C._VariableFunctions":
           "torch", "torch.functional": "torch"}.get(mod, mod)
    return f"{mod}.{name}" if mod else name


def _type_name(cls: type) -> str:
    mod = cls.__module__
    if mod.startswith("torch.nn.modules"):
        return f"nn.{cls.__name__}"
    return f"{mod}.{cls.__name__}"


def module_path(node: fx.Node) -> str | None:
    """The module a node belongs to: a call_module's target, else the innermost entry of the `nn_module_stack`
    that torch.fx and torch.export record (None: the model's own forward)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1]
    path = path[0] if isinstance(path, tuple) else path
    return str(path) or None
