"""Coupled channel groups, read off the channel field: which channels of the whole graph must go together when one
output channel of a conv or linear is removed.

The walk is the analysis walk's (fxrf.walk) with another reference. Every output channel of a *producer* (a conv
or linear module that mixes its input channels) is a reference channel of its own, and the op table's field rules
carry them through the graph as they carry stage channels: per-element and per-channel ops, permutations and
shuffles, cat offsets, split ranges, pixel (un)shuffle blocks, reshapes into heads. Where a channel of some tensor
sees two reference channels at once, by position (a residual add, a squeeze-excite product), they are coupled:
removing one removes the other, so they join one class (a union-find). A class is then what the pruner removes:
its producers' output rows, the input columns of every conv/linear that reads it, the entries of every norm on its
way.

Exactness is checked op by op, never assumed: an op whose output channel sees two channels *of the same input*
mixes channels (a mean over channels, a matmul, a LayerNorm or GroupNorm) and cannot follow a removal by position,
so everything it reads is frozen; so is anything that reaches the model output, the model input, a constant
tensor, an op without an exact rule, or a module whose parameters fxrf does not know how to slice. Frozen is the
union-find's class 0 and is listed with the reason (`Groups.declined`).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx
import torch.nn as nn

from fxrf.field import Field
from fxrf.inplace import Version, inplace_versions
from fxrf.metric import DEFAULT_ALPHA
from fxrf.naming import describe
from fxrf.ops import TMeta
from fxrf.rules import default_sp
from fxrf.stages import _channel_shape, _input_sp, _is_tensorish
from fxrf.walk import _Walker

FROZEN = 0  # the union-find class of channels that must stay

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
# what fxrf can slice, per module kind: anything else a module holds directly pins its channels
_SLICEABLE = {"conv": ({"weight", "bias"}, set()), "linear": ({"weight", "bias"}, set()),
              "norm": ({"weight", "bias"}, {"running_mean", "running_var", "num_batches_tracked"}),
              "prelu": ({"weight"}, set())}


@dataclass(frozen=True)
class Use:
    """How one module's channels are removed: kind "conv" / "linear" (a producer: output rows `out`, input
    columns `inp`), "dw" (a depthwise conv: group g goes with input channel g), "norm" / "prelu" (entries), "attr"
    (a parameter or buffer a functional per-channel op reads: rows along dim 0; `path` is the tensor's)."""

    path: str
    kind: str
    groups: int = 1


@dataclass
class Groups:
    """The classes of coupled channels. `members[c]` lists (module path, role, index) for class c, role "out"
    (a producer's output channel), "in" (an input channel of a conv/linear/depthwise conv/norm); `uses` how each
    module is sliced; `declined` (node, reason) for everything frozen; `graph_module` what was walked."""

    members: dict
    uses: dict
    declined: list
    graph_module: fx.GraphModule = field(repr=False, default=None)

    def producers(self, c: int) -> list:
        return sorted({p for p, role, _ in self.members[c] if role == "out"})

    def family(self, c: int) -> tuple:
        """The modules a class touches: classes with the same family are one layer's channels (pruned at one rate)."""
        return tuple(sorted({(p, role) for p, role, _ in self.members[c]}))


class _UnionFind:
    def __init__(self):
        self.parent = np.zeros(1, dtype=np.int64)  # element 0: FROZEN

    def fresh(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent = np.concatenate([self.parent, np.arange(start, start + n, dtype=np.int64)])
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a) -> np.ndarray:
        a = np.asarray(a, dtype=np.int64)
        r = self.parent[a]
        while True:
            rr = self.parent[r]
            if np.array_equal(rr, r):
                break
            r = rr
        self.parent[a] = r
        return r

    def union_pairs(self, a: np.ndarray, b: np.ndarray) -> None:
        """Join a[i] with b[i] for every i, vectorised: hook the larger root under the smaller until none differ."""
        while len(a):
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not differ.any():
                return
            ra, rb = ra[differ], rb[differ]
            lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
            self.parent[hi] = lo  # (two writes to one root: one wins, the other pair is joined next round)
            a, b = a[differ], b[differ]

    def union(self, items) -> int:
        """Join `items` into one class; its root (the smallest, so FROZEN wins) is returned."""
        roots = np.unique(self.find(np.asarray(list(items), dtype=np.int64)))
        if len(roots) == 0:
            return -1
        root = int(roots[0])
        self.parent[roots[1:]] = root
        return root


@dataclass
class _Canon:
    """A node's field with, per reach, its class (-1: sees no producer channel, a constant slab)."""

    field: Field
    roots: np.ndarray


class _Env(dict):
    """The encoded fields of one node's inputs; reading any other node that has a field is a bug caught here."""

    def __init__(self, data, known):
        super().__init__(data)
        self.known = known

    def get(self, k, default=None):
        if k in self:
            return self[k]
        if k in self.known:
            raise _Missing(k)
        return default


class _Missing(Exception):
    pass


class _Frozen(Exception):
    pass


def channel_groups(gm: fx.GraphModule, shapes: dict, inputs, modules: dict, rules=None) -> Groups:
    """The classes of coupled channels of `gm` (shapes: fxrf.trace's abstract values; inputs: the example's
    TMeta list)."""
    return _Walk(gm, shapes, inputs, modules, rules).run()


class _Walk:
    def __init__(self, gm, shapes, inputs, modules, rules):
        self.w = _Walker(gm, shapes, inputs, modules, DEFAULT_ALPHA, False, rules)
        self.gm, self.modules, self.dims = gm, modules, self.w.dims
        self.uf = _UnionFind()
        self.canon: dict = {}
        self.ids: dict = {}  # producer path -> its output channels' elements
        self.reads: dict = defaultdict(list)  # module path -> per call, per input channel j, the classes it reads
        self.uses: dict = {}
        self.declined: list = []

    # -- encoding ---------------------------------------------------------------------------------------------

    def _encode(self, keys) -> tuple[dict, np.ndarray]:
        """Input fields over one local space: reach r of each gets the one bit of its class's local index."""
        keys = [k for k in dict.fromkeys(keys) if k in self.canon]
        roots = []
        for k in keys:
            for c in _flat(self.canon[k]):
                c.roots[:] = np.where(c.roots >= 0, self.uf.find(np.maximum(c.roots, 0)), -1)
                roots.append(c.roots)
        space = np.unique(np.concatenate(roots)) if roots else np.zeros(0, dtype=np.int64)
        space = space[space >= 0]
        words = max(1, -(-len(space) // 64))
        env = {}
        for k in keys:
            env[k] = _map(self.canon[k], lambda c: self._bits(c, space, words))
        return env, space

    @staticmethod
    def _bits(c: _Canon, space: np.ndarray, words: int) -> Field:
        loc = np.searchsorted(space, np.maximum(c.roots, 0))
        bits = np.zeros((len(c.roots), words), dtype=np.uint64)
        live = c.roots >= 0
        rows = np.flatnonzero(live)
        bits[rows, loc[live] >> 6] = np.left_shift(np.uint64(1), (loc[live] & 63).astype(np.uint64))
        return c.field.replace(bits=bits, taps=None, size=None)

    def _decode(self, f: Field, space: np.ndarray) -> np.ndarray:
        """(reaches, local classes) bool: which classes each output reach sees."""
        m = np.unpackbits(np.ascontiguousarray(f.bits).view(np.uint8), axis=1, bitorder="little")
        return m[:, :len(space)].astype(bool)

    # -- the walk -------------------------------------------------------------------------------------------------

    def run(self) -> Groups:
        w = self.w
        nodes = [n for n in self.gm.graph.nodes if n.op != "output"]
        w._subs, order = inplace_versions(nodes, w.shapes, w.modules, w.table)
        w.shapes = dict(w.shapes)
        w.shapes.update({v: w.shapes[v.node] for v in order if isinstance(v, Version)})
        for node in order:
            v = w.shapes.get(node)
            if isinstance(node, Version):
                self._step(node, node.inputs + [node.node])
            elif node.op == "placeholder" and isinstance(v, TMeta):
                self.canon[node] = self._frozen_field(v.shape, _input_sp(node, v.shape, self.dims))  # the input
            elif node.op == "get_attr" and isinstance(v, TMeta):
                if math.prod(v.shape) > 1:  # a constant tensor (a scalar one touches no channel)
                    self.canon[node] = self._frozen_field(v.shape)
            elif node.op in ("call_module", "call_function", "call_method") and _is_tensorish(v):
                self._step(node, list(w._inputs(node)) + list(node.all_input_nodes))
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        self._freeze_all(out.all_input_nodes, out, "it reaches the model output")
        self._close()
        return self._groups()

    def _frozen_field(self, shape, sp=None) -> _Canon:
        """A tensor whose every channel is frozen: one reach, class FROZEN."""
        sp = tuple(sp) if sp is not None else default_sp(shape, self.dims)
        idx = np.zeros(_channel_shape(shape, sp), dtype=np.int64)
        f = Field(np.zeros((1, 1), dtype=np.uint64), np.zeros((1, 2 * self.dims)), idx, (1,) * self.dims, sp)
        return _Canon(f, np.zeros(1, dtype=np.int64))

    def _step(self, node, keys):
        w = self.w
        if isinstance(node, Version):
            mod, op = None, None
        else:
            mod, op = w._ctx_and_rule(node)
            back = w._round_trip(node, op)
            if back is not None and back in self.canon:  # flatten then view back: the same channels
                self.canon[node] = self.canon[back]
                return
        env, space = self._encode(keys)
        try:
            kind = self._producer_kind(node, mod)
            if kind is not None:
                return self._producer(node, mod, kind, env, space)
            out = self._apply(node, mod, op, env)
        except _Missing as e:
            return self._freeze_node(node, keys, f"fxrf could not follow {getattr(e.args[0], 'name', e.args[0])!r} "
                                                 f"into it")
        except _Frozen as e:
            if isinstance(node, fx.Node) and node.target in self.ids:  # a producer called before: its channels too
                self.uf.union([FROZEN, *self.ids[node.target].tolist()])
            if self._producer_kind(node, mod) is not None:  # its own channels stay: listed even if its inputs did
                self.declined.append((node.name, str(e)))
            return self._freeze_node(node, keys, str(e))
        declined = w._declined.get(node)
        if declined is not None:
            return self._freeze_node(node, keys, f"no exact channel map ({declined})")
        ins = [env[k] for k in dict.fromkeys(keys) if k in env]
        split = self._splits_channels(ins, out)
        if split:
            return self._freeze_node(node, keys, f"{_label(self.gm, node, mod)} splits a channel axis in two: a "
                                                 f"removal would move every channel after it")
        blocks = op is not None and "channel_blocks" in op.traits
        masks = [] if blocks else [self._mask(f, space) for f in ins]
        outs = []
        for f in _flat_fields(out):
            if f is None:
                outs.append(None)
                continue
            m = self._decode(f, space)
            for mk in masks:  # two channels of one input in one output channel: it mixes channels
                if mk.any() and (m[:, mk].sum(axis=1) > 1).any():
                    return self._freeze_node(node, keys, f"{_label(self.gm, node, mod)} mixes channels")
            counts = m.sum(axis=1)
            roots = np.full(len(m), -1, dtype=np.int64)
            one = counts == 1
            roots[one] = space[m[one].argmax(axis=1)] if one.any() else roots[one]
            multi = np.flatnonzero(counts > 1)
            if len(multi):  # channels that see two or more: coupled, each member joined to the reach's first
                rows, cols = np.nonzero(m[multi])
                starts = np.searchsorted(rows, np.arange(len(multi)))
                first = cols[starts]
                self.uf.union_pairs(space[first[rows]], space[cols])
                roots[multi] = self.uf.find(space[first])
            outs.append(_Canon(f, roots))
        self.canon[node] = _unflat(out, outs)
        if mod is not None and isinstance(node, fx.Node):
            self._entries(node, mod, env)
        elif isinstance(node, fx.Node):
            self._attributes(node, op, env)

    @staticmethod
    def _splits_channels(ins, out) -> bool:
        """Whether an output has more channel-like axes than its inputs and some input channel axis is no longer
        one of them: a view into groups or heads (C -> 2 x C/2), which a position-by-position map cannot follow once
        a channel is gone. (A window partition that only moves map axes among the channel-like ones keeps C.)"""
        fields = [g for f in ins for g in _flat_fields(f) if g is not None]
        if not fields:
            return False
        n_in = max(g.idx.ndim for g in fields)
        sizes = {n for g in fields for n in g.idx.shape}
        return any(g is not None and g.idx.ndim > n_in and g.idx.size > 1 and not sizes <= set(g.idx.shape)
                   for g in _flat_fields(out))

    def _apply(self, node, mod, op, env):
        w = self.w
        known = set(self.canon)
        env = _Env(env, known)
        if isinstance(node, Version):
            return w._version(node, env)
        return w._apply(node, mod, op, env)

    def _mask(self, f, space):
        out = np.zeros(len(space), dtype=bool)
        for g in _flat_fields(f):
            if g is not None:
                out |= self._decode(g, space).any(axis=0)
        return out

    # -- producers and the modules sliced with them ------------------------------------------------------------

    def _producer_kind(self, node, mod):
        if mod is None or not isinstance(node, fx.Node):
            return None
        if isinstance(mod, _CONV):
            if mod.groups > 1 and mod.groups == mod.in_channels:
                return None  # depthwise: its rule maps channel g to group g (an entry, below)
            return "conv"
        if isinstance(mod, nn.Linear):
            return "linear"
        return None

    def _input(self, node, env, axis):
        """Per input channel j along tensor `axis`, the classes it reads (sorted unique), or raise _Frozen."""
        src = self.w._inputs(node)[0]
        f = env.get(src)
        if f is None:
            return None
        v = self.w.shapes[src]
        if (axis % len(v.shape)) in f.sp:
            raise _Frozen("its channel axis holds the map")
        c = self.canon[src]
        roots = c.roots[np.moveaxis(f.idx, f.idx_axis(axis), -1)].reshape(-1, v.shape[axis])
        return [np.unique(roots[:, j]) for j in range(roots.shape[1])]

    def _producer(self, node, mod, kind, env, space):
        path = node.target
        axis = 1 if kind == "conv" else -1
        if not self._sliceable(mod, kind):
            raise _Frozen(f"{_label(self.gm, node, mod)} holds parameters fxrf does not slice")
        out = self._apply(node, mod, self.w._ctx_and_rule(node)[1], env)
        if not isinstance(out, Field) or node in self.w._declined:
            raise _Frozen(f"{_label(self.gm, node, mod)}: no exact channel map")
        reads = self._input(node, env, axis)
        if reads is not None:
            g = mod.groups if kind == "conv" else 1
            if g > 1:  # input index i of every group goes together (the groups stay equal)
                per = len(reads) // g
                reads = [np.unique(np.concatenate([reads[k * per + i] for k in range(g)])) for i in range(per)] * g
                reads = [reads[(j % per)] for j in range(len(reads))]
            self.reads[path].append(reads)
        self.uses[path] = Use(path, kind, getattr(mod, "groups", 1))
        n_out = mod.out_channels if kind == "conv" else mod.out_features
        if path not in self.ids:
            ids = self.uf.fresh(n_out)
            g = getattr(mod, "groups", 1)
            if g > 1:  # output index i of every group goes together
                per = n_out // g
                for i in range(per):
                    self.uf.union(ids[i::per])
            self.ids[path] = ids
        ids = self.uf.find(self.ids[path])
        shape = self.w.shapes[node].shape
        ax = out.idx_axis(axis % len(shape))
        idx = np.moveaxis(np.broadcast_to(np.arange(n_out), np.moveaxis(np.empty(out.idx.shape), ax, -1).shape),
                          -1, ax)
        spans = np.broadcast_to(out.spans[:1], (n_out, out.spans.shape[1])).copy()
        f = Field(np.zeros((n_out, 1), dtype=np.uint64), spans, np.ascontiguousarray(idx), out.jump, out.sp)
        self.canon[node] = _Canon(f, ids.copy())

    def _entries(self, node, mod, env):
        """Depthwise convs, norms and PReLU: their entry j goes with input channel j."""
        kind = ("dw" if isinstance(mod, _CONV) and mod.groups > 1 and mod.groups == mod.in_channels else
                "norm" if isinstance(mod, _NORM) and (mod.affine or mod.track_running_stats) else
                "prelu" if isinstance(mod, nn.PReLU) and mod.num_parameters > 1 else None)
        if kind is None:
            if any(True for _ in mod.parameters()):  # an unknown module with weights: its channels stay
                keys = list(self.w._inputs(node))
                self._freeze_all(keys, node, f"{_label(self.gm, node, mod)} holds parameters fxrf does not slice")
                self._freeze_all([node], node, f"{_label(self.gm, node, mod)} holds parameters fxrf does not slice")
            return
        if not self._sliceable(mod, "conv" if kind == "dw" else kind):
            self._freeze_all(list(self.w._inputs(node)) + [node], node,
                             f"{_label(self.gm, node, mod)} holds parameters fxrf does not slice")
            return
        reads = self._input(node, env, 1)
        if reads is not None:
            self.reads[node.target].append(reads)
        self.uses[node.target] = Use(node.target, kind, getattr(mod, "groups", 1))

    def _attributes(self, node, op, env):
        """Parameters and buffers a functional call reads (get_attr: timm's BatchNormAct2d calls F.batch_norm
        with its own running_mean): a per-channel op indexes them by channel along dim 0, so entry j goes with
        input channel j; anything else that reads a model tensor pins the channels it touches."""
        attrs = [a for a in node.all_input_nodes if a.op == "get_attr" and isinstance(self.w.shapes.get(a), TMeta)
                 and math.prod(self.w.shapes[a].shape) > 1]
        if not attrs:
            return
        x = self.w._inputs(node)[0] if node.all_input_nodes else None
        v = self.w.shapes.get(x)
        per_channel = op is not None and "per_channel" in op.traits and isinstance(v, TMeta) and len(v.shape) > 1
        for a in attrs:
            if per_channel and tuple(self.w.shapes[a].shape) == (v.shape[1],) and a is not x:
                reads = self._input(node, env, 1)
                if reads is not None:
                    self.reads[a.target].append(reads)
                    self.uses[a.target] = Use(a.target, "attr")
            # (other constants were frozen where they were read: their class is FROZEN)

    @staticmethod
    def _sliceable(mod, kind) -> bool:
        params, buffers = _SLICEABLE[kind]
        return ({n for n, _ in mod.named_parameters(recurse=False)} <= params
                and {n for n, _ in mod.named_buffers(recurse=False)} <= buffers
                and not any(True for c in mod.children() for _ in c.parameters()))

    # -- freezing ---------------------------------------------------------------------------------------------

    def _freeze_node(self, node, keys, reason):
        self._freeze_all(keys, node, reason)
        v = self.w.shapes.get(node)
        # where the map is: as in an input of the same shape, else of the same rank (the walker's conservative
        # field does the same): a LayerNorm or a strided slice over N H W C keeps channels last
        ins = [(tuple(self.w.shapes[k].shape), c.field.sp) for k in keys if k in self.canon
               and isinstance(self.w.shapes.get(k), TMeta) for c in _flat(self.canon[k])]
        outs = []
        for o in (v,) if isinstance(v, TMeta) else (v if _is_tensorish(v) else ()):
            if isinstance(o, TMeta):
                shape = tuple(o.shape)
                sp = next((sp for s, sp in ins if s == shape), next((sp for s, sp in ins if len(s) == len(shape)
                                                                     and len(sp) == self.dims), None))
                outs.append(self._frozen_field(shape, sp))
            else:
                outs.append(None)
        self.canon[node] = outs[0] if isinstance(v, TMeta) else tuple(outs)

    def _freeze_all(self, keys, node, reason):
        roots = [c.roots[c.roots >= 0] for k in keys if k in self.canon for c in _flat(self.canon[k])]
        roots = np.concatenate(roots) if roots else np.zeros(0, dtype=np.int64)
        live = np.unique(self.uf.find(roots)) if len(roots) else roots
        if (live != FROZEN).any():
            self.declined.append((getattr(node, "name", str(node)), reason))
            self.uf.union([FROZEN, *live.tolist()])

    def _close(self):
        """A module read twice, or an input channel that reads two classes: one class, or frozen if it cannot be."""
        for path, calls in self.reads.items():
            for j in range(len(calls[0])):
                self.uf.union(np.concatenate([c[j] for c in calls]))

    def _groups(self) -> Groups:
        members: dict = defaultdict(list)
        for path, ids in self.ids.items():
            for o, c in enumerate(self.uf.find(ids).tolist()):
                members[c].append((path, "out", o))
        for path, calls in self.reads.items():
            for j, classes in enumerate(calls[0]):
                cs = np.unique(self.uf.find(classes)) if len(classes) else classes
                if len(cs) == 1:
                    members[int(cs[0])].append((path, "in", j))
        members.pop(FROZEN, None)
        members.pop(-1, None)
        return Groups(dict(members), self.uses, self.declined, self.gm)


def _flat(c):
    return [x for x in (c if isinstance(c, tuple) else (c,)) if isinstance(x, _Canon)]


def _flat_fields(f):
    return list(f) if isinstance(f, tuple) else [f]


def _unflat(like, outs):
    return tuple(outs) if isinstance(like, tuple) else outs[0]


def _map(c, fn):
    if isinstance(c, tuple):
        return tuple(fn(x) if isinstance(x, _Canon) else None for x in c)
    return fn(c)


def _label(gm, node, mod) -> str:
    if isinstance(node, Version):
        return f"an in-place write into {node.node.name!r}"
    return describe(gm, node)
