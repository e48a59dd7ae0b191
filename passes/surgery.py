"""Graph surgery the passes share: insert a chain of calls after a node, erase a chain and reconnect its consumers,
find a free attribute name for new modules. Each edits the GraphModule it is given (a pass's private copy or a
trial copy), never a user's model.

    >>> import torch, torch.nn as nn, fxrf
    >>> gm = fxrf.trace(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), (1, 3, 4, 4))
    >>> conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    >>> prefix = free_prefix(gm, "extra"); add_modules(gm, prefix, {"act": nn.Tanh()}, training=False)
    >>> [n.name for n in insert_after(gm, conv, [("call_module", f"{prefix}.act", (), {})])]
    ['extra1_act']
    >>> [n.target for n in gm.graph.nodes if n.op == "call_module"]
    ['0', 'extra1.act', '1']
    >>> act = next(n for n in gm.graph.nodes if n.target == "extra1.act"); erase_chain(gm, [act], conv)
    >>> [n.target for n in gm.graph.nodes if n.op == "call_module"]
    ['0', '1']
"""
from __future__ import annotations

import torch.fx as fx

__all__ = ["free_prefix", "add_modules", "insert_after", "erase_chain"]


def free_prefix(gm: fx.GraphModule, stem: str) -> str:
    """`stem` + the first k >= 1 that is not yet an attribute of `gm` (a path for new modules)."""
    k = 1
    while hasattr(gm, f"{stem}{k}"):
        k += 1
    return f"{stem}{k}"


def add_modules(gm: fx.GraphModule, prefix: str, modules: dict, *, training: bool) -> None:
    """Register `modules` ({name: module}) under `prefix`, whose container (new) gets the mode `training`."""
    for name, module in modules.items():
        gm.add_submodule(f"{prefix}.{name}", module)
    gm.get_submodule(prefix).training = training  # add_submodule made the container in training mode


def insert_after(gm: fx.GraphModule, point: fx.Node, calls: list) -> list:
    """Insert a chain of calls right after `point`, each reading the one before (the first reads `point`) as its
    first argument; `point`'s consumers read the chain's last node instead. calls: (op, target, args after the
    input, kwargs) each. Returns the new nodes, in order; the code is regenerated."""
    graph = gm.graph
    consumers = list(point.users)
    nodes = []
    x = point
    # inserting_after(point) would put every new node right after `point`, i.e. in reverse order
    with graph.inserting_before(point.next):
        for op, target, args, kwargs in calls:
            nodes.append(x := graph.create_node(op, target, (x, *args), dict(kwargs)))
    for u in consumers:
        u.replace_input_with(point, x)
    gm.recompile()
    return nodes


def erase_chain(gm: fx.GraphModule, chain: list, source: fx.Node) -> None:
    """Erase `chain` (nodes in order, each used only by the next): the last one's consumers read `source` instead."""
    chain[-1].replace_all_uses_with(source)
    for n in reversed(chain):  # consumers before producers
        gm.graph.erase_node(n)

