"""Folding channel permutations into the weights of a neighbouring conv.

A node that only permutes channels (torch.roll along the channels, a channel shuffle, index_select with a constant
permutation) costs a copy at run time. It disappears when it can be pushed, through ops that act on each channel
separately (norms, activations, pools, depthwise convs: their per-channel parameters are permuted along), into

- the output channels of the conv that produces it: conv(x)[perm] is the conv with weight[perm], bias[perm]; or
- the input channels of the conv that consumes it: W . x[perm] = W' . x with W'[:, perm] = W.

A grouped conv takes a permutation only if it keeps every channel inside its group (group blocks are contiguous in
PyTorch). So a rotation between two grouped convs with only per-channel ops in between (DW+RPW after DW+RPW) can
never be folded: the producer's groups and the consumer's groups would both have to be contiguous in one channel
order while being shifted against each other. Those stay, and are counted.

    >>> import torch, torch.nn as nn, fxrf
    >>> class M(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.bn, self.b = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1, groups=2)
    ...     def forward(self, x):
    ...         return self.b(torch.roll(torch.relu(self.bn(self.a(x))), 3, 1))
    >>> m = M().eval(); x = torch.rand(1, 3, 8, 8)
    >>> r = fold_permutations(m, x)
    >>> r.summary["folded"], r.summary["remaining"], torch.allclose(r.graph_module(x), m(x), atol=1e-6)
    (1, 0, True)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from fxrf.ops import default_table
from fxrf.trace import trace

from . import PassResult, finish, private_copy
from .util import call_counts, chain, fetch_attr, module_of

# Ops that act on each channel on its own (parameters, if any, indexed by channel along dim 0) carry the op table's
# "per_channel" trait; ops that only move channels (roll, channel shuffle, index_select) "channel_permutation".


@dataclass(frozen=True)
class FoldChange:
    node: str  # the permutation node, gone from the graph
    op: str
    into: str  # the conv whose weights took it
    side: str  # "output channels of the producer" | "input channels of the consumer"
    through: tuple  # the per-channel nodes in between (their parameters were permuted too)


def fold_permutations(model: nn.Module, example_input, nodes=None) -> PassResult:
    """A copy of `model` with every channel permutation (or those named in `nodes`) folded where possible.

    Summary: permutations seen, folded, remaining (and the names of those that remain)."""
    return fold_in_place(private_copy(model, example_input), example_input, nodes)


def fold_in_place(gm: fx.GraphModule, example_input, nodes=None) -> PassResult:
    """`fold_permutations` on a GraphModule the caller owns (a pass's private copy): edits and returns it."""
    trace(gm, example_input)  # fresh shapes on every node (a GraphModule may come with new nodes)
    modules = dict(gm.named_modules())
    calls = call_counts(gm)
    changes, remaining, seen = [], [], 0
    for node in list(gm.graph.nodes):
        if nodes is not None and node.name not in nodes:
            continue
        perm = channel_permutation(gm, node, modules)
        if perm is None:
            continue
        seen += 1
        change = _fold_back(gm, node, perm, modules, calls) or _fold_forward(gm, node, perm, modules, calls)
        if change is None:
            remaining.append(node.name)
            continue
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        changes.append(change)
    finish(gm)
    return PassResult(gm, changes, {"permutations": seen, "folded": len(changes), "remaining": len(remaining),
                                    "remaining_nodes": remaining})


def _target_of(node):
    return node.target if node.op in ("call_function", "call_method") else None


def channel_permutation(gm: fx.GraphModule, node: fx.Node, modules: dict | None = None) -> torch.Tensor | None:
    """perm if `node` computes out[:, j] = in[:, perm[j]] on a 4-D map (probed on a tensor that numbers every
    element), else None."""
    modules = modules if modules is not None else dict(gm.named_modules())
    mod = module_of(node, modules)
    if node.op not in ("call_module", "call_function", "call_method") or \
            not default_table().has("channel_permutation", node, mod):
        return None
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    meta = node.args[0].meta.get("tensor_meta")
    if meta is None or len(meta.shape) != 4:
        return None
    c = int(meta.shape[1])
    probe = torch.arange(c * 6, dtype=torch.float64).reshape(1, c, 2, 3)

    def value(a):
        if isinstance(a, fx.Node):
            if a is node.args[0]:
                return probe
            if a.op == "get_attr":
                return fetch_attr(gm, a.target)
            raise LookupError
        return a

    try:
        args = fx.node.map_aggregate(node.args, lambda a: value(a) if isinstance(a, fx.Node) else a)
        kwargs = fx.node.map_aggregate(node.kwargs, lambda a: value(a) if isinstance(a, fx.Node) else a)
        if mod is not None:
            out = mod(*args, **kwargs)
        elif node.op == "call_method":
            out = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)
    except Exception:
        return None
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
        return None
    perm = (out[0, :, 0, 0] // 6).long()
    if not torch.equal(torch.sort(perm).values, torch.arange(c)) or not torch.equal(out, probe[:, perm]):
        return None
    return perm


def _per_channel(node, modules, calls) -> bool:
    """Acts on each channel separately, on one tensor input, and its module (if any) is called only here."""
    mod = module_of(node, modules)
    if mod is not None:
        stateful = any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False))
        if stateful and calls.get(node.target, 0) != 1:  # its parameters serve other calls too
            return False
        if isinstance(mod, nn.Conv2d):
            return mod.groups == mod.in_channels == mod.out_channels  # depthwise, one filter per channel
        return default_table().has("per_channel", node, mod)
    if node.op not in ("call_function", "call_method") or not default_table().has("per_channel", node):
        return False
    return len(node.all_input_nodes) == 1


def _reindex(mod: nn.Module, index: torch.Tensor, channels: int) -> None:
    """Permute every per-channel parameter and buffer of `mod` (dim 0 of size `channels`) by `index`."""
    with torch.no_grad():
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if t.dim() >= 1 and t.shape[0] == channels and not (isinstance(mod, nn.PReLU) and t.numel() == 1):
                t.copy_(t[index].clone())


def _block_preserving(perm: torch.Tensor, groups: int) -> bool:
    size = len(perm) // groups
    return bool((perm // size == torch.arange(len(perm)) // size).all())


def _fold_back(gm, node, perm, modules, calls) -> FoldChange | None:
    """Into the output channels of the conv that produces the permuted tensor."""
    through, n = chain(node, lambda m: _per_channel(m, modules, calls), forward=False)
    if n is None:
        return None
    prod = module_of(n, modules)
    if not (isinstance(prod, nn.Conv2d) and len(n.users) == 1 and calls.get(n.target) == 1):
        return None
    if prod.groups > 1 and not _block_preserving(perm, prod.groups):
        return None
    c = len(perm)
    for m in through:  # conv(x)[perm] -> per-channel ops with parameters p[perm]
        if module_of(m, modules) is not None:
            _reindex(module_of(m, modules), perm, c)
    _reindex(prod, perm, c)
    return FoldChange(node.name, _op(node, modules), n.target, "output channels of the producer",
                      tuple(m.name for m in through))


def _fold_forward(gm, node, perm, modules, calls) -> FoldChange | None:
    """Into the input channels of the conv (or linear, after a 1x1 map is flattened) that consumes it."""
    if len(node.users) != 1:
        return None
    through, n = chain(node, lambda m: _per_channel(m, modules, calls) or _flattens_1x1(m, modules, calls))
    if through and len(through[-1].users) != 1:  # its parameters (if any) and output serve more than this path:
        n = through.pop()  # it can only be the consumer
    if n is None:
        return None
    cons = module_of(n, modules)
    if calls.get(getattr(n, "target", None)) != 1 or n.args[0] is not (through[-1] if through else node):
        return None
    c = len(perm)
    inverse = torch.argsort(perm)
    if isinstance(cons, nn.Conv2d):
        if cons.groups > 1 and not _block_preserving(perm, cons.groups):
            return None
        size = cons.in_channels // cons.groups
        w = cons.weight
        with torch.no_grad():  # W'[o, perm[j]] = W[o, j], within each group
            new = w.clone()
            for g in range(cons.groups):
                rows = slice(g * (cons.out_channels // cons.groups), (g + 1) * (cons.out_channels // cons.groups))
                local = perm[g * size:(g + 1) * size] - g * size
                new[rows, local] = w[rows, :]
            w.copy_(new)
    elif isinstance(cons, nn.Linear) and cons.in_features == c:
        with torch.no_grad():
            cons.weight.copy_(cons.weight[:, inverse].clone())
    else:
        return None
    for m in through:  # per-channel ops now see unpermuted channels: p' = p[inverse]
        if module_of(m, modules) is not None:
            _reindex(module_of(m, modules), inverse, c)
    return FoldChange(node.name, _op(node, modules), n.target, "input channels of the consumer",
                      tuple(m.name for m in through))


def _flattens_1x1(node, modules, calls) -> bool:
    """torch.flatten(x, 1) / nn.Flatten of a map with one pixel: channel order is kept."""
    meta = node.args[0].meta.get("tensor_meta") if node.args and isinstance(node.args[0], fx.Node) else None
    if meta is None or len(meta.shape) != 4 or meta.shape[2] * meta.shape[3] != 1:
        return False
    mod = module_of(node, modules)
    if isinstance(mod, nn.Flatten):
        return mod.start_dim == 1 and calls.get(node.target) == 1
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return _target_of(node) in (torch.flatten, "flatten") and start == 1


def _op(node, modules) -> str:
    mod = module_of(node, modules)
    if mod is not None:
        return type(mod).__name__
    t = _target_of(node)
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))

