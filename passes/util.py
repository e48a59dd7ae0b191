"""What every pass needs, written once: copying a GraphModule, reading a get_attr target, counting module calls,
walking a chain of single-user nodes, reading the norm and activation that follow a conv, and building a norm
that passes its input through.

    >>> import torch, torch.nn as nn, fxrf
    >>> gm = fxrf.trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()), (1, 3, 8, 8))
    >>> modules = dict(gm.named_modules())
    >>> conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    >>> [n.name for n in chain(conv, lambda n: n.op == "call_module")[0]]
    ['_1', '_2']
    >>> t = conv_template(conv, modules); type(t.norm).__name__, type(t.act).__name__
    ('BatchNorm2d', 'ReLU')
    >>> bn = identity_norm(t.norm, 8).eval(); x = torch.randn(2, 8, 4, 4)
    >>> torch.allclose(bn(x), x)
    True
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxrf.ops import default_table
from fxrf.shapes import fetch_attr
from fxrf.trace import keep_modes  # noqa: F401  (the passes' copies use it; defined where capture needs it)

__all__ = ["copy_graph_module", "keep_modes", "fetch_attr", "module_of", "call_counts", "sole_user", "chain",
           "norm_of", "is_norm", "running_norm", "Activation", "activation", "activation_of", "Template",
           "conv_template", "identity_norm"]

# ------------------------------------------------------------------------------------------------ copying a graph


def copy_graph_module(gm: fx.GraphModule, *, params: str = "copy", class_name: str | None = None) -> fx.GraphModule:
    """A new GraphModule with its own graph, whose modules and parameters are

    - "copy": deep copies (nothing is shared with `gm`: a pass's private copy);
    - "meta": deep copies whose parameters are empty meta tensors (buffers, which an analysis may read, stay real):
      a skeleton to analyse candidate rewrites on without paying for their weights;
    - "shared": `gm`'s own (a trial graph or a renamed module over the same weights).

    The result is a plain fx.GraphModule named `class_name` (default: `gm`'s class name), each of its modules in the
    mode of `gm`'s module at the same path (`keep_modes`).
    """
    if params not in ("copy", "meta", "shared"):
        raise ValueError(f"params must be 'copy', 'meta' or 'shared', got {params!r}")
    name = class_name or gm.__class__.__name__
    if params == "shared":
        from . import shared_copy  # the package's own, which the torch.compile backend uses too
        return shared_copy(gm, name)[0]
    memo = {}
    if params == "meta":
        memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in gm.parameters()}
    memo.update(_derived_tensors(gm, meta=params == "meta"))
    gm = copy.deepcopy(gm, memo)
    if type(gm).__mro__[1] is not fx.GraphModule or class_name is not None:  # fxrf.trace's lazily compiled kind:
        gm = keep_modes(fx.GraphModule(gm, gm.graph, name), gm)  # results get a plain one, which every torch
    return gm  # version saves and loads


def _derived_tensors(root: nn.Module, meta: bool) -> dict:
    """deepcopy memo entries for tensors that modules hold as plain attributes computed from their parameters,
    such as the `weight` of torch.nn.utils.weight_norm (the old form: a forward pre-hook recomputes it from
    weight_g and weight_v on every call). deepcopy refuses such non-leaf tensors; the copy gets the value detached
    (recomputed from the parameters where the hook can), which its own hook replaces on its first call."""
    from torch.nn.utils.weight_norm import WeightNorm

    memo = {}
    for m in root.modules():
        hooks = {h.name: h for h in m._forward_pre_hooks.values() if isinstance(h, WeightNorm)}
        for key, value in vars(m).items():
            if not isinstance(value, torch.Tensor) or value.is_leaf or id(value) in memo:
                continue
            with torch.no_grad():
                fresh = hooks[key].compute_weight(m) if key in hooks and not meta else value.detach()
            memo[id(value)] = torch.empty_like(fresh, device="meta") if meta else fresh.clone()
    return memo


# --------------------------------------------------------------------------------------------------- reading nodes


def module_of(node: fx.Node, modules: dict) -> nn.Module | None:
    """The module a call_module node calls (`modules`: dict(gm.named_modules())), None for other nodes."""
    return modules.get(node.target) if node.op == "call_module" else None


def call_counts(gm: fx.GraphModule) -> dict:
    """{module path: how many call_module nodes call it} (a module called twice shares its weights)."""
    counts: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


def sole_user(node: fx.Node) -> fx.Node | None:
    """The node's only user, None if it has none or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def chain(node: fx.Node, accept: Callable[[fx.Node], bool], *, forward: bool = True) -> tuple[list, fx.Node | None]:
    """(chain, stop): the single-user chain next to `node`, and the node where it stopped.

    forward: the nodes after `node`, each the only user of the one before, while `accept(n)`; `stop` is the node
    after the chain (the only user of its last node, or of `node`; None where that node has no or several users).
    backward: the producers before `node` through first arguments, each used only by the node after it, while
    `accept(n)`; `stop` is the first producer not taken.
    """
    out: list = []
    if forward:
        cur = node
        while (nxt := sole_user(cur)) is not None and accept(nxt):
            out.append(nxt)
            cur = nxt
        return out, sole_user(cur)
    n = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    while n is not None and len(n.users) == 1 and accept(n):
        out.append(n)
        n = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    return out, n


# -------------------------------------------------------------------------------- conv -> norm -> activation

def norm_of(node: fx.Node, modules: dict) -> nn.Module | None:
    """The batch or instance norm module the node calls, else None."""
    m = module_of(node, modules)
    return m if isinstance(m, nn.modules.batchnorm._NormBase) else None


def is_norm(node: fx.Node, modules: dict) -> bool:
    """Whether the node normalises: a batch, layer, group or instance norm, as a module or a function."""
    m = module_of(node, modules)
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                      nn.modules.instancenorm._InstanceNorm)):
        return True
    return node.op == "call_function" and node.target in (F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm)


def running_norm(node: fx.Node, modules: dict) -> nn.Module | None:
    """The batch norm module the node calls if it keeps running statistics (a template for `identity_norm`, which
    can start as the identity), else None."""
    m = module_of(node, modules)
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_var is not None:
        return m
    return None


@dataclass(frozen=True, eq=False)
class Activation:
    """An activation call as a plain description: what repeating it after another node needs.

    The node's op and target, its arguments after the input, its module (call_module) and the op table's entry
    (`traits`: "idempotent" where act(act(x)) == act(x); `module_class`: the op's module form, if it has one)."""

    op: str  # "call_module" | "call_function" | "call_method"
    target: Any
    args: tuple  # the arguments after the input
    kwargs: dict
    module: nn.Module | None
    traits: frozenset
    module_class: type | None

    @property
    def idempotent(self) -> bool:
        return "idempotent" in self.traits

    @property
    def repeatable(self) -> bool:
        """Whether the call can be written after another node as is: no argument is computed in the graph."""
        return self.module is not None or not any(isinstance(v, fx.Node) for v in (*self.args, *self.kwargs.values()))


def activation(node: fx.Node, modules: dict) -> Activation | None:
    """The activation the node applies (the op table's "activation" trait), described; None if it is none."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    m = module_of(node, modules)
    op = default_table().lookup(node, m)
    if op is None or "activation" not in op.traits:
        return None
    return Activation(node.op, node.target, tuple(node.args[1:]), dict(node.kwargs), m, op.traits, op.module_class)


def activation_of(node: fx.Node, modules: dict) -> nn.Module | None:
    """The activation the node applies: its module, or a fresh module for a functional form (F.relu -> nn.ReLU());
    None if the op table does not list it as a per-element activation with a module form."""
    act = activation(node, modules)
    if act is None or "per_element" not in act.traits:
        return None
    if act.module is not None:
        return act.module
    return act.module_class() if act.module_class is not None else None


@dataclass(frozen=True, eq=False)
class Template:
    """The norm and activation that follow a conv (module instances to copy; None: there is none)."""

    norm: nn.Module | None = None
    act: nn.Module | None = None


def conv_template(node: fx.Node, modules: dict) -> Template:
    """What follows the conv `node`: a norm if it is the conv's only user, then an activation if that is the norm's
    only user (or, without a norm, the conv's only user)."""
    after = sole_user(node)
    if after is None:
        return Template()
    norm = norm_of(after, modules)
    if norm is not None:
        after = sole_user(after)
    return Template(norm, activation_of(after, modules) if after is not None else None)


def identity_norm(template: nn.Module, channels: int, *, dims: int = 2, device=None, dtype=None) -> nn.Module:
    """A batch norm like `template` (its type, eps, momentum, affine; running statistics always tracked) for
    `channels` channels that passes its input through in eval mode: running mean 0, running variance 1 - eps, weight
    1, bias 0, so (x - 0) / sqrt((1 - eps) + eps) * 1 + 0 == x. The learnable parameters keep PyTorch's defaults;
    only the running statistics, which training replaces, encode the identity. A type whose constructor differs
    from nn.BatchNorm's gets nn.BatchNorm{dims}d."""
    kw = dict(eps=template.eps, momentum=template.momentum, affine=template.affine, track_running_stats=True,
              device=device, dtype=dtype)
    try:
        norm = type(template)(channels, **kw)
    except TypeError:
        norm = getattr(nn, f"BatchNorm{dims}d")(channels, **kw)
    with torch.no_grad():
        norm.running_mean.zero_()
        norm.running_var.fill_(1.0 - template.eps)
        if norm.affine:
            norm.weight.fill_(1.0)
            norm.bias.zero_()
    return norm
