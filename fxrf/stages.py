"""Step 2 of the analysis: stages (a node whose map is resampled starts one; the maps of one resolution connected
to each other form one), and the reference fields the walks start from (a model input, a stage input)."""
from __future__ import annotations

import torch.fx as fx

from . import field as F_
from .field import Field
from .inplace import Version
from .ops import TMeta
from .records import Stage
from .rules import default_sp

_SLICES = frozenset({"getitem", "aten_slice"})  # basic indexing: one getitem under fx, one slice per axis under export


def find_stages(w, nodes, inp_env):
    """A stage starts where the map is resampled (its field's jump differs from every input map's: stride,
    pooling, interpolation), not where padding or cropping changes its size. A 1x1 map computed from a stage
    (global pooling and the gate it feeds, even through vectors and linear layers) belongs to that stage.

    w: the walker (fxrf.walk), read only: its shapes, constant_names, _plan (each node's op), _inputs (what a node
    reads, in-place versions included) and _round_trip (a flatten undone). Returns (the stage of each node, the
    Stages, the nodes that start one, the nodes computed from a whole map: gates and global context, the nodes
    that are maps of a stage: neither attached nor constant)."""
    parent: dict = {}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    maps: dict = {}
    grids: dict = {}  # jump -> its rounded form (a CNN has a handful of pixel grids)
    shapes = w.shapes

    def map_of(n):  # (size, jump) of a node's map; None for vectors, tuples and constants
        mp = maps.get(n, False)
        if mp is False:
            f, v = inp_env.get(n), shapes.get(n)
            mp = None
            if isinstance(f, Field) and isinstance(v, TMeta) and f.sp and None not in f.sp:  # f.is_map
                grid = grids.get(f.jump)
                if grid is None:
                    grid = grids[f.jump] = tuple([round(float(j), 9) for j in f.jump])
                mp = (tuple([v.shape[a] for a in f.sp]), grid)
            maps[n] = mp
        return mp

    def constant(n):
        return n.op == "get_attr" or n.name in w.constant_names

    def sliced_on(n):  # a slice of a map read only by slices that resample it further: export slices
        if n not in through:  # x[:, :, ::2, ::2] one axis at a time, where fx has one getitem
            op = w._plan.get(n, (None, None))[1]
            through[n] = op is not None and op.name in _SLICES and map_of(n) is not None and bool(n.users) \
                and all(getattr(w._plan.get(u, (None, None))[1], "name", None) in _SLICES
                        and u.args and u.args[0] is n and map_of(u) is not None
                        and map_of(u)[1] != map_of(n)[1] for u in n.users)
        return through[n]

    through: dict = {}

    def map_inputs(n):  # the maps a node reads, looking through tuple-valued nodes (split, chunk, ...)
        out = []
        for m in w._inputs(n):
            if constant(m):
                continue
            if sliced_on(m):  # x[:, :, ::2, ::2] as two slices resamples once, as fx's one getitem does
                out.extend(map_inputs(m))
            elif map_of(m) is not None:
                out.append(m)
            elif not isinstance(w.shapes.get(m), TMeta) and _is_tensorish(w.shapes.get(m)):
                out.extend(map_inputs(m))
        return out

    above: dict = {}

    def maps_above(n):  # for a map computed from vectors (heads folded away and back): the maps they came from
        if n not in above:
            above[n] = []
            for m in w._inputs(n):
                if constant(m) or not _is_tensorish(w.shapes.get(m)):
                    continue
                above[n].extend([m] if map_of(m) is not None else maps_above(m))
        return above[n]

    starts, attached, loose = [], [], set()
    for n in nodes:
        if isinstance(n, Version):  # no map of its own: a later value of its node, in its node's stage
            join = [m for m in (map_inputs(n) if n.kind == "write" else [n.node]) if m in parent]
            if join:
                parent[n] = n
                for m in join:
                    parent[find(m)] = find(n)
            else:
                attached.append(n)
                loose.add(n)
            continue
        mp = map_of(n)
        if mp is None:
            if _is_tensorish(w.shapes.get(n)) and not constant(n):
                attached.append(n)
            continue
        size, jump = mp
        back = w._round_trip(n, w._plan.get(n, (None, None))[1])  # a flatten undone: back on its map
        ins = map_inputs(n) + ([back] if back is not None else [])
        if not ins and not all(s == 1 for s in size):
            ins = maps_above(n)
        same = [m for m in ins if m in parent and map_of(m)[1] == jump]
        if sliced_on(n):  # half of a slicing, not a map of its own: it stays in its input's stage
            same = [m for m in ins if m in parent]
        if n.op != "placeholder" and not same and all(s == 1 for s in size) and \
                any(not constant(m) and _is_tensorish(shapes.get(m)) for m in w._inputs(n)):  # fed by tensors
            attached.append(n)  # global pooling and the 1x1 maps computed from it (gates)
            continue
        parent[n] = n
        if n.op == "placeholder" or not same:
            starts.append(n)
        for m in same:
            parent[find(m)] = find(n)
    roots, stages, stage_of = {}, [], {}
    for n in starts:
        r = find(n)
        if r not in roots:
            roots[r] = len(roots)
            stages.append([])
        stages[roots[r]].append(n)
    for n in parent:
        stage_of[n] = roots[find(n)]
    context = set()
    for n in attached:  # vectors, tuples and global maps: the stage of their inputs, if they agree on one
        ins = [n.node] if n in loose and n.kind == "view" else w._inputs(n)
        got = {stage_of.get(m) for m in ins if not constant(m)} - {None} or {None}
        stage_of[n] = got.pop() if len(got) == 1 else None
        if stage_of[n] is not None and isinstance(w.shapes.get(n), TMeta) and n not in loose:
            context.add(n)  # computed from the whole map: a gate or global context for the local field
    result = []
    for i, members in enumerate(stages):
        res = map_of(members[0])[0]
        c0 = sum(inp_env[m].channels for m in members)
        result.append(Stage(i, res, c0, tuple(m.name for m in members)))
    return stage_of, result, set(starts), context, set(parent)


def _reference(shape, dims, offset, like: Field | None = None, words: int = 1, size=None, sp=None) -> Field:
    """The field of a reference tensor (model input or stage input) in its own coordinates."""
    sp = like.sp if like is not None else sp if sp is not None else default_sp(shape, dims)
    return F_.identity(_channel_shape(shape, sp), dims, offset, sp, words, size)


def _channel_shape(shape, sp) -> tuple:
    """The sizes of a tensor's channel-like axes: all but batch and the spatial ones."""
    return tuple(n for a, n in enumerate(shape) if a > 0 and a not in sp)


def _nothing(f):
    return tuple(None for _ in f) if isinstance(f, tuple) else None


def _is_tensorish(v) -> bool:
    """A tensor, or a tuple/list that holds at least one tensor at its top level."""
    return isinstance(v, TMeta) or (isinstance(v, (tuple, list)) and any(isinstance(x, TMeta) for x in v))


def _input_sp(node: fx.Node, shape: tuple, dims: int) -> tuple:
    """Where a model input's spatial axes are: trailing (NCHW), unless every use of it is a permute that moves
    its last axis to position 1 (a channels-last input, N H W C, permuted before its first conv)."""
    n = len(shape)
    if dims and n == dims + 2 and node.users:
        want = [0, n - 1, *range(1, n - 1)]
        for u in node.users:
            if u.op not in ("call_method", "call_function") or "permute" not in str(getattr(u.target, "__name__", u.target)):
                break
            perm = u.args[1:] if u.op == "call_method" else u.args[1:2]
            perm = list(perm[0]) if len(perm) == 1 and isinstance(perm[0], (tuple, list)) else list(perm)
            if [p % n if isinstance(p, int) else p for p in perm] != want:
                break
        else:
            return tuple(range(1, n - 1))
    return default_sp(shape, dims)
