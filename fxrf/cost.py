"""Shape-only cost model (parameters and multiply-accumulates) for torch.fx graphs.

Every number is derived from the shapes that
:class:`torch.fx.passes.shape_prop.ShapeProp` leaves in ``node.meta["tensor_meta"]``
and from module attributes; nothing is executed, so graphs whose parameters live
on the ``meta`` device are fine.

Conventions
-----------
``macs`` (main ops): multiply-accumulates. fvcore's ``FlopCountAnalysis``
counts one multiply-accumulate as one "flop" and ptflops prints "MACs", so
both report ``macs`` as they are;
:class:`torch.utils.flop_counter.FlopCounterMode` counts ``FLOPs = 2 * macs``:

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

Ops the op table does not know at all (an ``nn.MultiheadAttention`` leaf,
``F.scaled_dot_product_attention``, a custom op) are run once on meta tensors
under torch's :class:`~torch.utils.flop_counter.FlopCounterMode`, and get
``macs = flops / 2``, ``kind = "other"``, ``source = "flop_counter"``; where it
cannot run them or counts nothing, ``source = "none"`` and :func:`uncounted`
lists them. Ops the table knows without a cost rule (views, casts, cat,
dropout, ...) are free: ``macs = extra_macs = 0``, ``kind = "other"``.
``params`` always counts what the node owns (e.g. an ``nn.Embedding``).
The rules are the ``cost`` of each op in the op table (:mod:`fxrf.ops`, one
registration per op kind with its shape and receptive-field rules); module
classes are looked up along the MRO, so subclasses inherit a rule.

Example:

>>> import torch, torch.fx
>>> from torch.fx.passes.shape_prop import ShapeProp
>>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()))
>>> _ = ShapeProp(gm).propagate(torch.zeros(1, 3, 6, 6))
>>> costs = model_cost(gm)
>>> costs["_0"]          # 4*4*8 outputs * 3 * 9
Cost(params=224, macs=3456, extra_macs=0, kind='conv', source='rule')
>>> total(costs)         # + 1 per ReLU output element (128)
Cost(params=224, macs=3456, extra_macs=128, kind='total', source='rule')
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from .ops import KINDS, Call, Op, OpTable, TMeta, default_table
from .shapes import fetch_attr

__all__ = ["Cost", "KINDS", "node_cost", "model_cost", "params_by_node", "as_meta", "total", "uncounted"]


@dataclass(frozen=True)
class Cost:
    params: int  # parameters owned by this node
    macs: int  # multiply-accumulates of the main op (conv, linear, matmul)
    extra_macs: int  # cheap ops: norm, activation, pooling, elementwise
    kind: str  # one of KINDS, or "total" for a sum
    source: str = "rule"  # "rule" (the op table), "flop_counter" (FlopCounterMode fallback), "none" (uncounted)


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


def _rule_for(gm: torch.fx.GraphModule, node: torch.fx.Node, table: OpTable) -> tuple[Op | None, nn.Module | None]:
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    op = table.lookup(node, module)
    return (op if op is not None and op.cost is not None else None), module


def as_meta(gm: torch.fx.GraphModule, value: Any) -> Any:
    """A node argument as cost rules see it: tensors as TMeta (from tensor_meta, or the fetched constant)."""
    if isinstance(value, torch.fx.Node):
        shape = _shape_of(gm, value)
        if shape is None:
            return None
        leaf = _leaf_meta(value.meta.get("tensor_meta"))
        return TMeta(shape, getattr(leaf, "dtype", None))
    if isinstance(value, torch.Tensor):
        return TMeta(tuple(value.shape), value.dtype)
    return value


def _call(gm: torch.fx.GraphModule, node: torch.fx.Node, module) -> Call:
    args = torch.fx.node.map_aggregate(node.args, lambda v: as_meta(gm, v))
    kwargs = torch.fx.node.map_aggregate(node.kwargs, lambda v: as_meta(gm, v))
    return Call(node, module, tuple(args), dict(kwargs), out=as_meta(gm, node))


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


def params_by_node(gm: torch.fx.GraphModule, table: OpTable | None = None) -> dict[str, int]:
    """Parameter count owned by each costed node; each tensor counted once (a whole-graph walk: a caller costing
    many nodes of one graph passes it to `node_cost` once)."""
    table = default_table() if table is None else table
    claims: dict[str, list[torch.Tensor]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or (t := _attr_param(gm, node)) is None:
            continue
        users = [u for u in node.users if _is_costed(u)]  # insertion (= graph) order
        main = [u for u in users if getattr(_rule_for(gm, u, table)[0], "kind", None) in ("conv", "linear")]
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


def _meta_value(gm: torch.fx.GraphModule, value: Any) -> Any:
    """A node argument as a meta tensor (or a tuple of them); a node without a tensor value raises."""
    if isinstance(value, torch.fx.Node):
        meta = value.meta.get("tensor_meta")
        if meta is None and value.op == "get_attr":
            return _meta_value(gm, fetch_attr(gm, value.target))
        if meta is None:
            raise ValueError(f"no tensor_meta on {value.name}")
        one = lambda m: torch.empty(m.shape, dtype=m.dtype, device="meta") if hasattr(m, "shape") else m  # noqa: E731
        return one(meta) if hasattr(meta, "shape") else tuple(one(m) for m in meta)
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    return value


def _flop_counter_macs(gm: torch.fx.GraphModule, node: torch.fx.Node, module) -> int | None:
    """MACs of one op that has no cost rule: torch's FlopCounterMode over one run on meta tensors, flops / 2
    (None: the op could not run on meta tensors)."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        args = torch.fx.node.map_aggregate(node.args, lambda v: _meta_value(gm, v))
        kwargs = torch.fx.node.map_aggregate(node.kwargs, lambda v: _meta_value(gm, v))
        with FlopCounterMode(display=False) as counter:
            if module is not None:
                state = {k: torch.empty_like(v, device="meta") for k, v in
                         list(module.named_parameters()) + list(module.named_buffers())}
                torch.func.functional_call(module, state, tuple(args), dict(kwargs))
            elif node.op == "call_method":
                getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                node.target(*args, **kwargs)
    except Exception:  # an op that needs real data (.item(), data-dependent shapes): not counted, listed
        return None
    return counter.get_total_flops() // 2


def _cost(gm: torch.fx.GraphModule, node: torch.fx.Node, params: Mapping[str, int], table: OpTable) -> Cost | None:
    if not _is_costed(node):
        return None
    op, module = _rule_for(gm, node, table)
    if op is None:
        if table.lookup(node, module) is not None:  # known and free (a view, a cast, cat, dropout, ...)
            return Cost(params.get(node.name, 0), 0, 0, "other")
        macs = _flop_counter_macs(gm, node, module)
        return Cost(params.get(node.name, 0), macs or 0, 0, "other",
                    "flop_counter" if macs else "none")
    macs, extra = op.cost(_call(gm, node, module))
    return Cost(params.get(node.name, 0), int(macs), int(extra), op.kind)


def node_cost(gm: torch.fx.GraphModule, node: torch.fx.Node, table: OpTable | None = None,
              params: Mapping[str, int] | None = None) -> Cost | None:
    """Cost of one node; ``None`` for placeholder/get_attr/output and non-tensor nodes.

    Parameter ownership is a whole-graph property (each parameter counted once), so without `params` (the
    counts by node, :func:`params_by_node`) this walks the graph; use :func:`model_cost` for all nodes at once.
    """
    table = table or default_table()
    return _cost(gm, node, params_by_node(gm, table) if params is None else params, table)


def model_cost(gm: torch.fx.GraphModule, table: OpTable | None = None) -> dict[str, Cost]:
    """``node.name -> Cost`` for every node that has a cost, in graph order."""
    nodes = list(gm.graph.nodes)
    if any(n.op != "output" for n in nodes) and not any("tensor_meta" in n.meta for n in nodes):
        raise ValueError("no node carries meta['tensor_meta']; run torch.fx.passes.shape_prop.ShapeProp first")
    table = table or default_table()
    params = params_by_node(gm, table)
    costs = {n.name: _cost(gm, n, params, table) for n in nodes}
    return {name: c for name, c in costs.items() if c is not None}


def uncounted(costs: Mapping[str, Cost]) -> list[str]:
    """Names of the nodes whose MACs neither a cost rule nor FlopCounterMode could count."""
    return [name for name, c in costs.items() if c.source == "none"]


def total(costs: Mapping[str, Cost] | Iterable[Cost]) -> Cost:
    """Field-wise sum of costs (a ``model_cost`` dict or any iterable), kind ``"total"``."""
    values = list(costs.values() if isinstance(costs, Mapping) else costs)
    return Cost(
        params=sum(c.params for c in values),
        macs=sum(c.macs for c in values),
        extra_macs=sum(c.extra_macs for c in values),
        kind="total",
    )
