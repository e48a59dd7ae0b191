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
from .naming import describe, op_name
from .ops import Call, Decline, OpTable, T, TMeta, default_table
from .rules import default_sp
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
        from .cost import model_cost
        return model_cost(self.graph_module)

    def to_dict(self) -> dict:
        from .report import to_dict
        return to_dict(self)

    def table(self, width: int | None = 80, depth: int | None = None) -> str:
        from .report import table
        return table(self, width, depth)


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


def check_number(name: str, value, *, minimum: float | None = 0.0) -> float:
    """A finite real number (not a bool or a string), at least `minimum` (None: any sign): InputError otherwise.

    >>> check_number("alpha", 3)
    3.0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {type(value).__name__} {value!r}: pass e.g. {name}=3.0")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        raise InputError(f"{name} must be a finite number" + ("" if minimum is None else f" >= {minimum:g}")
                         + f", got {value!r}")
    return value


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

    def _apply(self, node, mod, op, env, stage_of=None, stage=None):
        """Fields of `node`'s output from its inputs' fields in `env` (inputs of other stages see nothing)."""

        subs = self._subs.get(node)

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

    def _conservative(self, ctx: Call, reason: str):
        node = ctx.node
        if node not in self._declined:
            self._declined[node] = reason
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
        self._subs = inplace_versions(nodes, self.shapes, self.modules)
        inp_env: dict = {}
        offset = 0
        refs = [n for n in nodes if n.op == "placeholder" and isinstance(self.shapes[n], TMeta)
                and n.name not in self.constant_names]
        layouts = {n: _input_sp(n, self.shapes[n].shape, self.dims) for n in refs}
        words = F_.words_for(sum(math.prod(_channel_shape(self.shapes[n].shape, layouts[n])) for n in refs))
        self._input_caps = []  # (first channel, end channel, map size) of each model input, for input_rf's cap
        for node in nodes:  # step 1: fields referenced to the model input
            v = self.shapes[node]
            with self._naming(node):
                if node in layouts:
                    f = _reference(v.shape, self.dims, offset, words=words, sp=layouts[node])  # hull: classic RF
                    self._input_caps.append((offset, offset + f.channels, map_size(f, v.shape)))
                    offset += f.channels
                    inp_env[node] = f
                elif node.op in ("call_module", "call_function", "call_method") and _is_tensorish(v):
                    mod, rule = self._ctx_and_rule(node)
                    inp_env[node] = self._apply(node, mod, rule, inp_env)
        stage_of, stages, starts, context = self._stages(nodes, inp_env)
        st_env: dict = {}
        loc_env: dict = {}  # the same, with gates and global context seeing nothing (NodeRecord.local_rf)
        offsets = {}
        for s in stages:  # each starting node's channels get their own bits of the stage input
            o = 0
            for name in s.inputs:
                offsets[name] = o
                o += inp_env[self._by_name[name]].channels
        records = []
        for node in nodes:  # step 3: fields referenced to the stage input
            v = self.shapes[node]
            if not _is_tensorish(v):
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
        for node, reason in self._declined.items():
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

        starts, attached = [], []
        for n in nodes:
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
            got = {stage_of.get(m) for m in self._inputs(n) if not constant(m)} - {None} or {None}
            stage_of[n] = got.pop() if len(got) == 1 else None
            if stage_of[n] is not None and isinstance(self.shapes.get(n), TMeta):
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



def module_path(node: fx.Node) -> str | None:
    """The module a node belongs to: a call_module's target, else the innermost entry of the `nn_module_stack`
    that torch.fx and torch.export record (None: the model's own forward)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1]
    path = path[0] if isinstance(path, tuple) else path
    return str(path) or None


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


def inplace_versions(nodes, shapes: dict, modules: dict) -> dict:
    """{node: {input: version}}: after `z.add_(y)` (node n), later readers of z (or of anything aliasing it)
    read n's value. Only tensor-valued first arguments count (operator.iadd also adds Python ints). Every get_attr
    of one attribute reads the same storage: a buffer written in forward is read back written."""
    root, latest, subs, attrs = {}, {}, {}, {}
    for n in nodes:
        if n.op == "get_attr":
            root[n] = attrs.setdefault(n.target, n)
        got = {}
        for m in n.all_input_nodes:
            v = latest.get(root.get(m, m))
            if v is not None and v is not m:
                got[m] = v
        if got:
            subs[n] = got
        mod = modules.get(n.target) if n.op == "call_module" else None
        first = n.args[0] if n.args else None
        if isinstance(first, fx.Node) and isinstance(shapes.get(first), TMeta) and mutates(n, mod):
            r = root.get(first, first)
            root[n] = r
            latest[r] = n
    return subs


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
