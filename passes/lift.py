"""Give an exported (ATen-level) graph its layers back as modules, so the rewrite passes can work on it.

torch.export records a conv as `aten.conv2d(x, weight, bias, stride, padding, dilation, groups)` with its
parameters read by get_attr nodes; the passes replace, insert and remove *modules* (`nn.Conv2d` and the batch
norm after it). `lift_modules` turns each such call into a `call_module` of a real `nn.Conv{1,2,3}d` /
`nn.BatchNorm{1,2,3}d` / `nn.Linear` that holds the very same parameter and buffer tensors, at the module path
export recorded for the call (`layer1.0.conv1`), so the graph computes exactly what it computed before.

    >>> import torch, torch.nn as nn, fxrf
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> gm = fxrf.trace(model, (1, 3, 8, 8), capture="export")
    >>> lifted = lift_modules(gm)
    >>> [(n.op, str(n.target)) for n in lifted.graph.nodes if n.op == "call_module"]
    [('call_module', '0'), ('call_module', '1')]
    >>> x = torch.randn(1, 3, 8, 8); torch.equal(lifted(x), model(x))
    True
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from fxrf.analysis import module_path
from fxrf.rules.base import tuple_of
from fxrf.shapes import fetch_attr

aten = torch.ops.aten
_CONVS = {aten.conv1d.default: nn.Conv1d, aten.conv2d.default: nn.Conv2d, aten.conv3d.default: nn.Conv3d}
_CONVS.update({getattr(aten, f"conv{d}d").padding: cls for d, cls in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d))
               if hasattr(getattr(aten, f"conv{d}d"), "padding")})
_NORMS = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def lift_modules(gm: fx.GraphModule) -> fx.GraphModule:
    """Edit `gm` in place (callers pass a private copy): conv, batch norm and linear calls whose parameters are
    get_attr constants become call_module nodes of the equivalent nn modules. Returns `gm`."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        made = _module_for(gm, node)
        if made is None:
            continue
        module, inputs = made
        path = _free_path(gm, module_path(node) or node.name, module)
        gm.add_submodule(path, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, (inputs,))
        new.meta.update({k: v for k, v in node.meta.items() if k != "from_node"})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _tensor(gm, v):
    """The tensor a get_attr argument holds (None for None; False: not a get_attr constant)."""
    if v is None:
        return None
    if isinstance(v, fx.Node) and v.op == "get_attr":
        t = fetch_attr(gm, v.target)
        return t if isinstance(t, torch.Tensor) else False
    return False


def _arg(node, i, name, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _module_for(gm, node):
    """(module, input node) equivalent to `node`, or None when it is not a liftable call."""
    t = node.target
    if t in _CONVS:
        w, b = _tensor(gm, _arg(node, 1, "weight")), _tensor(gm, _arg(node, 2, "bias"))
        if w is False or b is False or w is None:
            return None
        d = w.dim() - 2
        groups = _arg(node, 6, "groups", 1)
        pad = _arg(node, 4, "padding", 0)
        conv = _CONVS[t](w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=_arg(node, 3, "stride", 1),
                         padding=pad if isinstance(pad, str) else tuple_of(pad, d),
                         dilation=_arg(node, 5, "dilation", 1), groups=groups, bias=b is not None,
                         device="meta", dtype=w.dtype)
        _adopt(conv, weight=w, bias=b)
        return conv, node.args[0]
    if t is aten.linear.default:
        w, b = _tensor(gm, _arg(node, 1, "weight")), _tensor(gm, _arg(node, 2, "bias"))
        if w is False or b is False or w is None:
            return None
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
        _adopt(lin, weight=w, bias=b)
        return lin, node.args[0]
    if t is aten.batch_norm.default:
        x = node.args[0]
        rank = len(x.meta["val"].shape) if isinstance(x, fx.Node) and "val" in x.meta else None
        w, b, rm, rv = (_tensor(gm, _arg(node, i, n)) for i, n in
                        ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")))
        if rank not in _NORMS or any(v is False for v in (w, b, rm, rv)) or (rm is None) != (rv is None) \
                or (w is None) != (b is None) or (w is None and rm is None):
            return None
        c = (w if w is not None else rm).shape[0]
        bn = _NORMS[rank](c, eps=_arg(node, 7, "eps", 1e-5), momentum=_arg(node, 6, "momentum", 0.1),
                          affine=w is not None, track_running_stats=rm is not None, device="meta")
        _adopt(bn, weight=w, bias=b)
        if rm is not None:
            bn.running_mean, bn.running_var = rm, rv
            bn.num_batches_tracked = _counter(gm, node, rm)
        bn.train(bool(_arg(node, 5, "training", False)))
        return bn, x
    return None


def _adopt(module: nn.Module, **tensors) -> None:
    """Make `module` hold these very tensors (parameters stay the same Parameter objects)."""
    for name, t in tensors.items():
        if t is None:
            continue
        setattr(module, name, t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=t.requires_grad))


def _counter(gm, node, running_mean) -> torch.Tensor:
    """The batch norm's num_batches_tracked, if its original module kept one beside the running mean."""
    target = next(a.target for a in node.all_input_nodes if a.op == "get_attr" and
                  fetch_attr(gm, a.target) is running_mean)
    owner = gm.get_submodule(target.rpartition(".")[0]) if "." in target else gm
    t = getattr(owner, "num_batches_tracked", None)
    return t if isinstance(t, torch.Tensor) else torch.tensor(0, dtype=torch.long, device=running_mean.device)


def _free_path(gm, path: str, module: nn.Module) -> str:
    """`path` if nothing but this layer's own tensors lives there, else a fresh name next to it."""
    try:
        here = gm.get_submodule(path)
    except AttributeError:
        return path
    mine = {id(t) for t in list(module.parameters()) + list(module.buffers())}
    theirs = list(here.parameters(recurse=True)) + list(here.buffers(recurse=True))
    if not list(here.children()) and all(id(t) in mine or t.dim() == 0 for t in theirs) and \
            type(here) in (nn.Module, type(module)):
        return path
    i = 1
    while True:
        candidate = f"{path}_{i}" if path else f"layer_{i}"
        try:
            gm.get_submodule(candidate)
        except AttributeError:
            return candidate
        i += 1
