"""The result as the user's own model. Where every change the passes made is local to one module (a conv replaced
by a block, modules appended after a module, a conv unit removed), the same changes are made by module surgery on
a copy of the user's model: its class, methods, constructor and output type stay (a timm model keeps
`forward_features`, a Hugging Face one `save_pretrained` and `.logits`). A structure plan (JSON: module path ->
change) records the surgery; `apply(model, plan)` makes it again on a freshly built model, before
`load_state_dict`. Where a change is not local (an inserted functional call, a module called twice), `lift` says
which and why, and the emitted GraphModule is what the user gets.

    >>> import torch, torch.nn as nn, fxrf
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1))
    ...     def forward(self, x):
    ...         return {"out": self.body(x)}
    >>> r = fxrf.optimize(Net(), (1, 3, 16, 16), kernels="DW+PW")
    >>> type(r.model).__name__, r.form, [c["path"] for c in r.plan["changes"]]
    ('Net', 'module', ['body.2'])
    >>> fresh = fxrf.apply(Net(), r.plan); fresh.load_state_dict(r.model.state_dict())
    <All keys matched successfully>
    >>> x = torch.randn(2, 3, 16, 16); torch.equal(fresh(x)["out"], r.graph_module(x)["out"])
    True
"""
from __future__ import annotations

import copy
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from fxrf.errors import InputError

from .export.emit import _resolve, init_kwargs, same_build
from .util import call_counts

__all__ = ["Roll", "Lifted", "lift", "apply", "load_plan", "write_plan", "dumps_plan", "PLAN_VERSION"]

PLAN_VERSION = 1
BASE = "base"  # an appended-to module's own name inside the Sequential that wraps it
OPS = ("identity", "replace", "append", "prepend", "resize")  # what a plan's change does at its module path


class Roll(nn.Module):
    """torch.roll along the channels as a module (DW+RPW's rotation, where it was not folded into a conv)."""

    def __init__(self, shifts: int, dims: int = 1):
        super().__init__()
        self.shifts, self.dims = shifts, dims

    def forward(self, x):
        return torch.roll(x, shifts=self.shifts, dims=self.dims)

    def extra_repr(self) -> str:
        return f"shifts={self.shifts}, dims={self.dims}"


@dataclass(frozen=True)
class Lifted:
    """`lift`'s answer: `model` (the user's class, changed by surgery) and its `plan`, or `why` not."""

    model: nn.Module | None
    plan: dict | None
    why: str | None = None


class _NotLocal(Exception):
    pass


# -- the plan: build it from the passes' records --------------------------------------------------------------------


def lift(model: nn.Module, result: fx.GraphModule, steps: dict, example_input) -> Lifted:
    """Make `result` (what the steps computed from `model`) as a copy of `model` changed module by module, check it
    computes what `result` computes, and return it with its plan; or, where a change is not local to a module or
    the copy does not compute the same, say why. `steps`: `fxrf.optimize`'s {"stages": ..., "kernels": ...}."""
    if isinstance(model, fx.GraphModule):
        return Lifted(None, None, "the input is already a GraphModule: its own class is what comes back")
    try:
        changes, where = _plan(model, result, steps, example_input)
        plan = {"fxrf_plan": PLAN_VERSION, "class": _qualified(type(model)), "changes": changes}
        built = apply(model, plan)
        _load(built, result, where, changes)
        _same_function(result, built, example_input)
    except _NotLocal as e:
        return Lifted(None, None, str(e))
    except Exception as e:  # a model the surgery cannot copy or run: the graph form stands, and says why
        return Lifted(None, None, f"the model could not be changed module by module ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})")
    return Lifted(built, plan)


def _plan(model: nn.Module, result: fx.GraphModule, steps: dict, example_input) -> tuple[list, dict]:
    """(the plan's changes in order, {result's module path: the user model's path} for every module that moved)."""
    changes: list = []
    where: dict = {}  # result path -> user path, for modules the surgery put elsewhere (or new)
    appended: dict = {}  # user path of a wrapping Sequential -> its last child's user path

    def user(path: str) -> str:
        return where.get(path, path)

    organizer = steps.get("stages")
    if organizer is not None and organizer.changes:
        from . import private_copy
        given = private_copy(model, example_input)  # the organizer's input graph: the node names its records use
        nodes = {n.name: n for n in given.graph.nodes}
        counts = call_counts(given)
        for c in (c for c in organizer.changes if c.kind == "remove"):
            for name in c.nodes:
                n = nodes.get(name)
                _own_module(n, counts, model, f"removing the conv unit at {_where(n, name)}")
                changes.append({"path": n.target, "op": "identity"})
        out = organizer.graph_module
        nodes, counts = {n.name: n for n in out.graph.nodes}, call_counts(out)
        for c in (c for c in organizer.changes if c.kind == "insert"):
            new = [nodes[name] for name in c.nodes]
            what = f"the conv inserted after {_where(nodes.get(c.after), c.after)}"
            for n in new:
                if n.op != "call_module":
                    raise _NotLocal(f"{what}: its {n.name} is a function call ({_callee(n)}), not a module")
            modules = [(n.target.replace(".", "_"), out.get_submodule(n.target)) for n in new]
            specs = [_spec(m, name, model) for name, m in modules]
            op, target = _anchor(nodes.get(c.after), new[-1], counts, what)
            at = user(target)
            if op == "append" and at in appended.values():  # after what was appended: that Sequential grows
                parent = next(p for p, last in appended.items() if last == at)
            else:
                parent = at
                where[target] = f"{at}.{BASE}"
            changes.append({"path": parent, "op": op, "modules": specs})
            for n, (name, _) in zip(new, modules):
                where[n.target] = f"{parent}.{name}"
            if op == "append":
                appended[parent] = f"{parent}.{modules[-1][0]}"
    decomposer = steps.get("kernels")
    if decomposer is not None:
        for c in decomposer.changes:
            chain = _block_chain(result, c.target)
            modules = []
            for n in chain:
                if n.op == "call_module":
                    modules.append((n.target[len(c.target) + 1:], result.get_submodule(n.target)))
                else:
                    modules.append(("shift", Roll(n.kwargs["shifts"], n.kwargs.get("dims", 1))))
            at = user(c.target)
            changes.append({"path": at, "op": "replace", "modules": [_spec(m, name, model) for name, m in modules]})
            for name, _ in modules:
                where[f"{c.target}.{name}"] = f"{at}.{name}"
    return changes, where


def _anchor(point, last, counts: dict, what: str) -> tuple[str, str]:
    """Where inserted modules go in the module tree: ("append", path) after the module `point` calls, or after the
    module whose one output `point` is; ("prepend", path) before the one module that reads the inserted unit."""
    if point is not None and point.op == "call_module" and counts.get(point.target) == 1:
        return "append", point.target
    readers = list(last.users)
    if (len(readers) == 1 and readers[0].op == "call_module" and counts.get(readers[0].target) == 1
            and readers[0].all_input_nodes == [last] and readers[0].args[:1] == (last,)):
        return "prepend", readers[0].target
    if point is not None:
        graph_nodes = list(point.graph.nodes)
        for path in reversed([v[0] for v in point.meta.get("nn_module_stack", {}).values()]):
            if path == point.target:
                continue
            inside = {n for n in graph_nodes if path in [v[0] for v in n.meta.get("nn_module_stack", {}).values()]}
            leaving = [n for n in graph_nodes if n in inside and any(u not in inside for u in n.users)]
            if leaving == [point]:  # the module computes `point` and nothing else leaves it
                return "append", path
    raise _NotLocal(f"{what}: that is not a module called once, the inserted conv feeds no single module, and no "
                    f"enclosing module ends there, so nothing in the module tree can hold it")


def _own_module(n, counts: dict, model: nn.Module, what: str) -> None:
    if n is None or n.op != "call_module":
        raise _NotLocal(f"{what}: it removes {_callee(n) if n is not None else 'a node'}, which is not a module")
    if counts.get(n.target) != 1:
        raise _NotLocal(f"{what}: the module {n.target} is called {counts.get(n.target)} times in the forward")
    try:
        model.get_submodule(n.target)
    except AttributeError:
        raise _NotLocal(f"{what}: {n.target} is not a module of the model") from None


def _block_chain(gm: fx.GraphModule, path: str) -> list:
    """The nodes of the block at `path` in graph order, checked to be a chain: each reads the one before and only
    the next reads it (so the block computes as nn.Sequential of them)."""
    base = path.replace(".", "_")
    chain = [n for n in gm.graph.nodes
             if (n.op == "call_module" and str(n.target).startswith(path + "."))
             or (n.op == "call_function" and n.target is torch.roll and n.name.startswith(f"{base}_shift"))]
    if not chain:
        raise _NotLocal(f"the block replacing {path}: none of its layers is left in the graph")
    for a, b in zip(chain, chain[1:]):
        if b.args[:1] != (a,) or list(a.users) != [b] or len(b.all_input_nodes) != 1:
            raise _NotLocal(f"the block replacing {path}: {b.name} does not read {a.name} alone, so the block is "
                            f"not a chain of its layers")
    if len(chain[0].all_input_nodes) != 1:
        raise _NotLocal(f"the block replacing {path}: its first layer reads more than one value")
    return chain


def _where(n, name: str) -> str:
    return str(n.target) if n is not None and n.op == "call_module" else name


def _callee(n) -> str:
    t = n.target
    return getattr(t, "__name__", str(t))


# -- module specs: a new module as JSON and back ---------------------------------------------------------------------


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _spec(m: nn.Module, name: str, model: nn.Module) -> dict:
    """{"name", "class", "kwargs"} that rebuild `m` (its type, hyper-parameters and parameter shapes), or
    {"name", "like": path} for a module of the model's own (an activation copied from the model)."""
    kwargs = _kwargs(m)
    if kwargs is not None and _class_of(_qualified(type(m))) is type(m) and _rebuilds(type(m), kwargs, m):
        return {"name": name, "class": _qualified(type(m)), "kwargs": kwargs}
    if not list(m.parameters()) and not list(m.buffers()):
        for path, other in model.named_modules():
            if type(other) is type(m) and other.extra_repr() == m.extra_repr() and path:
                return {"name": name, "like": path}
    raise _NotLocal(f"the new module {name} ({_qualified(type(m))}) cannot be written as a constructor call: "
                    f"its attributes do not give back its arguments")


def _kwargs(m: nn.Module) -> dict | None:
    """Its constructor arguments (export/emit.py's `init_kwargs`) as JSON values, tuples as lists; None when one is
    not JSON (a module, a callable, a non-finite float)."""
    out = {}
    for k, v in init_kwargs(m).items():
        v = list(v) if isinstance(v, tuple) else v
        if not isinstance(v, (bool, int, float, str, list, type(None))) or (isinstance(v, float)
                                                                             and not math.isfinite(v)):
            return None
        out[k] = v
    return out


def _class_of(qualified: str):
    """The object `module.qualname` names (the module being the longest importable prefix), or None."""
    parts = qualified.split(".")
    return next((obj for i in range(len(parts) - 1, 0, -1)
                 if (obj := _resolve(".".join(parts[:i]), ".".join(parts[i:]))) is not None), None)


def _rebuilds(cls: type, kwargs: dict, m: nn.Module) -> bool:
    try:
        with torch.device("meta"):
            built = cls(**kwargs)
    except Exception:
        return False
    return same_build(built, m)


def _build(spec: dict, model: nn.Module, like: nn.Module) -> nn.Module:
    """The module a spec names, untrained, on `like`'s device and dtype and in its mode."""
    if "like" in spec:
        m = copy.deepcopy(model.get_submodule(spec["like"]))
    else:
        cls = _class_of(spec["class"])
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise InputError(f"the plan names {spec['class']!r} for {spec['name']}, which is not an nn.Module class "
                             f"importable here: install what defines it")
        m = cls(**spec.get("kwargs", {}))
    t = next(iter(like.parameters()), next(iter(like.buffers()), None)) if like is not None else None
    if t is not None:
        m = m.to(device=t.device, dtype=t.dtype if t.is_floating_point() else None)
    return m.train(like.training if like is not None else model.training)


# -- apply: the surgery -------------------------------------------------------------------------------------------


def apply(model: nn.Module, plan) -> nn.Module:
    """A copy of `model` (never modified) with the structure `plan` describes (a dict, or the path of the JSON
    `fxrf optimize` wrote beside the weights): load the optimized weights into it with `load_state_dict`. The new
    modules start untrained."""
    if isinstance(plan, (str, Path)):
        plan = load_plan(plan)
    if not isinstance(plan, dict) or plan.get("fxrf_plan") != PLAN_VERSION or "changes" not in plan:
        raise InputError(f"not an fxrf structure plan (fxrf_plan {PLAN_VERSION}): give the .plan.json that "
                         f"fxrf optimize wrote beside the weights")
    if not isinstance(model, nn.Module):
        raise InputError(f"fxrf.apply needs the model instance, built as before optimizing, not "
                         f"{type(model).__name__}")
    # by class name: a class defined in a script is __main__.Net there and script.Net when imported
    if plan.get("class") and plan["class"].rpartition(".")[2] != type(model).__qualname__.rpartition(".")[2]:
        raise InputError(f"the plan was made for {plan['class']}, not {_qualified(type(model))}: build that model "
                         f"(with the same constructor arguments) and apply the plan to it")
    out = copy.deepcopy(model)
    for change in plan["changes"]:
        path, op = change.get("path"), change.get("op")
        try:
            old = out.get_submodule(path)
        except AttributeError:
            raise InputError(f"the plan changes {path!r}, which this model does not have: build the model with the "
                             f"constructor arguments it was optimized with") from None
        if op not in OPS:
            raise InputError(f"the plan's change at {path!r} has op {op!r}: fxrf knows {', '.join(OPS)}")
        made = [(spec["name"], _build(spec, out, old)) for spec in change.get("modules", ())]
        if op == "append" and getattr(old, "_fxrf_appended", False):  # after what was appended: it grows
            for name, m in made:
                old.add_module(name, m)
            continue
        if op == "resize":  # the same module with other channel counts (fxrf.prune)
            out.set_submodule(path, made[0][1])
            continue
        if op == "identity":
            new = nn.Identity()
        else:
            layers = {"replace": made, "prepend": made + [(BASE, old)], "append": [(BASE, old)] + made}[op]
            new = nn.Sequential(OrderedDict(layers)).train(old.training)
            if op == "append":
                new._fxrf_appended = True  # (a second append after its last child grows it)
        out.set_submodule(path, new)
    return out


def dumps_plan(plan: dict) -> str:
    """The plan as JSON, one line per module's field, lists of numbers kept on one line ([3, 3], not five lines)."""
    text = json.dumps(plan, indent=1)
    scalar = r"(?:-?[0-9.eE+-]+|true|false|null)"
    return re.sub(rf"\[\s+({scalar}(?:,\s+{scalar})*)\s+\]",
                  lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text) + "\n"


def write_plan(plan: dict, path) -> None:
    Path(path).write_text(dumps_plan(plan))


def load_plan(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the structure plan {str(path)!r}: {e}") from e


# -- the weights and the check --------------------------------------------------------------------------------------


def _load(built: nn.Module, result: fx.GraphModule, where: dict, changes: list) -> None:
    """Fill `built` with `result`'s tensors: each key of built's state_dict taken from result's under the path it had
    there (`where`, inverted). A key the result lacks keeps the copy's own tensor (a module the forward never calls,
    dropped from the graph) unless it belongs to a module the plan made."""
    back = {u: r for r, u in where.items()}
    made = [c["path"] for c in changes]
    theirs = result.state_dict()
    mine = built.state_dict()
    for key in mine:
        src, probe = key, key.rpartition(".")[0]
        while probe:
            if probe in back:
                src = back[probe] + key[len(probe):]
                break
            probe = probe.rpartition(".")[0]
        if src in theirs and theirs[src].shape == mine[key].shape:
            mine[key] = theirs[src]
        elif any(key.startswith(p + ".") for p in made):
            raise _NotLocal(f"the result holds no tensor for {key} (looked for {src}): the changes are not all "
                            f"local to modules")
    built.load_state_dict(mine)


def _same_function(result: fx.GraphModule, built: nn.Module, example_input) -> None:
    """The surgery is right only if the copy computes what the result computes (eval mode, a random input), tensor
    leaf by tensor leaf: the copy returns the user's own output type, the graph may return a plain one."""
    from torch.utils._pytree import tree_leaves

    from fxrf.errors import SaveError

    from .export.programs import eval_mode
    from .export.saving import _compare_leaves, _example
    xs = _example(result, example_input)
    outs = []
    for m in (result, built):
        try:
            with eval_mode(m), torch.no_grad():
                outs.append(m(*xs))
        except Exception as e:
            raise _NotLocal(f"the model changed module by module does not run: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    got = [t for t in tree_leaves(outs[1]) if isinstance(t, torch.Tensor)]
    if not got:
        raise _NotLocal("the model changed module by module returns no tensor to compare with the result's")
    try:
        _compare_leaves(outs[0], got, "the changed copy of the model")
    except SaveError as e:
        raise _NotLocal(f"the model changed module by module does not compute what the result computes "
                        f"({str(e).splitlines()[0]})") from None
