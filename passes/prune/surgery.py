"""Removing channel classes from modules, on a copy: output rows of producers, input columns of the convs and
linears that read them, entries of the norms on their way, whole groups of depthwise convs.

`remove` works on any module tree whose paths are the ones the classes name (the user's model when it was captured
by torch.fx, the private GraphModule otherwise). `zeroed` is the oracle the pruner checks itself against: the
original with every input column that reads a removed channel set to zero computes exactly what the pruned model
computes, since a removed channel then reaches nothing (it reaches no output and no op that mixes channels:
those channels are frozen).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn

from fxrf.errors import FxrfError

from .groups import Groups


def removal(groups: Groups, classes) -> dict:
    """{module path: {"out": sorted indices, "in": sorted indices}} for removing `classes`."""
    out: dict = defaultdict(lambda: {"out": set(), "in": set()})
    for c in classes:
        for path, role, i in groups.members[c]:
            out[path][role].add(i)
    return {p: {k: sorted(v) for k, v in d.items()} for p, d in out.items()}


def _keep(n: int, drop) -> list:
    d = set(drop)
    return [i for i in range(n) if i not in d]


def _param(old: nn.Parameter | None, new: torch.Tensor | None):
    if old is None:
        return None
    return nn.Parameter(new.detach().clone(), requires_grad=old.requires_grad)


@torch.no_grad()
def remove(root: nn.Module, groups: Groups, cut: dict) -> None:
    """Slice `root`'s modules (in place: give it a copy) as `cut` (from `removal`) says."""
    for path, d in cut.items():
        use = groups.uses.get(path)
        if use is None:
            raise FxrfError(f"fxrf.prune: {path} has channels to remove but no slicing rule (a bug in fxrf)")
        if use.kind == "attr":
            _attribute(root, path, d["in"])
            continue
        m = root.get_submodule(path)
        if use.kind == "conv":
            _conv(m, d["out"], d["in"])
        elif use.kind == "linear":
            ko, ki = _keep(m.out_features, d["out"]), _keep(m.in_features, d["in"])
            m.weight = _param(m.weight, m.weight[ko][:, ki])
            m.bias = _param(m.bias, None if m.bias is None else m.bias[ko])
            m.out_features, m.in_features = len(ko), len(ki)
        elif use.kind == "dw":
            _depthwise(m, d["in"])
        elif use.kind in ("norm", "prelu"):
            keep = _keep(len(m.weight) if use.kind == "prelu" else m.num_features, d["in"])
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter):
                    setattr(m, name, _param(p, p[keep]))
            for name in ("running_mean", "running_var"):
                b = getattr(m, name, None)
                if b is not None:
                    setattr(m, name, b[keep].clone())
            if use.kind == "prelu":
                m.num_parameters = len(keep)
            else:
                m.num_features = len(keep)


def owner(path: str) -> tuple[str, str]:
    """(module path, attribute name) of a tensor's path."""
    mod, _, name = path.rpartition(".")
    return mod, name


def _attribute(root: nn.Module, path: str, drop) -> None:
    mod_path, name = owner(path)
    m = root.get_submodule(mod_path)
    t = getattr(m, name)
    keep = _keep(len(t), drop)
    setattr(m, name, _param(t, t[keep]) if isinstance(t, nn.Parameter) else t[keep].clone())
    if isinstance(m, nn.modules.batchnorm._BatchNorm):  # its constructor argument, read back by a plan
        m.num_features = len(keep)


def _conv(m: nn.Module, drop_out, drop_in) -> None:
    g = m.groups
    n_in, n_out = m.in_channels // g, m.out_channels // g
    within = sorted({j % n_in for j in drop_in})
    if set(drop_in) != {k * n_in + i for k in range(g) for i in within}:
        raise FxrfError(f"fxrf.prune: the input channels removed from a conv of {g} groups differ between groups "
                        f"(a bug in fxrf)")
    if g > 1 and set(drop_out) != {k * n_out + i for k in range(g) for i in sorted({o % n_out for o in drop_out})}:
        raise FxrfError(f"fxrf.prune: the output channels removed from a conv of {g} groups differ between groups "
                        f"(a bug in fxrf)")
    ko, ki = _keep(m.out_channels, drop_out), _keep(n_in, within)
    m.weight = _param(m.weight, m.weight[ko][:, ki])
    m.bias = _param(m.bias, None if m.bias is None else m.bias[ko])
    m.out_channels, m.in_channels = len(ko), len(ki) * g


def _depthwise(m: nn.Module, drop_groups) -> None:
    mult = m.out_channels // m.groups
    keep = _keep(m.groups, drop_groups)
    rows = [k * mult + i for k in keep for i in range(mult)]
    m.weight = _param(m.weight, m.weight[rows])
    m.bias = _param(m.bias, None if m.bias is None else m.bias[rows])
    m.in_channels = m.groups = len(keep)
    m.out_channels = len(keep) * mult


@torch.no_grad()
def zero_readers(root: nn.Module, groups: Groups, cut: dict) -> None:
    """Set to zero (in place: give it a copy) every input column of a conv or linear that reads a removed channel."""
    for path, d in cut.items():
        use = groups.uses.get(path)
        if use is None or use.kind not in ("conv", "linear") or not d["in"]:
            continue
        m = root.get_submodule(path)
        w = m.weight
        if use.kind == "linear":
            w[:, d["in"]] = 0
            continue
        g = m.groups
        n_in, n_out = m.in_channels // g, m.out_channels // g
        for j in d["in"]:
            k, i = divmod(j, n_in)
            w[k * n_out:(k + 1) * n_out, i] = 0
