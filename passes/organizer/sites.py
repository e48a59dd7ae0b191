"""Where one more conv can go in a stage, and what it is: the stage's topology (its maps, the cut points all of
its data flows through, its last block) and the conv -> norm -> activation pattern the new conv copies."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from fxrf.analysis import Analysis, Stage

from ..util import Activation, activation, is_norm, running_norm

__all__ = ["Site", "sites"]


@dataclass(frozen=True)
class Site:
    """Where and what to insert in one stage: after node `point`, conv(+norm)(+act) of `width` channels."""

    stage: int
    point: str
    width: int
    dims: int
    kernel: int
    bias: bool
    norm: nn.Module | None  # a batch norm to copy the hyper-parameters of
    act: Activation | None  # the idempotent activation to repeat after the conv
    dtype: torch.dtype
    device: torch.device
    note: str  # what of the stage's pattern was left out to stay exact, if anything
    training: bool  # the model's mode, for the new modules
    shape: tuple = ()  # the new conv's input: `point`'s output shape

    def conv(self, device: torch.device) -> nn.Module:
        """The conv this site inserts (width to width, same size), uninitialised."""
        return getattr(nn, f"Conv{self.dims}d")(self.width, self.width, self.kernel, padding=self.kernel // 2,
                                                bias=self.bias, device=device, dtype=self.dtype)


@dataclass(frozen=True)
class _StageNodes:
    """One stage's nodes as the site search reads them."""

    a: Analysis
    stage: Stage
    rec: dict  # {node name: NodeRecord}
    convs: list  # the stage's conv nodes, in graph order
    modules: dict


def sites(a: Analysis, stage: Stage, kernel_size: int | None) -> dict:
    """{place: Site or the reason there is none} for one more conv in `stage`, at two places:

    "end": after the last node that all of the stage's data flows through (after the last block);
    "branch": inside the last block, after the activation that feeds its last conv (the latest activation before
    "end" that is not such a cut point: a residual branch), where the block may be narrower and the conv cheaper.
    """
    gm = a.graph_module
    rec = {r.name: r for r in a.records}
    members = [n for n in gm.graph.nodes if n.name in rec and rec[n.name].stage == stage.index
               and n.op != "get_attr"]
    convs = [n for n in members if rec[n.name].kernel is not None]
    if not convs:
        return {"end": "the stage holds no conv to take the pattern from"}
    maps = {n for n in members if _is_map(rec[n.name], stage)}
    inside = maps | _returning({n for n in members if n not in maps}, maps)  # + gates (SE) that come back
    exits = [n for n in members if n in maps and any(u not in inside for u in n.users)]  # graph order: not a set's
    if not exits:
        return {"end": "no value of the stage is used after it"}
    view = _StageNodes(a, stage, rec, convs, a._modules)
    candidates = [n for n in reversed(members) if n in maps and _channels_first(rec[n.name], stage)]
    cuts = _Cuts(exits, inside)  # asked lazily: the search stops near the stage's end (_is_cut walks the stage)
    end = next((p for p in candidates if cuts[p]), None)
    last_block = []  # the branch nodes after the last fork (a cut point with several users) before `end`
    for q in candidates[candidates.index(end) + 1:] if end is not None else []:
        if cuts[q] and len(q.users) > 1:
            break
        if not cuts[q]:
            last_block.append(q)
    branch = next((q for q in last_block if activation(q, view.modules) is not None and len(q.users) == 1
                   and rec[next(iter(q.users)).name].kernel is not None), None)
    out = {"end": (f"no single channels-first node carries all of the stage's outputs "
                   f"({', '.join(n.name for n in exits[:4])}{', ...' if len(exits) > 4 else ''})"
                   if end is None else _site(view, end, kernel_size))}
    if branch is not None:
        out["branch"] = _site(view, branch, kernel_size)
    return out


def _site(view: _StageNodes, point, kernel_size: int | None) -> Site:
    """A conv after `point` with the stage's pattern: its last standard conv's bias (and kernel, if
    kernel_size is None), the batch norm after its convs, and `point`'s activation if idempotent."""
    rec, modules, convs = view.rec, view.modules, view.convs
    standard = [n for n in convs if rec[n.name].kernel == "standard"]
    template = (standard or convs)[-1]
    tmod = modules.get(template.target) if template.op == "call_module" else None
    kernel = kernel_size
    if kernel is None:
        ks = tuple(getattr(tmod, "kernel_size", (3,)))
        kernel = ks[0] if len(set(ks)) == 1 and ks[0] % 2 == 1 else 3
    notes = []
    norm = _norm_template(convs, modules)
    if norm is None and any(is_norm(u, modules) and running_norm(u, modules) is None
                            for c in convs for u in c.users):
        notes.append("the stage's norm cannot start as the identity: inserted without one")
    act = activation(point, modules)
    if act is not None and not (act.idempotent and act.repeatable):
        # act(act(x)) == act(x) only for an idempotent one (ReLU, ReLU6, Hardtanh): after an identity conv and a
        # pass-through norm on its output, it changes nothing; a bound computed in the graph is not repeated
        notes.append(f"{point.name}'s activation is not idempotent: inserted without one to stay exact")
        act = None
    weight = getattr(tmod, "weight", None)
    tm = point.meta.get("tensor_meta")
    gm = view.a.graph_module
    return Site(stage=view.stage.index, point=point.name, width=rec[point.name].shape[1],
                dims=len(view.stage.resolution), kernel=kernel, bias=getattr(tmod, "bias", None) is not None,
                norm=norm, act=act, dtype=weight.dtype if weight is not None else getattr(tm, "dtype", torch.float32),
                device=weight.device if weight is not None else _device(gm), note="; ".join(notes),
                training=gm.training, shape=tuple(rec[point.name].shape))


def _norm_template(convs, modules):
    """The batch norm that follows the stage's last conv that has one directly after it."""
    for c in reversed(convs):
        if len(c.users) == 1:
            norm = running_norm(next(iter(c.users)), modules)
            if norm is not None:
                return norm
    return None


def _is_map(r, stage: Stage) -> bool:
    f = r.field
    return (f is not None and f.is_map and len(f.sp) == len(stage.resolution)
            and tuple(r.shape[ax] for ax in f.sp) == tuple(stage.resolution))


def _channels_first(r, stage: Stage) -> bool:
    d = len(stage.resolution)
    return len(r.shape) == 2 + d and tuple(r.field.sp) == tuple(range(2, 2 + d))


def _returning(attached: set, maps: set) -> set:
    """The attached nodes (global pools, gates) whose values flow back into the stage's maps (iterative: chains
    of attached nodes can be thousands long, e.g. window attention in a non-map layout)."""
    found, todo = set(), list(maps)
    while todo:
        for m in todo.pop().all_input_nodes:
            if m in attached and m not in found:
                found.add(m)
                todo.append(m)
    return found


class _Cuts(dict):
    """{point: _is_cut(point, exits, inside)}, each computed on first use."""

    def __init__(self, exits, inside):
        super().__init__()
        self.exits, self.inside = exits, inside

    def __missing__(self, point):
        self[point] = _is_cut(point, self.exits, self.inside)
        return self[point]


def _is_cut(point, exits, inside) -> bool:
    """Whether every path from the stage's inputs to its exits passes through `point`."""
    seen, todo = set(), [e for e in exits if e is not point]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        ins = [m for m in n.all_input_nodes if m in inside]
        if not ins:  # a source of the stage (its input) reached without passing through `point`
            return False
        todo += [m for m in ins if m is not point]
    return True


def _device(gm) -> torch.device:
    p = next(iter(gm.parameters()), None)
    return p.device if p is not None else torch.device("cpu")
