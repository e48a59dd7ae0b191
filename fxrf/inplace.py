"""In-place writes followed through aliases: which nodes write into their first argument (`mutates`), which are
views of what (`_view_name`, `_view_link`), and where each reader reads a later value than its input node holds
(`inplace_versions`, the `Version`s it places); `_write_back` maps a write into a part back onto its base."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

from . import field as F_
from .field import Field
from .ops import Decline, OpTable, TMeta, default_table

_INPLACE_FUNCTIONS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.setitem)


def mutates(node: fx.Node, module: nn.Module | None = None) -> bool:
    """Whether a node writes into its first argument: a tensor method `x.add_(y)`, `torch.relu_`, `operator.iadd`
    and `operator.setitem`, a function called with inplace=True, a module with `inplace = True`."""
    if node.op == "call_method":
        t = str(node.target)
        return t.endswith("_") and not t.startswith("_")
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True:
            return True
        if isinstance(node.target, torch._ops.OpOverload):  # ATen (export): the schema marks self as written
            args = node.target._schema.arguments
            return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_") and getattr(node.target, "__module__", "") in (
            "torch", "torch._C._nn", "torch.nn.functional", "torch._C._VariableFunctions", None)
    if node.op == "call_module":
        if module is None and node.graph.owning_module is not None:
            try:
                module = node.graph.owning_module.get_submodule(node.target)
            except AttributeError:
                return False
        if _class_says_inplace(type(module)):
            return getattr(module, "inplace", False) is True
        return module.__dict__.get("inplace") is True  # as getattr, without nn.Module's slow miss path
    return False


_INPLACE_CLASSES: dict = {}  # module class -> whether a class on its MRO defines `inplace` itself


def _class_says_inplace(cls: type) -> bool:
    got = _INPLACE_CLASSES.get(cls)
    if got is None:
        got = _INPLACE_CLASSES[cls] = any("inplace" in vars(c) for c in cls.__mro__)
    return got


class Version:
    """A value no graph node holds, a key of the walk's environments like a node: a tensor after a write into one
    of its views (kind "write": `y[:, 0].add_(z)` changes y), or a view read again after its base was written
    (kind "view": `v = y[:, :2]` read after that write). `node` is the node whose value it is a later version of."""

    op = "version"
    args: tuple = ()
    users: dict = {}

    def __init__(self, kind: str, node: fx.Node, inputs: list, write: fx.Node | None = None, chain=None,
                 region=None):
        self.kind, self.node, self.inputs, self.write = kind, node, inputs, write
        self.chain = chain  # "write": the steps from the base down to the part written (inplace_versions); None:
        self.region = region  # cannot be mapped. setitem: the shape of the part written (its value is broadcast)
        self.name = f"{node.name}@{write.name}" if write is not None else f"{node.name}@{inputs[0].name}"

    @property
    def all_input_nodes(self) -> list:
        return self.inputs

    def __repr__(self) -> str:
        return f"Version({self.name})"


_IDENTITY, _OPAQUE = "identity", "opaque"
# ops whose output is a view of their first argument (tensor methods, torch functions); "identity": the same
# elements in the same order when the shape is unchanged (a reshape may copy: taking it for a view can only add to
# what readers see, never take away)
_VIEWS = {"view": _IDENTITY, "reshape": _IDENTITY, "_unsafe_view": _IDENTITY, "view_as": _IDENTITY,
          "reshape_as": _IDENTITY, "flatten": _IDENTITY, "unflatten": _IDENTITY, "squeeze": _IDENTITY,
          "unsqueeze": _IDENTITY, "expand": _IDENTITY, "expand_as": _IDENTITY, "broadcast_to": _IDENTITY,
          "alias": _IDENTITY, "detach": _IDENTITY, "contiguous": _IDENTITY, "permute": _OPAQUE,
          "transpose": _OPAQUE, "swapaxes": _OPAQUE, "swapdims": _OPAQUE, "movedim": _OPAQUE, "t": _OPAQUE,
          "unfold": _OPAQUE, "diagonal": _OPAQUE, "as_strided": _OPAQUE, "view_as_real": _OPAQUE,
          "view_as_complex": _OPAQUE, "select": "select", "narrow": "narrow", "slice": "slice",
          "split": "tuple", "split_with_sizes": "tuple", "chunk": "tuple", "unbind": "tuple",
          "tensor_split": "tuple"}


def _view_name(node: fx.Node, module: nn.Module | None) -> str | None:
    """The kind of view `node`'s output is of its first argument (`_VIEWS`), or None when it is not a view."""
    if node.op == "call_module":
        return _IDENTITY if isinstance(module, nn.Identity) else \
            _OPAQUE if isinstance(module, (nn.Flatten, nn.Unflatten)) else None
    if node.op == "call_method":
        return _VIEWS.get(str(node.target))
    if node.op != "call_function":
        return None
    t = node.target
    if t is operator.getitem:
        return "getitem"
    if isinstance(t, torch._ops.OpOverload):  # ATen: the schema says whether the output aliases self
        args = t._schema.arguments
        if not args or args[0].alias_info is None or args[0].alias_info.is_write:
            return None
        return _VIEWS.get(t.overloadpacket.__name__, _OPAQUE)
    if getattr(t, "__module__", None) in ("torch", "torch._C._VariableFunctions", "torch.functional"):
        return _VIEWS.get(getattr(t, "__name__", ""))
    return None


def _basic_step(index, rank: int) -> tuple | None:
    """x[index] as one int or slice per axis of x, or None (advanced indexing, None axes)."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is None or not isinstance(i, (int, slice, type(Ellipsis))) for i in index) or \
            sum(i is Ellipsis for i in index) > 1:
        return None
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (rank - len(index) + 1) + index[k + 1:]
    if len(index) > rank:
        return None
    return tuple(index) + (slice(None),) * (rank - len(index))


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _view_link(node: fx.Node, kind: str, shapes: dict):
    """(the tensor `node` indexes, the step: one int or slice per axis of it | _IDENTITY | _OPAQUE), or None when
    `node` makes a new tensor after all."""
    src = node.args[0]
    if kind == "tuple":  # split/chunk/unbind: written through the getitem that picks a piece
        return src, _OPAQUE
    a, b = shapes.get(src), shapes.get(node)
    if not isinstance(a, TMeta):
        return src, _OPAQUE
    rank = len(a.shape)
    if kind == "getitem":
        index = fx.node.map_arg(node.args[1], lambda m: shapes.get(m))
        if any(isinstance(i, TMeta) for i in (index if isinstance(index, (tuple, list)) else (index,))):
            return None  # indexing with a tensor gathers into a new tensor
        step = _basic_step(index, rank)
        return src, _OPAQUE if step is None else step
    if kind == _IDENTITY:
        return src, _IDENTITY if isinstance(b, TMeta) and tuple(b.shape) == tuple(a.shape) else _OPAQUE
    if kind in ("select", "narrow", "slice"):
        dim = _arg(node, 1, "dim", 0)
        if not isinstance(dim, int):
            return src, _OPAQUE
        if kind == "select":
            item = _arg(node, 2, "index")
        elif kind == "narrow":
            start, length = _arg(node, 2, "start"), _arg(node, 3, "length")
            item = slice(start, start + length) if isinstance(start, int) and isinstance(length, int) else None
        else:
            item = slice(_arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1))
        if not isinstance(item, (int, slice)) or (isinstance(item, slice) and not all(
                v is None or isinstance(v, int) for v in (item.start, item.stop, item.step))):
            return src, _OPAQUE
        return src, (slice(None),) * (dim % rank) + (item,) + (slice(None),) * (rank - 1 - dim % rank)
    return src, _OPAQUE


def _pick_link(node: fx.Node, tuple_node: fx.Node, shapes: dict):
    """getitem(split(x, ...), i): the slice of x that piece i is (unbind: an int), or _OPAQUE."""
    x, pieces = shapes.get(tuple_node.args[0]), shapes.get(tuple_node)
    i = node.args[1]
    if not isinstance(x, TMeta) or isinstance(pieces, TMeta) or not isinstance(pieces, (tuple, list)) or \
            not isinstance(i, int):
        return _OPAQUE
    name = tuple_node.target if isinstance(tuple_node.target, str) else \
        getattr(getattr(tuple_node.target, "overloadpacket", tuple_node.target), "__name__", "")
    rank = len(x.shape)
    dim = _arg(tuple_node, 1 if name == "unbind" else 2, "dim", 0)
    if not isinstance(dim, int) or name == "tensor_split":
        return _OPAQUE
    dim %= rank
    if name == "unbind":
        item = i % len(pieces)
    else:
        sizes = [p.shape[dim] for p in pieces]
        i %= len(pieces)
        item = slice(sum(sizes[:i]), sum(sizes[:i + 1]))
    return (slice(None),) * dim + (item,) + (slice(None),) * (rank - 1 - dim)


def inplace_versions(nodes, shapes: dict, modules: dict, table: OpTable | None = None) -> tuple[dict, list]:
    """({node: {input: the key to read instead}}, the nodes in order with the `Version`s they need).

    In-place writes are followed through aliases: after `z.add_(y)` (node n) later readers of z read n; after a
    write into a view of z (`z[:, 0].add_(y)`, `z[:, 0:1].copy_(y)`, `z[:, 0] = y`) they read a Version of z, the
    written part replaced (unmappable: conservative); a view of z made before the write and read after it is read
    again from that version. Every get_attr of one attribute is one storage (a buffer written in forward is read
    back written). Only tensor-valued first arguments count (operator.iadd also adds Python ints). A version is
    placed in the order only where something reads it, so a write nobody reads back declines nothing."""
    table = table or default_table()
    parent: dict = {}  # alias -> the tensor it was derived from (its value follows that tensor's)
    link: dict = {}  # alias -> (the tensor it indexes, step), for mapping a write into it onto its base
    born: dict = {}  # alias -> the version count of its storage when its own value was right
    count: dict = {}  # storage (root) -> writes so far
    latest: dict = {}  # storage -> the key holding its value after the last write
    attrs: dict = {}
    memo: dict = {}
    subs: dict = {}
    order: list = []

    def root(m):
        while m in parent:
            m = parent[m]
        return m

    placed: set = set()

    def place(v):  # a write's version, and the versions it reads, into the order before their first reader
        if isinstance(v, Version) and v not in placed:
            for i in v.inputs:
                place(i)
            placed.add(v)
            order.append(v)
        return v

    def key(m):
        """Where m's current value is: m itself, the latest write, or a Version re-reading the view."""
        r = root(m)
        c = count.get(r, 0)
        if born.get(m, 0) == c:
            return m
        if m is r:
            return place(latest[r])
        if link.get(m, (None, None))[1] is _IDENTITY and link[m][0] is parent[m]:
            return key(parent[m])
        if (m, c) not in memo:
            p = key(parent[m])
            memo[(m, c)] = v = Version("view", m, [p])
            order.append(v)
        return memo[(m, c)]

    def chain_of(t):
        """[(shape of src, step, shape of src[step])] from t's storage down to t (identity links left out); None
        where a link cannot be mapped (a permute, a reshape to another shape)."""
        out = []
        while t in link:
            src, step = link[t]
            if step is _OPAQUE:
                return None
            if step is not _IDENTITY:
                out.append((tuple(shapes[src].shape), step, tuple(shapes[t].shape)))
            t = src
        return out[::-1]

    for n in nodes:
        got = {m: k for m in n.all_input_nodes if (k := key(m)) is not m}
        if got:
            subs[n] = got
        order.append(n)
        mod = modules.get(n.target) if n.op == "call_module" else None
        first = n.args[0] if n.args else None
        if n.op == "get_attr":
            base = attrs.setdefault(n.target, n)
            if base is not n:  # the same storage: its own value is the attribute's before any write
                parent[n], link[n], born[n] = base, (base, _IDENTITY), 0
            continue
        if not isinstance(first, fx.Node):
            continue
        if n.op == "call_function" and n.target is operator.getitem and not isinstance(shapes.get(first), TMeta) \
                and isinstance(shapes.get(first), (tuple, list)):
            if first in parent:  # a piece of split/chunk/unbind: a view of what was split
                parent[n], link[n] = first, (parent[first], _pick_link(n, first, shapes))
                born[n] = count.get(root(n), 0)
            continue
        if not isinstance(shapes.get(first), TMeta):
            continue
        if mutates(n, mod):
            r = root(first)
            prev = latest.get(r, r) if count.get(r, 0) else r
            if n.target is operator.setitem:  # first[index] = value: a write into a view no node holds
                rank = len(shapes[first].shape)
                index = fx.node.map_arg(n.args[1], lambda m: shapes.get(m))
                step = _basic_step(index, rank)
                chain = chain_of(first)
                region = None
                if step is not None and chain is not None:
                    try:
                        region = tuple(torch.empty(shapes[first].shape, device="meta")[step].shape)
                        chain = chain + [(tuple(shapes[first].shape), step, region)]
                    except Exception:
                        region = None
                value = n.args[2] if len(n.args) > 2 and isinstance(n.args[2], fx.Node) else None
                inputs = [prev] + ([key(value)] if value is not None and isinstance(shapes.get(value), TMeta) else [])
                count[r] = count.get(r, 0) + 1
                latest[r] = Version("write", r, inputs, n, chain if region is not None else None, region)
                continue
            chain = chain_of(first)
            op = table.lookup(n, mod)
            if chain != [] and op is not None and "per_element" in op.traits and \
                    sum(isinstance(shapes.get(m), TMeta) for m in n.all_input_nodes) == 1:
                parent[n], link[n], born[n] = first, (first, _IDENTITY), count.get(r, 0)
                continue  # relu_ on a part: every element sees what it saw, so nothing reads differently
            count[r] = count.get(r, 0) + 1
            latest[r] = n if chain == [] else Version("write", r, [prev, n], n, chain)  # [] : n is the whole
            parent[n], link[n], born[n] = first, (first, _IDENTITY), count[r]
            continue
        kind = _view_name(n, mod)
        got = _view_link(n, kind, shapes) if kind is not None else None
        if got is not None:
            parent[n] = got[0]
            link[n] = got
            born[n] = count.get(root(n), 0)
    return subs, order


def _write_back(f: Field | None, shape: tuple, step: tuple, w: Field | None) -> Field | None:
    """The field of a tensor of `shape` (field `f`) after its part `step` (an int or a slice per axis) was
    overwritten by a tensor whose field is `w`. Exact when the part spans every batch element and every pixel
    (channels picked by ints and slices); Decline otherwise (the caller goes conservative)."""
    def whole(a):
        e = step[a]
        return isinstance(e, slice) and range(shape[a])[e] == range(shape[a])

    if not whole(0):
        raise Decline("a write into some of the batch")
    if f is None and w is None:
        return None
    kept = [a for a, e in enumerate(step) if isinstance(e, slice)]  # axis i of the part is axis kept[i] here
    sp = f.sp if f is not None else tuple(None if a is None else kept[a] for a in w.sp)
    if not all(a is None or whole(a) for a in sp):
        raise Decline("a write into part of the map")
    if w is not None and tuple(w.sp) != tuple(None if a is None else kept.index(a) for a in sp):
        raise Decline("a write whose spatial axes do not line up with the tensor's")
    if f is not None and w is not None and \
            tuple(round(float(j), 9) for j in f.jump) != tuple(round(float(j), 9) for j in w.jump):
        raise Decline("a write of another resolution")
    channel_axes = [a for a in range(1, len(shape)) if a not in sp]
    return F_.assign(f, tuple(step[a] for a in channel_axes), w, tuple(shape[a] for a in channel_axes), sp)
