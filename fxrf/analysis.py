"""The analysis pass: stages, then one walk over the graph that applies the rules and writes one record per node.

Three steps, each linear in the number of nodes and independent of the input resolution:
1. shapes (fxrf.shapes) and the fields referenced to the model input (which also tell where the spatial axes of
   every tensor are);
2. stages: a node whose map has another spatial size than its inputs starts one; the maps of one resolution
   connected to each other form one stage, whose input is the union of the channels of all its starting nodes;
3. fields referenced to the stage input, the paper's 3DRF, and the gain of every conv.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import math
import numbers
from dataclasses import dataclass, field as dc_field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from . import field as F_
from .errors import AnalysisError, FxrfError, InputError, UnsupportedOpError
from .field import Field
from .metric import DEFAULT_ALPHA, gain as gain_of, volume as volume_of
from .checks import check_number  # noqa: F401  (the passes' option checks; re-exported)
from .cost import model_cost
from .naming import describe, module_path, op_name  # noqa: F401  (module_path: re-exported)
from .ops import Call, Decline, OpTable, T, TMeta, default_table
from .report import table as _table, to_dict as _to_dict
from .rules import default_sp
from .rules.elementwise import broadcast_merge
from .rules.layout import getitem
from .shapes import fetch_attr
from .trace import InputSpec, _as_shapes, trace_with_values

META_KEY = "fxrf"  # node.meta[META_KEY] holds the NodeRecord


@dataclass(frozen=True)
class RF:
    """A receptive field: spatial extent per dim (capped at the reference size unless the analysis ran with
    spatial_cap=False) and channel counts."""

    spatial: tuple
    channel: int
    channel_mean: float

    @property
    def height(self) -> int:
        return self.spatial[-2] if len(self.spatial) >= 2 else 1

    @property
    def width(self) -> int:
        return self.spatial[-1] if self.spatial else 1

    @property
    def volume(self) -> int:
        return volume_of(self.spatial, self.channel)


@dataclass(frozen=True)
class Stage:
    index: int
    resolution: tuple  # w_0 per spatial dim
    channels: int  # c_0
    inputs: tuple  # names of the nodes whose outputs make up the stage input

    @property
    def volume(self) -> int:  # V_0
        return volume_of(self.resolution, self.channels)


@dataclass(frozen=True)
class NodeRecord:
    """Everything the analysis knows about one node; stored in node.meta["fxrf"]."""

    name: str
    op: str
    target: str
    shape: tuple
    stage: int | None
    kernel: str | None  # conv kind: standard | pointwise | depthwise | grouped
    rf: RF | None  # 3DRF referenced to the stage input
    gain: float | None
    input_rf: RF | None  # referenced to the model input
    supported: bool
    field: Field | None = dc_field(repr=False, compare=False, default=None)  # exact per-channel sets (stage)
    input_field: Field | None = dc_field(repr=False, compare=False, default=None)
    path: str | None = None  # the module path the node belongs to (`layer1.0.conv1`), as state_dict keys spell it
    # The 3DRF through the local path: squeeze-excite gates and other global context (1x1 maps and vectors
    # computed from the whole stage) see nothing. Equal to `rf` where no gate is upstream (docs/concepts.md).
    local_rf: RF | None = None
    local_gain: float | None = None  # the gain computed from local_rf


@dataclass
class Analysis:
    graph_module: fx.GraphModule
    model: str
    input_shape: tuple
    alpha: float
    stages: list
    records: list  # NodeRecord in graph order, tensor-valued nodes only
    unsupported: list  # (node name, target, reason)
    spatial_cap: bool = True  # False: spatial extents (and so volumes and gains) are not capped at w_0
    warnings: list = dc_field(default_factory=list)  # one line each, e.g. a gain 0 that rests on a gate

    def record(self, name: str) -> NodeRecord:
        """The record of a node, by its fx node name (`layer1_0_conv1`) or by module path (`layer1.0.conv1`: the
        module's output node). A dict lookup."""
        r = self.get(name)
        if r is None:
            raise KeyError(f"no node or module named {name!r}; nodes: "
                           f"{', '.join(r.name for r in self.records[:8])}, ...; modules: "
                           f"{', '.join(p for p in list(self._by_path)[:8])}, ...")
        return r

    @property
    def capture(self) -> str:
        """How the graph was captured: "fx" (torch.fx.symbolic_trace) or "export" (torch.export)."""
        return self.graph_module.meta.get("fxrf_capture", "fx")

    def get(self, name: str) -> NodeRecord | None:
        """`record(name)`, or None when there is no such node or module."""
        r = self._by_name.get(name)
        return r if r is not None else self._by_path.get(name)

    @functools.cached_property
    def _by_name(self) -> dict:
        return {r.name: r for r in self.records}

    @functools.cached_property
    def _by_path(self) -> dict:
        out: dict = {}
        for r in self.records:  # graph order: a module traced through maps to its last node, its output
            if r.path is not None:
                out[r.path] = r
        for r in self.records:  # a leaf module is its call_module node
            if r.op not in ("input", "constant") and r.target.split(" (")[0] == r.path:
                out[r.path] = r
        return out

    def convs(self) -> list:
        return [r for r in self.records if r.kernel is not None]

    @functools.cached_property
    def costs(self) -> dict:
        """{node name: fxrf.cost.Cost}: params and MACs from shapes alone (computed on first use)."""
        return model_cost(self.graph_module)

    def to_dict(self) -> dict:
        return _to_dict(self)

    def table(self, width: int | None = 80, depth: int | None = None) -> str:
        return _table(self, width, depth)


def analyze(model: nn.Module, example_input: InputSpec, *, alpha: float = DEFAULT_ALPHA, strict: bool = False,
            concrete_args: dict | None = None, leaf_modules=(), spatial_cap: bool = True,
            rules: OpTable | None = None, capture: str = "auto") -> Analysis:
    """Trace `model` (unless it is a GraphModule already) and annotate every node with its 3DRF.

    capture: how to get the graph, "auto" (torch.fx, then torch.export if fx cannot), "fx" or "export" (see
    `fxrf.trace`); `Analysis.capture` says which was used. rules: an op table to use instead of the default
    (`fxrf.DEFAULT_OPS + mine` to override some ops for this call only).

    spatial_cap: True (default) reports the poster's 3DRF^w_k = min(3DRF^w_{k-1} + w_k - 1, w_0), measured
    exactly at the centre neuron (what autograd checks); False reports the uncapped extent of the stack
    (3DRF^w_{k-1} + (w_k - 1) * D_k, which may exceed w_0) and computes volumes and gains from it, as the paper's
    Tables 3-5 do (docs/paper.md). Channel fields are the same either way.

    >>> import torch.nn as nn
    >>> a = analyze(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)), (1, 3, 32, 32))
    >>> [(r.name, r.rf.height, r.rf.channel, r.rf.volume) for r in a.convs()]
    [('_0', 3, 3, 27), ('_1', 5, 3, 75)]
    >>> round(a.record("_1").gain, 4)
    1.7315
    >>> a = analyze(nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)]), (1, 8, 4, 4),
    ...             spatial_cap=False)
    >>> [r.rf.height for r in a.convs()]   # 3, 5, 7 on a 4x4 map (capped: 3, 4, 4)
    [3, 5, 7]
    """
    check_number("alpha", alpha)
    gm, shapes, modules = trace_with_values(model, example_input, concrete_args=concrete_args,
                                            leaf_modules=leaf_modules, rules=rules, capture=capture)
    inputs = _as_shapes(example_input)
    walker = _Walker(gm, shapes, inputs, modules, alpha, strict, rules)
    walker.spatial_cap = spatial_cap
    return walker.run(type(model).__name__)


def analyze_graph(gm: fx.GraphModule, example_inputs, *, constant_inputs=(), alpha: float = DEFAULT_ALPHA,
                  strict: bool = False, name: str | None = None, spatial_cap: bool = True,
                  rules: OpTable | None = None) -> Analysis:
    """Analyse a GraphModule given one example tensor (or shape) per placeholder (spatial_cap: as `analyze`).

    Placeholders at the positions in `constant_inputs` hold parameters or buffers (as torch.compile lifts them
    into graph inputs) and are treated like `get_attr` constants: they see nothing of the model input.
    """
    check_number("alpha", alpha)
    constant_inputs = set(constant_inputs)
    metas = [TMeta(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor)
             else t if isinstance(t, (int, float, torch.SymInt)) else _as_shapes(t)[0]  # sizes pass as values
             for t in example_inputs]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = {placeholders[i].name: example_inputs[i] for i in constant_inputs
              if isinstance(example_inputs[i], torch.Tensor)}
    modules = dict(gm.named_modules())
    from .shapes import propagate
    from .trace import annotate
    shapes = propagate(gm, metas, modules, rules)
    annotate(gm, shapes)
    inputs = [m for i, m in enumerate(metas) if i not in constant_inputs and isinstance(m, TMeta)] or \
        [m for m in metas if isinstance(m, TMeta)]
    walker = _Walker(gm, shapes, inputs, modules, alpha, strict, rules)
    walker.constants = values
    walker.constant_names = {placeholders[i].name for i in constant_inputs}
    walker.spatial_cap = spatial_cap
    return walker.run(name or type(gm).__name__)


class _Walker:
    def __init__(self, gm, shapes, inputs, modules, alpha, strict, rules: OpTable | None = None):
        self.gm, self.shapes, self.alpha, self.strict = gm, shapes, alpha, strict
        self.table = rules or default_table()
        self.input_shape = inputs[0].shape
        self.dims = max(len(self.input_shape) - 2, 0)
        self.modules = modules
        self._summaries: dict = {}
        self._plan: dict = {}
        self.constants: dict = {}  # placeholder name -> tensor, for placeholders that hold parameters
        self.constant_names: set = set()
        self.spatial_cap = True  # False: extents are not capped at the reference size (analyze's spatial_cap)
        self.unsupported: list = []
        self._declined: dict = {}
        self._subs: dict = {}  # node -> {input node: the in-place node whose result it reads instead}
        self.warnings: list = []

    # -- step 1 and 3: the rules ------------------------------------------------------------------------------

    def _ctx_and_rule(self, node):
        plan = self._plan.get(node)  # looked up once, used by both walks and the record
        if plan is None:
            mod = self.modules[node.target] if node.op == "call_module" else None
            plan = self._plan[node] = (mod, self.table.lookup(node, mod))
        return plan

    def _apply(self, node, mod, op, env, stage_of=None, stage=None, subs=None):
        """Fields of `node`'s output from its inputs' fields in `env` (inputs of other stages see nothing)."""

        subs = self._subs.get(node) if subs is None else subs

        def wrap(n):
            v = self.shapes[n]
            if subs is not None:  # an input mutated in place earlier: read its latest version
                n = subs.get(n, n)
            f = env.get(n)
            if stage_of is not None and stage_of.get(n) != stage:
                f = _nothing(f)
            if isinstance(v, TMeta):
                value = None
                if n.op == "get_attr":
                    value = fetch_attr(self.gm, n.target)
                    value = value if isinstance(value, torch.Tensor) else None
                elif n.name in self.constants:
                    value = self.constants[n.name]
                return T(v.shape, f, value)
            if _is_tensorish(v):  # a tuple holding tensors (split, chunk, a module returning several values)
                fs = f if isinstance(f, tuple) else (None,) * len(v)
                return tuple(T(x.shape, y) if isinstance(x, TMeta) else x for x, y in zip(v, fs))
            return v

        back = self._round_trip(node, op)
        if back is not None:  # a flatten/view undone by the next view: the field of what was flattened, exactly
            return wrap(back).field
        args = fx.node.map_arg(node.args, wrap)
        kwargs = fx.node.map_arg(node.kwargs, wrap)
        ctx = Call(node, mod, args, kwargs, self.shapes[node], self.dims)
        if op is None or op.rf is None:
            return self._conservative(ctx, "no rule")
        try:
            return op.rf(ctx)
        except Decline as e:
            return self._conservative(ctx, str(e))
        except FxrfError:
            raise
        except Exception as e:  # a rule that cannot handle this call: conservative here, an error under strict
            if self.strict:
                raise AnalysisError(f"the receptive-field rule of op {op.name!r} failed on "
                                    f"{describe(self.gm, node)}: {type(e).__name__}: {e}") from e
            return self._conservative(ctx, f"the {op.name!r} rule failed: {type(e).__name__}: {e}")

    def _version(self, v: "Version", env, stage_of=None, stage=None):
        """The field of a Version: a view read again from its base's latest version, or a base after a write into
        a part of it (that part replaced by what was written; conservative where it cannot be mapped exactly)."""
        if v.kind == "view":
            mod, op = self._ctx_and_rule(v.node)
            subs = dict(self._subs.get(v.node, {}))
            subs[v.node.args[0]] = v.inputs[0]
            return self._apply(v.node, mod, op, env, stage_of, stage, subs)

        def get(k):
            f = env.get(k)
            return _nothing(f) if stage_of is not None and stage_of.get(k) != stage else f

        base = self.shapes[v.node]
        why = "it is written through a view that cannot be mapped onto it (a permute, a reshape, advanced indexing)"
        try:
            if v.chain is not None:
                if v.region is not None:  # setitem: its value, broadcast to the part it fills
                    val = get(v.inputs[1]) if len(v.inputs) > 1 else None
                    w = None if val is None else broadcast_merge([T(self.shapes[v.inputs[1]].shape, val)], v.region)
                else:
                    w = get(v.write)
                parts = [get(v.inputs[0])]  # the base, then each view down to the part written, before the write
                for shape, step, out in v.chain[:-1]:
                    parts.append(getitem(Call(v.write, None, (T(shape, parts[-1]), step), {},
                                              TMeta(out, base.dtype), self.dims)))
                for (shape, step, _), f in zip(reversed(v.chain), reversed(parts)):
                    w = _write_back(f, shape, step, w)
                return w
        except Decline as e:
            why = str(e)
        ins = tuple(T(self.shapes[k].shape, get(k)) for k in v.inputs if isinstance(self.shapes.get(k), TMeta))
        return self._conservative(Call(v.write, None, ins, {}, base, self.dims),
                                  f"writes into a part of {v.node.name!r} that cannot be mapped exactly ({why}): "
                                  f"{v.node.name!r} is conservative from here on", key=v)

    def _round_trip(self, node, op):
        """The node x when `node` reshapes a reshape of x back to x's shape (flatten then view back)."""
        if op is None or op.name not in _RESHAPES or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        mid = node.args[0]
        if mid.op not in ("call_module", "call_function", "call_method") or not mid.args or len(mid.users) != 1:
            return None
        mop = self._ctx_and_rule(mid)[1]
        src = mid.args[0]
        if mop is None or mop.name not in _RESHAPES or not isinstance(src, fx.Node):
            return None
        a, b = self.shapes.get(src), self.shapes.get(node)
        return src if isinstance(a, TMeta) and isinstance(b, TMeta) and tuple(a.shape) == tuple(b.shape) else None

    def _conservative(self, ctx: Call, reason: str, key=None):
        node = ctx.node
        if (node if key is None else key) not in self._declined:
            self._declined[node if key is None else key] = reason
            if self.strict:
                raise UnsupportedOpError(
                    f"no receptive-field rule for {describe(self.gm, node)}"
                    + ("" if reason == "no rule" else f" ({reason})")
                    + f"; register one with @fxrf.rf_rule({_rule_key(node, ctx.module)}) or call with strict=False "
                      f"to treat it conservatively")
        ins = [t for t in ctx.tensors() if t.field is not None]
        single = isinstance(ctx.out, TMeta)
        results = []
        for o in ((ctx.out,) if single else ctx.out):
            if not isinstance(o, TMeta):
                results.append(None)
                continue
            like = next((t.field for t in ins if tuple(t.shape) == tuple(o.shape)),
                        next((t.field for t in ins if len(t.shape) == len(o.shape)), None))
            sp = like.sp if like is not None else default_sp(o.shape, self.dims)  # keep NHWC as NHWC
            if like is None and tuple(o.shape[a] for a in sp if a is not None) not in \
                    {tuple(t.shape[a] for a in t.field.sp) for t in ins if t.field.is_map}:
                sp = (None,) * self.dims  # no axis is known to hold the map (a window partition): none does
            cshape = _channel_shape(o.shape, sp)
            sizes = [[t.shape[a] if a is not None else 1 for a in t.field.sp] for t in ins]
            results.append(F_.everything([t.field for t in ins], sizes, cshape, sp))
        return results[0] if single else tuple(results)

    # -- the whole pass -----------------------------------------------------------------------------------------

    def run(self, model_name: str) -> Analysis:
        gm = self.gm
        nodes = [n for n in gm.graph.nodes if n.op not in ("output",)]
        self._subs, order = inplace_versions(nodes, self.shapes, self.modules, self.table)
        self.shapes = dict(self.shapes)  # versions have their node's shape
        self.shapes.update({v: self.shapes[v.node] for v in order if isinstance(v, Version)})
        inp_env: dict = {}
        offset = 0
        refs = [n for n in nodes if n.op == "placeholder" and isinstance(self.shapes[n], TMeta)
                and n.name not in self.constant_names]
        layouts = {n: _input_sp(n, self.shapes[n].shape, self.dims) for n in refs}
        words = F_.words_for(sum(math.prod(_channel_shape(self.shapes[n].shape, layouts[n])) for n in refs))
        self._input_caps = []  # (first channel, end channel, map size) of each model input, for input_rf's cap
        for node in order:  # step 1: fields referenced to the model input
            v = self.shapes[node]
            with self._naming(node.write or node.node if isinstance(node, Version) else node):
                if isinstance(node, Version):
                    inp_env[node] = self._version(node, inp_env)
                elif node in layouts:
                    f = _reference(v.shape, self.dims, offset, words=words, sp=layouts[node])  # hull: classic RF
                    self._input_caps.append((offset, offset + f.channels, map_size(f, v.shape)))
                    offset += f.channels
                    inp_env[node] = f
                elif node.op in ("call_module", "call_function", "call_method") and _is_tensorish(v):
                    mod, rule = self._ctx_and_rule(node)
                    inp_env[node] = self._apply(node, mod, rule, inp_env)
        stage_of, stages, starts, context = self._stages(order, inp_env)
        st_env: dict = {}
        loc_env: dict = {}  # the same, with gates and global context seeing nothing (NodeRecord.local_rf)
        offsets = {}
        for s in stages:  # each starting node's channels get their own bits of the stage input
            o = 0
            for name in s.inputs:
                offsets[name] = o
                o += inp_env[self._by_name[name]].channels
        records = []
        for node in order:  # step 3: fields referenced to the stage input
            v = self.shapes[node]
            if not _is_tensorish(v):
                continue
            if isinstance(node, Version):
                with self._naming(node.write or node.node):
                    s = stage_of.get(node)
                    if node.kind == "view" and node.node in starts:  # a stage input is its own reference
                        st_env[node], loc_env[node] = st_env[node.node], loc_env[node.node]
                        continue
                    st_env[node] = self._version(node, st_env, stage_of, s)
                    loc_env[node] = self._version(node, loc_env, stage_of, s)
                continue
            with self._naming(node):
                if node in starts:
                    stage = stages[stage_of[node]]
                    st_env[node] = loc_env[node] = _reference(v.shape, self.dims, offsets[node.name],
                                                              inp_env.get(node), F_.words_for(stage.channels),
                                                              stage.resolution)
                elif node.op in ("call_module", "call_function", "call_method"):
                    mod, rule = self._ctx_and_rule(node)
                    st_env[node] = self._apply(node, mod, rule, st_env, stage_of, stage_of.get(node))
                    if any(loc_env.get(m) is not st_env.get(m) for m in self._inputs(node)):
                        loc_env[node] = self._apply(node, mod, rule, loc_env, stage_of, stage_of.get(node))
                    else:  # nothing upstream is a gate: the local field is the field
                        loc_env[node] = st_env[node]
                if node in context:
                    loc_env[node] = _nothing(st_env.get(node))
                if isinstance(v, TMeta) and node.name not in self.constant_names:
                    records.append(self._record(node, v, stage_of, stages, st_env, inp_env, starts, loc_env))
        for node, reason in self._declined.items():  # a Version: the write that made it conservative
            node = node.write if isinstance(node, Version) else node
            self.unsupported.append((node.name, _target_str(gm, node), reason))
        for r in records:
            gm_node = self._by_name[r.name]
            gm_node.meta[META_KEY] = r
            if r.gain is not None and r.gain <= 0 and r.local_gain is not None and r.local_gain > 0:
                self.warnings.append(
                    f"{r.name}: gain 0 rests on gate-induced saturation (a squeeze-excite gate or global context "
                    f"earlier in stage {r.stage} already sees the whole stage input); through the local path its "
                    f"gain is {r.local_gain:.3g} (NodeRecord.local_gain)")
        return Analysis(gm, model_name, tuple(self.input_shape), self.alpha, stages, records, self.unsupported,
                        self.spatial_cap, self.warnings)

    @contextlib.contextmanager
    def _naming(self, node):
        """Any failure that is not an FxrfError becomes an AnalysisError that names the node."""
        try:
            yield
        except FxrfError:
            raise
        except Exception as e:
            raise AnalysisError(f"fxrf failed on {describe(self.gm, node)}: {type(e).__name__}: {e}. This is a bug "
                                f"in fxrf; as a workaround, mark the module as a leaf (leaf_modules=[...]) or "
                                f"register a rule for this op (docs/architecture.md)") from e

    def _inputs(self, node) -> list:
        """The nodes `node` reads, each in its latest in-place version."""
        if isinstance(node, Version):
            return node.inputs
        subs = self._subs.get(node)
        return [subs.get(m, m) for m in node.all_input_nodes] if subs else node.all_input_nodes

    # -- step 2: stages -----------------------------------------------------------------------------------------

    def _stages(self, nodes, inp_env):
        """A stage starts where the map is resampled (its field's jump differs from every input map's: stride,
        pooling, interpolation), not where padding or cropping changes its size. A 1x1 map computed from a stage
        (global pooling and the gate it feeds, even through vectors and linear layers) belongs to that stage."""
        self._by_name = {n.name: n for n in nodes}
        parent: dict = {}

        def find(n):
            while parent[n] is not n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        maps: dict = {}

        def map_of(n):  # (size, jump) of a node's map; None for vectors, tuples and constants
            if n not in maps:
                f, v = inp_env.get(n), self.shapes.get(n)
                maps[n] = None
                if isinstance(f, Field) and isinstance(v, TMeta) and f.is_map:
                    maps[n] = (tuple(v.shape[a] for a in f.sp), tuple(round(float(j), 9) for j in f.jump))
            return maps[n]

        def constant(n):
            return n.op == "get_attr" or n.name in self.constant_names

        def sliced_on(n):  # a slice of a map read only by slices that resample it further: export slices
            if n not in through:  # x[:, :, ::2, ::2] one axis at a time, where fx has one getitem
                op = self._plan.get(n, (None, None))[1]
                through[n] = op is not None and op.name in _SLICES and map_of(n) is not None and bool(n.users) \
                    and all(getattr(self._plan.get(u, (None, None))[1], "name", None) in _SLICES
                            and u.args and u.args[0] is n and map_of(u) is not None
                            and map_of(u)[1] != map_of(n)[1] for u in n.users)
            return through[n]

        through: dict = {}

        def map_inputs(n):  # the maps a node reads, looking through tuple-valued nodes (split, chunk, ...)
            out = []
            for m in self._inputs(n):
                if constant(m):
                    continue
                if sliced_on(m):  # x[:, :, ::2, ::2] as two slices resamples once, as fx's one getitem does
                    out.extend(map_inputs(m))
                elif map_of(m) is not None:
                    out.append(m)
                elif not isinstance(self.shapes.get(m), TMeta) and _is_tensorish(self.shapes.get(m)):
                    out.extend(map_inputs(m))
            return out

        above: dict = {}

        def maps_above(n):  # for a map computed from vectors (heads folded away and back): the maps they came from
            if n not in above:
                above[n] = []
                for m in self._inputs(n):
                    if constant(m) or not _is_tensorish(self.shapes.get(m)):
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
                if _is_tensorish(self.shapes.get(n)) and not constant(n):
                    attached.append(n)
                continue
            size, jump = mp
            back = self._round_trip(n, self._plan.get(n, (None, None))[1])  # a flatten undone: back on its map
            ins = map_inputs(n) + ([back] if back is not None else [])
            if not ins and not all(s == 1 for s in size):
                ins = maps_above(n)
            same = [m for m in ins if m in parent and map_of(m)[1] == jump]
            if sliced_on(n):  # half of a slicing, not a map of its own: it stays in its input's stage
                same = [m for m in ins if m in parent]
            fed = any(not constant(m) and _is_tensorish(self.shapes.get(m)) for m in self._inputs(n))
            if n.op != "placeholder" and fed and not same and all(s == 1 for s in size):
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
            ins = [n.node] if n in loose and n.kind == "view" else self._inputs(n)
            got = {stage_of.get(m) for m in ins if not constant(m)} - {None} or {None}
            stage_of[n] = got.pop() if len(got) == 1 else None
            if stage_of[n] is not None and isinstance(self.shapes.get(n), TMeta) and n not in loose:
                context.add(n)  # computed from the whole map: a gate or global context for the local field
        result = []
        for i, members in enumerate(stages):
            res = map_of(members[0])[0]
            c0 = sum(inp_env[m].channels for m in members)
            result.append(Stage(i, res, c0, tuple(m.name for m in members)))
        return stage_of, result, set(starts), context

    # -- records ------------------------------------------------------------------------------------------------

    def _summary(self, f: Field, cap, sizes) -> RF:
        key = (id(f), tuple(cap), sizes)  # per-channel ops (BN, ReLU) hand the same Field on: summarise it once
        rf = self._summaries.get(key)
        if rf is None:
            spatial, cmin, cmean = f.summary(tuple(cap), sizes, self.spatial_cap)
            rf = self._summaries[key] = RF(spatial, cmin, cmean)
        return rf

    def _record(self, node, v, stage_of, stages, st_env, inp_env, starts, loc_env) -> NodeRecord:
        s = stage_of.get(node)
        f, lf = st_env.get(node), loc_env.get(node)
        rf = local_rf = None
        if s is not None and isinstance(f, Field):
            rf = self._summary(f, stages[s].resolution, map_size(f, v.shape))
        if s is not None and isinstance(lf, Field):
            local_rf = self._summary(lf, stages[s].resolution, map_size(lf, v.shape))
        fi = inp_env.get(node)
        input_rf = None
        if isinstance(fi, Field) and self.dims:
            input_rf = self._summary(fi, self._cap_of(fi), map_size(fi, v.shape))
        mod, op = self._plan.get(node, (None, None))
        kernel, g, lg = None, None, None
        if op is not None and op.conv_like:  # a kernel type and a gain (any op registered with a ConvSpec)
            ctx = Call(node, mod, fx.node.map_arg(node.args, lambda n: T(self.shapes[n].shape, None)
                                                  if isinstance(self.shapes[n], TMeta) else self.shapes[n]),
                       node.kwargs, v, self.dims)
            kernel = op.spec(ctx).kind
            src = node.args[0]
            src = self._subs.get(node, {}).get(src, src)
            if s is not None and node not in starts and stage_of.get(src) == s:  # a conv of constants: no stage
                g = self._gain(st_env.get(src), rf, stages[s], src)
                lg = self._gain(loc_env.get(src), local_rf, stages[s], src)
        return NodeRecord(node.name, _op_label(node, mod), _target_str(self.gm, node, mod), tuple(v.shape), s, kernel, rf,
                          g, input_rf, node not in self._declined, f if isinstance(f, Field) else None,
                          fi if isinstance(fi, Field) else None, module_path(node), local_rf, lg)

    def _gain(self, prev, rf, stage, src):
        if rf is None or not isinstance(prev, Field):
            return None
        pv = self._summary(prev, stage.resolution, map_size(prev, self.shapes[src].shape)).volume
        return gain_of(pv, rf.volume, stage.volume, self.alpha) if pv > 0 else None

    def _cap_of(self, f: Field) -> tuple:
        """input_rf's cap: per dim, the largest map among the model inputs whose channels the field sees."""
        caps = self._input_caps
        if len(caps) > 1:
            seen = np.unpackbits(np.bitwise_or.reduce(f.bits, axis=0).view(np.uint8), bitorder="little")
            got = [size for a, b, size in caps if seen[a:b].any() and len(size) == f.dims]
            if got:
                return tuple(max(x) for x in zip(*got))
        return caps[0][2] if caps and len(caps[0][2]) == f.dims else tuple(self.input_shape[2:])



def path_of(a: Analysis, node: str | None) -> str:
    """The name users see for a node of `a`: its module path where that path names this node, else the node name."""
    r = a.get(node) if node else None
    return (r.path if r is not None and r.path and a.get(r.path) is r else node) or ""


def map_size(f: Field, shape) -> tuple:
    """Pixels of the tensor's map along each reference dim (1 where it has been pooled away)."""
    return tuple(shape[a] if a is not None else 1 for a in f.sp)


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


def _op_label(node, mod) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return "constant"
    if mod is not None:
        return type(mod).__name__.lower()
    return op_name(node).rsplit(".", 1)[-1]


def _target_str(gm, node, mod=None) -> str:
    if node.op == "call_module":
        mod = mod if mod is not None else gm.get_submodule(node.target)
        return f"{node.target} ({type(mod).__name__})"
    if node.op in ("call_function", "call_method"):
        return op_name(node)
    return str(node.target)


def _rule_key(node, mod) -> str:
    if mod is not None:
        return f"{type(mod).__module__}.{type(mod).__name__}"
    if isinstance(node.target, str):
        return repr(node.target)
    return op_name(node)


# op names that only regroup axes row-major: a pair of them that gives back the shape gives back the field
_RESHAPES = frozenset({"reshape", "flatten", "unflatten", "squeeze", "unsqueeze"})
_SLICES = frozenset({"getitem", "aten_slice"})  # basic indexing: one getitem under fx, one slice per axis under export
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
        return getattr(module, "inplace", False) is True
    return False


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
