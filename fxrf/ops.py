"""The op table: everything fxrf knows about one kind of op, in one registration.

An `Op` carries, for a set of targets (module classes, functions, tensor-method names), the three rules fxrf
applies to a node and the traits the passes ask about:

- `shape(call) -> TMeta | tuple | value`: the output's shape and dtype from the inputs' (None: run the single op
  on meta tensors instead);
- `rf(call) -> Field | tuple`: the output's receptive field from the inputs' fields (None: the conservative
  field, and the node is listed as unsupported);
- `cost(call) -> (macs, extra_macs)` with a cost `kind` (None: 0 MACs, kind "other");
- `traits`: "per_element" (out[c, x] = f(in[c, x])), "per_channel" (acts on each channel alone, any parameters
  indexed by channel along dim 0: permutations fold through it), "activation", "idempotent" (f(f(x)) = f(x)),
  "channel_permutation" (moves channels and nothing else), "channel_blocks" (output channel c is made of a block of
  input channels and of nothing else, as pixel_shuffle's r*r: removing the block with c is exact; fxrf.prune);
- `spec(call) -> ConvSpec`: set for conv-like ops, which then get a kernel type and a 3DRF gain.

All three rules take one `Call`: the node, its module (call_module only), its arguments with every tensor given
as a `TMeta` (shape rules, cost rules) or a `T` (receptive-field rules, which also see the field), and the
output. Lookup is one rule for every use: a module by its class and then its base classes (a subclass of
nn.Conv2d is a conv), a function by identity, a method by name.

Tables are values: `DEFAULT` is filled by `fxrf.rules`; `DEFAULT + mine` is a new table in which `mine`'s ops
win, so an override is scoped to the call that receives it (`fxrf.analyze(model, x, rules=DEFAULT + mine)`)
instead of mutating global state. Registering a second op for a target of the same table raises
`DuplicateRuleError`.

    >>> import torch.nn as nn
    >>> mine = OpTable()
    >>> @mine.rf_rule(nn.Hardshrink)
    ... def hardshrink(call):
    ...     return call.args[0].field
    >>> (DEFAULT + mine).lookup_target(nn.Hardshrink).name, DEFAULT.lookup_target(nn.Hardshrink)
    ('hardshrink', None)
"""
from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable, Iterable, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import DuplicateRuleError

TRAITS = frozenset({"per_element", "per_channel", "activation", "idempotent", "channel_permutation",
                    "channel_blocks"})
KINDS = ("conv", "linear", "norm", "activation", "pool", "elementwise", "other")  # cost kinds


class Decline(Exception):
    """Raised by a rule that cannot be exact for this call; the node gets the conservative field and is listed."""


class TMeta(NamedTuple):
    """A tensor as shape rules see it: shape and dtype, no data."""

    shape: tuple
    dtype: torch.dtype


class T(NamedTuple):
    """A tensor argument as a receptive-field rule sees it: its shape and its field (None: sees nothing)."""

    shape: tuple
    field: Any  # fxrf.field.Field | None
    value: Any = None  # the tensor itself, for constants (get_attr) that hold real data


@dataclass
class Call:
    """One node as every kind of rule sees it."""

    node: fx.Node
    module: nn.Module | None
    args: tuple
    kwargs: dict
    out: Any = None  # the output's TMeta (or a tuple of them); None while the shape is being computed
    dims: int = 0  # spatial dims of the reference (2 for images)

    def arg(self, i: int, name: str, default=None):
        """Positional argument `i` (the input is 0; a method's self is 0) or keyword `name`."""
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    def param(self, attr: str, i: int, name: str, default=None):
        """A hyper-parameter: the module's attribute `attr`, or the functional form's argument `i` / `name`."""
        return getattr(self.module, attr) if self.module is not None else self.arg(i, name, default)

    @property
    def name(self) -> str:
        """The target's name: the method name, the function's __name__ or the module class's name."""
        if self.module is not None:
            return type(self.module).__name__
        t = self.node.target
        if isinstance(t, torch._ops.OpOverload):  # aten.max_pool2d.default -> "max_pool2d"
            return t.overloadpacket.__name__
        return t if isinstance(t, str) else getattr(t, "__name__", repr(t))

    @property
    def out_shape(self) -> tuple:
        return self.out.shape

    @property
    def out_numel(self) -> int:
        return math.prod(_first_shape(self.out) or ())

    @property
    def in_numel(self) -> int:
        return math.prod(_first_shape(self.arg(0, "input")) or ())

    def tensors(self) -> list:
        """Every tensor argument (T or TMeta), flattened out of lists, tuples and dicts, in argument order."""
        if not self.kwargs and all(isinstance(a, (T, TMeta)) for a in self.args):  # (t + u): no nesting to walk
            return list(self.args)
        out: list = []

        def walk(v):
            if isinstance(v, (T, TMeta)):
                out.append(v)
            elif isinstance(v, (list, tuple)):
                for x in v:
                    walk(x)
            elif isinstance(v, dict):
                for x in v.values():
                    walk(x)

        walk(self.args)
        walk(self.kwargs)
        return out


def _first_shape(v):
    if isinstance(v, (T, TMeta)):
        return v.shape
    if isinstance(v, (tuple, list)):
        return next((x.shape for x in v if isinstance(x, (T, TMeta))), None)
    return None


@dataclass(frozen=True)
class Op:
    """Everything fxrf knows about one kind of op (see the module docstring)."""

    name: str
    targets: tuple
    shape: Callable | None = None
    rf: Callable | None = None
    cost: Callable | None = None
    kind: str = "other"
    traits: frozenset = dc_field(default_factory=frozenset)
    spec: Callable | None = None  # conv-like: Call -> ConvSpec (kernel type, gain)
    doc: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown cost kind {self.kind!r} for op {self.name!r}; expected one of {KINDS}")
        unknown = set(self.traits) - TRAITS
        if unknown:
            raise ValueError(f"unknown traits {sorted(unknown)} for op {self.name!r}; expected some of "
                             f"{sorted(TRAITS)}")
        object.__setattr__(self, "traits", frozenset(self.traits))
        object.__setattr__(self, "targets", tuple({_key(t): t for t in self.targets}.values()))

    @property
    def conv_like(self) -> bool:
        return self.spec is not None

    @property
    def module_class(self) -> type | None:
        """The first nn.Module class among the targets (to build the module form of a functional call)."""
        return next((t for t in self.targets if isinstance(t, type) and issubclass(t, nn.Module)), None)


def _key(t):
    """Targets are keyed by identity for functions (F.relu_ is torch.relu_) and by value for names/classes."""
    return t if isinstance(t, (str, type)) else ("id", id(t))


def _lazy(t) -> bool:
    """'package.module:Name': a target resolved once its module has been imported (no import at fxrf start)."""
    return isinstance(t, str) and ":" in t


class OpTable:
    """Ops keyed by target. `a + b` is a new table where b's ops replace a's for the targets b has."""

    def __init__(self, ops: Iterable[Op] = ()):
        self._ops: dict = {}  # key -> Op
        self._objs: dict = {}  # key -> target object (to list targets)
        self._pending: dict = {}  # "module:Name" -> Op, resolved once the module is imported
        self._bases: dict = {}  # class -> registered_base(class), forgotten whenever an op is added
        self._modules_seen = -1  # len(sys.modules) when _pending was last tried: imports only add modules
        for o in ops:
            self.register(o)

    # -- building ---------------------------------------------------------------------------------------------

    def register(self, op: Op) -> Op:
        """Add `op` for all its targets; a target that already has an op in this table raises."""
        for t in op.targets:
            existing = self._pending.get(t) if _lazy(t) else self._ops.get(_key(t))
            if existing is not None:
                raise DuplicateRuleError(
                    f"duplicate rule: {_show(t)} already has the op {existing.name!r} registered; give your op "
                    f"other targets, or pass a table of your own as `rules=fxrf.ops.DEFAULT + mine` to override it")
        for t in op.targets:
            if _lazy(t):
                self._pending[t] = op
                self._modules_seen = -1
            else:
                self._ops[_key(t)] = op
                self._objs[_key(t)] = t
        self._bases.clear()
        return op

    def op(self, *targets, name: str | None = None, **fields) -> Callable:
        """Decorator: `@table.op(nn.Foo, F.foo, "foo", shape=..., cost=..., kind=..., traits=...)` over the
        receptive-field rule registers one Op with it."""

        def deco(fn: Callable) -> Callable:
            self.register(Op(name or fn.__name__, targets, rf=fn, **fields))
            return fn

        return deco

    def alias(self, existing, *targets) -> Op:
        """Register `targets` as further spellings of the op that has `existing` (the ATen overloads a
        torch.export graph calls, `aten.conv2d.default` for F.conv2d): the same Op, one registration."""
        op = self.lookup_target(existing)
        if op is None:
            raise KeyError(f"no op for {_show(existing)} to alias")
        for t in targets:
            if self._ops.get(_key(t)) is not None:
                raise DuplicateRuleError(f"duplicate rule: {_show(t)} already has the op {self._ops[_key(t)].name!r}")
        for t in targets:
            self._ops[_key(t)] = op
            self._objs[_key(t)] = t
        self._bases.clear()
        return op

    def rf_rule(self, *targets, spec: Callable | None = None, name: str | None = None) -> Callable:
        """Decorator registering a receptive-field rule alone (shape by meta execution, no cost). `spec`
        declares the op conv-like: a function of the Call returning a `ConvSpec`, so it gets a kernel type and
        a gain."""
        return self.op(*targets, name=name, spec=spec)

    def __add__(self, other: "OpTable") -> "OpTable":
        out = OpTable()
        for src in (self, other):
            src._resolve()
            out._ops.update(src._ops)
            out._objs.update(src._objs)
            out._pending.update(src._pending)
        return out

    # -- reading ----------------------------------------------------------------------------------------------

    def _resolve(self) -> None:
        if len(sys.modules) == self._modules_seen:  # nothing imported since the last try (every lookup asks)
            return
        self._modules_seen = len(sys.modules)
        for t in [t for t in self._pending if t.split(":")[0] in sys.modules]:
            mod, _, qual = t.partition(":")
            op = self._pending.pop(t)
            try:
                obj = importlib.import_module(mod)
                for part in qual.split("."):
                    obj = getattr(obj, part)
            except (ImportError, AttributeError):
                continue
            self._ops[_key(obj)] = op
            self._objs[_key(obj)] = obj
            self._bases.clear()

    def registered_base(self, cls: type) -> type | None:
        """The class in `cls`'s MRO that has an op (cls itself or its nearest registered base class)."""
        if self._pending:
            self._resolve()
        try:
            return self._bases[cls]
        except KeyError:
            base = self._bases[cls] = next((c for c in cls.__mro__ if c in self._ops), None)
            return base

    def lookup_target(self, target) -> Op | None:
        """The op for a module class (or its nearest registered base class), a function or a method name."""
        if isinstance(target, type):
            base = self.registered_base(target)
            return self._ops[base] if base is not None else None
        if self._pending:
            self._resolve()
        try:
            return self._ops.get(_key(target))
        except TypeError:  # an unhashable target
            return None

    def lookup(self, node: fx.Node, module: nn.Module | None = None) -> Op | None:
        """The op of a node: by its module's class (call_module), its function or its method name."""
        if node.op == "call_module":
            return self.lookup_target(type(module)) if module is not None else None
        if node.op in ("call_function", "call_method"):
            return self.lookup_target(node.target)
        return None

    def has(self, trait: str, node: fx.Node, module: nn.Module | None = None) -> bool:
        op = self.lookup(node, module)
        return op is not None and trait in op.traits

    def targets(self, trait: str | None = None, kind: str | None = None) -> tuple:
        """Every registered target with `trait` (and/or cost `kind`): the lists the passes used to keep by hand."""
        self._resolve()
        return tuple(self._objs[k] for k, o in self._ops.items()
                     if (trait is None or trait in o.traits) and (kind is None or o.kind == kind))

    def ops(self) -> list[Op]:
        """The distinct ops, in registration order."""
        self._resolve()
        return list({id(o): o for o in list(self._ops.values()) + list(self._pending.values())}.values())

    def __contains__(self, target) -> bool:
        return self.lookup_target(target) is not None

    def __len__(self) -> int:
        return len(self.ops())

    def __bool__(self) -> bool:  # `table or DEFAULT` must not list every op (__len__) on each call
        return bool(self._ops or self._pending)


def _show(t) -> str:
    if isinstance(t, str):
        return repr(t)
    mod = getattr(t, "__module__", "") or ""
    return f"{mod}.{getattr(t, '__qualname__', getattr(t, '__name__', repr(t)))}".lstrip(".")


DEFAULT = OpTable()  # filled by fxrf.rules, which the package imports first


def default_table() -> OpTable:
    """The default table, read at call time (importing the fxrf package registers the built-in ops in it)."""
    return DEFAULT


def op(*targets, table: OpTable | None = None, **fields) -> Callable:
    """`@fxrf.op(targets..., shape=..., cost=..., kind=..., traits=..., spec=...)` over a receptive-field rule:
    one registration for a new op kind in the default table (or `table`)."""
    return (table or DEFAULT).op(*targets, **fields)


def define(name: str, *targets, table: OpTable | None = None, **fields) -> Op:
    """Register an op given by keywords alone (`shape=`, `rf=`, `cost=`, `kind=`, `traits=`, `spec=`)."""
    return (table or DEFAULT).register(Op(name, targets, **fields))


def rf_rule(*targets, spec: Callable | None = None, table: OpTable | None = None) -> Callable:
    """Register a receptive-field rule for module types, functions and tensor-method names (strings); `spec`
    makes it conv-like (a kernel type and a 3DRF gain on its records)."""
    return (table or DEFAULT).rf_rule(*targets, spec=spec)
