"""Shape-only cost model (parameters and multiply-accumulates) for torch.fx graphs.

Every number is derived from the shapes that
:class:`torch.fx.passes.shape_prop.ShapeProp` leaves in ``node.meta["tensor_meta"]``
and from module attributes; nothing is executed, so graphs whose parameters live
on the ``meta`` device are fine.

Conventions
-----------
``macs`` (main ops; ``FLOPs = 2 * macs``, which is what
:class:`torch.utils.flop_counter.FlopCounterMode` reports for them):

* conv:       ``out_elements * (C_in / groups) * prod(kernel)``.  The bias add is
  *not* counted (same as FlopCounterMode, fvcore and torchvision's ``_ops``).
* conv-transpose: ``in_elements * (C_out / groups) * prod(kernel)``.
* linear:     ``out_elements * in_features`` (bias not counted).
* matmul/mm/bmm/addmm/baddbmm: ``out_elements * K`` (K = contracted dim; the
  ``addmm`` addend is not counted).

``extra_macs`` (cheap ops), following ptflops' hooks:

* norm (BatchNorm, LayerNorm, GroupNorm, InstanceNorm): 1 per element, 2 per
  element when affine (a weight is present): normalise + scale/shift.
* activation (ReLU, ReLU6, SiLU, GELU, Hardswish, Sigmoid, Tanh, softmax, ...):
  1 per output element.
* pool (max/avg/adaptive/LP): 1 per *input* element.
* elementwise (add, sub, mul, div and their in-place / method forms):
  1 per output element (after broadcasting).

``params``: a ``call_module`` node owns its module's parameters (the module is a
leaf of the trace, so this includes any parameters of its children, which the
trace never calls separately); a tensor fetched by ``get_attr`` is owned by its
first conv/linear consumer (else its first consumer that produces a tensor).
Registered buffers (e.g. BatchNorm running stats) are never counted.  Each
parameter is counted once (by identity), so a module called twice or a tied
weight does not double count, and ``total(model_cost(gm)).params ==
sum(p.numel() for p in model.parameters())`` for a traced model.

Ops without a rule get ``macs = extra_macs = 0`` and ``kind = "other"``
(``params`` still counts what the node owns, e.g. an ``nn.Embedding``).
Rules live in one registry, :data:`COST_RULES`, filled by :func:`cost_rule`;
targets are module classes (looked up along the MRO, so subclasses inherit a
rule), functions (``call_function``) and method names (``call_method``).

Example:

>>> import torch, torch.fx
>>> from torch.fx.passes.shape_prop import ShapeProp
>>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()))
>>> _ = ShapeProp(gm).propagate(torch.zeros(1, 3, 6, 6))
>>> costs = model_cost(gm)
>>> costs["_0"]          # 4*4*8 outputs * 3 * 9
Cost(params=224, macs=3456, extra_macs=0, kind='conv')
>>> total(costs)         # + 1 per ReLU output element (128)
Cost(params=224, macs=3456, extra_macs=128, kind='total')
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .shapes import fetch_attr

__all__ = ["Cost", "COST_RULES", "cost_rule", "node_cost", "model_cost", "total"]

KINDS = ("conv", "linear", "norm", "activation", "pool", "elementwise", "other")


@dataclass(frozen=True)
class Cost:
    params: int  # parameters owned by this node
    macs: int  # multiply-accumulates of the main op (conv, linear, matmul)
    extra_macs: int  # cheap ops: norm, activation, pooling, elementwise
    kind: str  # one of KINDS, or "total" for a sum


# --------------------------------------------------------------------- rules


class _Rule(NamedTuple):
    kind: str
    fn: Callable[[OpCall], tuple[int, int]]  # -> (macs, extra_macs)


COST_RULES: dict[Any, _Rule] = {}


def cost_rule(*targets: Any, kind: str) -> Callable:
    """Register ``fn(call: OpCall) -> (macs, extra_macs)`` for every target.

    A target is a module class, a function or a method name (str).  Aliases given
    to the same call (``F.conv2d is torch.conv2d``) are registered once; a target
    that already has a rule raises ``ValueError``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    unique = list({id(t): t for t in targets}.values())
    for t in unique:
        if t in COST_RULES:
            raise ValueError(f"duplicate cost rule for {t!r}")

    def register(fn: Callable[[OpCall], tuple[int, int]]) -> Callable:
        for t in unique:
            COST_RULES[t] = _Rule(kind, fn)
        return fn

    return register


@dataclass(frozen=True)
class OpCall:
    """What a rule sees: the node, its module (``call_module`` only) and shapes."""

    gm: torch.fx.GraphModule
    node: torch.fx.Node
    module: nn.Module | None

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Argument ``i`` (positional; input/self is 0) or keyword ``name``."""
        if i < len(self.node.args):
            return self.node.args[i]
        return self.node.kwargs.get(name, default)

    def shape(self, value: Any) -> tuple[int, ...] | None:
        return _shape_of(self.gm, value)

    @property
    def out_numel(self) -> int:
        return math.prod(_shape_of(self.gm, self.node) or ())

    @property
    def in_numel(self) -> int:
        return math.prod(self.shape(self.arg(0, "input")) or ())


# conv -------------------------------------------------------------------------


@cost_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, kind="conv")
def _conv_module(c: OpCall) -> tuple[int, int]:  # out_elems * (C_in/groups) * prod(kernel)
    m = c.module
    return c.out_numel * (m.in_channels // m.groups) * math.prod(m.kernel_size), 0


@cost_rule(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, kind="conv")
def _conv_fn(c: OpCall) -> tuple[int, int]:  # out_elems * prod(weight[1:]) = out * C_in/g * prod(k)
    return c.out_numel * math.prod(c.shape(c.arg(1, "weight"))[1:]), 0


@cost_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, kind="conv")
def _conv_t_module(c: OpCall) -> tuple[int, int]:  # in_elems * (C_out/groups) * prod(kernel)
    m = c.module
    return c.in_numel * (m.out_channels // m.groups) * math.prod(m.kernel_size), 0


@cost_rule(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, kind="conv")
def _conv_t_fn(c: OpCall) -> tuple[int, int]:  # in_elems * prod(weight[1:]) = in * C_out/g * prod(k)
    return c.in_numel * math.prod(c.shape(c.arg(1, "weight"))[1:]), 0


# linear / matmul --------------------------------------------------------------


@cost_rule(nn.Linear, kind="linear")
def _linear_module(c: OpCall) -> tuple[int, int]:  # out_elems * in_features
    return c.out_numel * c.module.in_features, 0


@cost_rule(F.linear, kind="linear")
def _linear_fn(c: OpCall) -> tuple[int, int]:  # out_elems * weight.shape[-1] (in_features)
    return c.out_numel * c.shape(c.arg(1, "weight"))[-1], 0


@cost_rule(torch.matmul, torch.mm, torch.bmm, operator.matmul, "matmul", "mm", "bmm", kind="linear")
def _matmul(c: OpCall) -> tuple[int, int]:  # out_elems * K, K = a.shape[-1]
    return c.out_numel * c.shape(c.arg(0, "input"))[-1], 0


@cost_rule(torch.addmm, torch.baddbmm, "addmm", "baddbmm", kind="linear")
def _addmm(c: OpCall) -> tuple[int, int]:  # out_elems * K, K = mat1.shape[-1] (addend free)
    return c.out_numel * c.shape(c.arg(1, "mat1"))[-1], 0


# norm -------------------------------------------------------------------------

_NORM_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.LayerNorm, nn.GroupNorm,
)  # fmt: skip


@cost_rule(*_NORM_MODULES, kind="norm")
def _norm_module(c: OpCall) -> tuple[int, int]:  # elems * (2 if affine else 1)
    return 0, c.out_numel * (2 if getattr(c.module, "weight", None) is not None else 1)


@cost_rule(F.batch_norm, F.instance_norm, kind="norm")
def _bn_fn(c: OpCall) -> tuple[int, int]:  # elems * (2 if weight (arg 3) else 1)
    return 0, c.out_numel * (2 if c.arg(3, "weight") is not None else 1)


@cost_rule(F.layer_norm, F.group_norm, torch.layer_norm, torch.group_norm, kind="norm")
def _ln_fn(c: OpCall) -> tuple[int, int]:  # elems * (2 if weight (arg 2) else 1)
    return 0, c.out_numel * (2 if c.arg(2, "weight") is not None else 1)


# activation -------------------------------------------------------------------

_ACT_NAMES = (
    "relu", "relu6", "silu", "gelu", "hardswish", "hardsigmoid", "sigmoid", "tanh",
    "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "hardtanh", "prelu",
    "softmax", "log_softmax",
)  # fmt: skip
_ACT_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus,
    nn.Hardtanh, nn.PReLU, nn.Softmax, nn.LogSoftmax,
)  # fmt: skip
_ACT_FUNCTIONS = tuple(
    f
    for name in _ACT_NAMES
    for ns in (F, torch, torch._C._nn)
    for f in (getattr(ns, name, None), getattr(ns, name + "_", None))
    if f is not None
)
_ACT_METHODS = tuple(
    m for name in _ACT_NAMES for m in (name, name + "_") if hasattr(torch.Tensor, m)
) + ("clamp", "clamp_", "clamp_min", "clamp_min_")


@cost_rule(*_ACT_MODULES, *_ACT_FUNCTIONS, *_ACT_METHODS, torch.clamp, kind="activation")
def _activation(c: OpCall) -> tuple[int, int]:  # 1 per output element
    return 0, c.out_numel


# pool -------------------------------------------------------------------------

_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d,
)  # fmt: skip
_POOL_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.lp_pool1d, F.lp_pool2d,
    torch.max_pool1d, torch.max_pool2d, torch.max_pool3d,
)  # fmt: skip


@cost_rule(*_POOL_MODULES, *_POOL_FUNCTIONS, kind="pool")
def _pool(c: OpCall) -> tuple[int, int]:  # 1 per input element
    return 0, c.in_numel


# elementwise ------------------------------------------------------------------

_EW_NAMES = ("add", "sub", "mul", "div", "true_divide")


@cost_rule(
    operator.add, operator.sub, operator.mul, operator.truediv,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    *(getattr(torch, n) for n in _EW_NAMES),
    *(m for n in _EW_NAMES for m in (n, n + "_")),
    kind="elementwise",
)  # fmt: skip
def _elementwise(c: OpCall) -> tuple[int, int]:  # 1 per output element (after broadcast)
    return 0, c.out_numel


# ------------------------------------------------------------------ evaluation


def _leaf_meta(meta: Any) -> Any:
    """First TensorMetadata in a (possibly nested) tensor_meta value."""
    if isinstance(meta, (list, tuple)) and not hasattr(meta, "shape"):
        for m in meta:
            leaf = _leaf_meta(m)
            if leaf is not None:
                return leaf
        return None
    if isinstance(meta, Mapping):
        return _leaf_meta(list(meta.values()))
    return meta if hasattr(meta, "shape") else None


def _shape_of(gm: torch.fx.GraphModule, value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.fx.Node):
        leaf = _leaf_meta(value.meta.get("tensor_meta"))
        if leaf is not None:
            return tuple(leaf.shape)
        if value.op == "get_attr":
            value = fetch_attr(gm, value.target)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _has_tensor(node: torch.fx.Node) -> bool:
    return _leaf_meta(node.meta.get("tensor_meta")) is not None


def _rule_for(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[_Rule | None, nn.Module | None]:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        rule = next((COST_RULES[t] for t in type(module).__mro__ if t in COST_RULES), None)
        return rule, module
    if node.op in ("call_function", "call_method"):
        try:
            return COST_RULES.get(node.target), None
        except TypeError:  # unhashable target
            return None, None
    return None, None


def _is_costed(node: torch.fx.Node) -> bool:
    return node.op in ("call_module", "call_function", "call_method") and _has_tensor(node)


def _attr_param(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor | None:
    """The tensor a get_attr node fetches, unless it is a registered buffer."""
    owner_path, _, name = node.target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if name in getattr(owner, "_buffers", {}):
        return None
    obj = getattr(owner, name, None)
    return obj if isinstance(obj, torch.Tensor) else None


def _params_by_node(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Parameter count owned by each costed node; each tensor counted once."""
    claims: dict[str, list[torch.Tensor]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or (t := _attr_param(gm, node)) is None:
            continue
        users = [u for u in node.users if _is_costed(u)]  # insertion (= graph) order
        main = [u for u in users if getattr(_rule_for(gm, u)[0], "kind", None) in ("conv", "linear")]
        if owner := (main or users or [None])[0]:
            claims.setdefault(owner.name, []).append(t)

    seen: set[int] = set()
    result: dict[str, int] = {}
    for node in gm.graph.nodes:
        if not _is_costed(node):
            continue
        tensors = list(claims.get(node.name, ()))
        if node.op == "call_module":
            tensors += list(gm.get_submodule(node.target).parameters())
        count = 0
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                count += t.numel()
        result[node.name] = count
    return result


def _cost(gm: torch.fx.GraphModule, node: torch.fx.Node, params: Mapping[str, int]) -> Cost | None:
    if not _is_costed(node):
        return None
    rule, module = _rule_for(gm, node)
    if rule is None:
        return Cost(params.get(node.name, 0), 0, 0, "other")
    macs, extra = rule.fn(OpCall(gm, node, module))
    return Cost(params.get(node.name, 0), int(macs), int(extra), rule.kind)


def node_cost(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Cost | None:
    """Cost of one node; ``None`` for placeholder/get_attr/output and non-tensor nodes.

    Parameter ownership is a whole-graph property (each parameter counted once),
    so this walks the graph; use :func:`model_cost` for all nodes at once.
    """
    return _cost(gm, node, _params_by_node(gm))


def model_cost(gm: torch.fx.GraphModule) -> dict[str, Cost]:
    """``node.name -> Cost`` for every node that has a cost, in graph order."""
    nodes = list(gm.graph.nodes)
    if any(n.op != "output" for n in nodes) and not any("tensor_meta" in n.meta for n in nodes):
        raise ValueError("no node carries meta['tensor_meta']; run torch.fx.passes.shape_prop.ShapeProp first")
    params = _params_by_node(gm)
    costs = {n.name: _cost(gm, n, params) for n in nodes}
    return {name: c for name, c in costs.items() if c is not None}


def total(costs: Mapping[str, Cost] | Iterable[Cost]) -> Cost:
    """Field-wise sum of costs (a ``model_cost`` dict or any iterable), kind ``"total"``."""
    values = list(costs.values() if isinstance(costs, Mapping) else costs)
    return Cost(
        params=sum(c.params for c in values),
        macs=sum(c.macs for c in values),
        extra_macs=sum(c.extra_macs for c in values),
        kind="total",
    )
