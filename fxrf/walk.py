"""The analysis walk: steps 1 and 3 (fields referenced to the model input, then to the stage input), applying
each node's rule once per walk, and one `NodeRecord` per tensor-valued node."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx as fx

from . import field as F_
from .errors import AnalysisError, FxrfError, UnsupportedOpError
from .field import Field
from .inplace import Version, _write_back, inplace_versions, mutates
from .metric import gain as gain_of
from .naming import describe, module_path, op_name
from .ops import Call, Decline, OpTable, T, TMeta, default_table
from .records import META_KEY, RF, Analysis, NodeRecord, map_size
from .rules import default_sp
from .rules.conv import batch_norm, uses_batch_statistics
from .rules.elementwise import broadcast_merge, per_element
from .rules.layout import getitem
from .shapes import fetch_attr
from .stages import _SLICES, _channel_shape, _input_sp, _is_tensorish, _nothing, _reference, find_stages

# op names that only regroup axes row-major: a pair of them that gives back the shape gives back the field
_RESHAPES = frozenset({"reshape", "flatten", "unflatten", "squeeze", "unsqueeze"})
# elementwise ops of several operands (broadcast): per element where only one operand is a tensor (t * 2.0)
_BROADCASTS = frozenset({"binary", "compare"})
_CALLS = ("call_module", "call_function", "call_method")


class _Walker:
    def __init__(self, gm, shapes, inputs, modules, alpha, strict, rules: OpTable | None = None):
        self.gm, self.shapes, self.alpha, self.strict = gm, shapes, alpha, strict
        self.table = rules or default_table()
        self.input_shape = inputs[0].shape
        self.dims = max(len(self.input_shape) - 2, 0)
        self.modules = modules
        self._summaries: dict = {}
        self._plan: dict = {}
        self._through: dict = {}  # node -> the input whose field it passes on unchanged, or None (see _passes_on)
        self.constants: dict = {}  # placeholder name -> tensor, for placeholders that hold parameters
        self.constant_names: set = set()
        self.spatial_cap = True  # False: extents are not capped at the reference size (analyze's spatial_cap)
        self.unsupported: list = []
        self._declined: dict = {}
        self._subs: dict = {}  # node -> {input node: the in-place node whose result it reads instead}
        self.warnings: list = []
        self._phase = 1  # which walk is running: 1 (model input) or 3 (stage input)
        self._declined1: dict = {}  # what step 1 declined, and step 3's reasons (reanalyze replays them)
        self._reasons3: dict = {}
        self.base = None  # reanalyze: the walk of this graph before `fresh` nodes were inserted into it
        self.fresh: set = set()

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
        src = self._through.get(node, False)
        if src is False:
            src = self._through[node] = self._passes_on(node, mod, op)
        if src is not None:  # what its rule would return, without building the call (half of a CNN's nodes)
            n = subs.get(src, src) if subs is not None else src
            return None if stage_of is not None and stage_of.get(n) != stage else env.get(n)

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
        kwargs = fx.node.map_arg(node.kwargs, wrap) if node.kwargs else node.kwargs
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

    def _passes_on(self, node, mod, op):
        """The input whose field `node`'s rule returns as it is, known without calling it (a per-element op or a
        batch norm with running statistics, given the input positionally), else None."""
        if op is None or op.name in _RESHAPES or not node.args or not isinstance(node.args[0], fx.Node) or \
                not isinstance(self.shapes.get(node.args[0]), TMeta):
            return None
        if op.rf is per_element or (op.rf is batch_norm and mod is not None and
                                    not uses_batch_statistics(Call(node, mod, (), {}))):
            return node.args[0]
        return None

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
        """The node x when `node` reshapes a reshape of x back to x's shape (flatten then view back), with any
        single-user per-element ops of one tensor between the two (x.flatten(2).sigmoid().view(x.shape)): they map
        each element on its own, so every position comes back where it was."""
        if op is None or op.name not in _RESHAPES or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        mid = node.args[0]
        while (prev := self._per_element_input(mid)) is not None:
            mid = prev
        if mid.op not in ("call_module", "call_function", "call_method") or not mid.args or len(mid.users) != 1:
            return None
        mop = self._ctx_and_rule(mid)[1]
        src = mid.args[0]
        if mop is None or mop.name not in _RESHAPES or not isinstance(src, fx.Node):
            return None
        a, b = self.shapes.get(src), self.shapes.get(node)
        return src if isinstance(a, TMeta) and isinstance(b, TMeta) and tuple(a.shape) == tuple(b.shape) else None

    def _per_element_input(self, n):
        """The one tensor `n` reads when `n` is a per-element op of it alone (same shape, one user, no in-place
        write, no in-place version read; t * 2.0 counts, t * u does not), else None."""
        if n.op not in ("call_module", "call_function", "call_method") or len(n.users) != 1 or n in self._subs:
            return None
        mod, op = self._ctx_and_rule(n)
        if op is None or ("per_element" not in op.traits and op.name not in _BROADCASTS) or mutates(n, mod):
            return None
        ins = [m for m in n.all_input_nodes if isinstance(self.shapes.get(m), TMeta)]
        a, b = (self.shapes.get(ins[0]), self.shapes.get(n)) if len(ins) == 1 else (None, None)
        return ins[0] if isinstance(b, TMeta) and tuple(a.shape) == tuple(b.shape) else None

    def _conservative(self, ctx: Call, reason: str, key=None):
        node = ctx.node
        if self._phase == 3:
            self._reasons3.setdefault(node if key is None else key, reason)
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
        base = self.base
        if base is not None:  # reanalyze: a node whose inputs hold the very fields they held before keeps its own
            inp0, st0, loc0, stage_of0, stages0, starts0, context0, _ = base.envs
        shapes = self.shapes
        node = None
        try:  # (one try for the loop, not a context per node: any failure names the node it happened on)
            for node in order:  # step 1: fields referenced to the model input
                if isinstance(node, Version):
                    inp_env[node] = self._version(node, inp_env)
                    continue
                v = shapes[node]
                if node in layouts:
                    f = _reference(v.shape, self.dims, offset, words=words, sp=layouts[node])  # hull: classic RF
                    self._input_caps.append((offset, offset + f.channels, map_size(f, v.shape)))
                    offset += f.channels
                    inp_env[node] = inp0[node] if base is not None and node in inp0 else f
                elif node.op in _CALLS and _is_tensorish(v):
                    if base is not None and node in inp0 and self._kept(node, ((inp_env, inp0),)):
                        inp_env[node] = inp0[node]
                        if node in base._declined1:
                            self._declined.setdefault(node, base._declined1[node])
                        continue
                    mod, rule = self._ctx_and_rule(node)
                    inp_env[node] = self._apply(node, mod, rule, inp_env)
        except FxrfError:
            raise
        except Exception as e:
            raise _failure(gm, node, e) from e
        self._declined1 = dict(self._declined)
        self._phase = 3
        self._by_name = {n.name: n for n in order if not isinstance(n, Version)}
        stage_of, stages, starts, context, members = find_stages(self, order, inp_env)

        def same_stage(node):  # the same stage (or none) as in the base walk, and the same role in it
            s, s0 = stage_of.get(node), stage_of0.get(node)
            return ((s is None and s0 is None) or (s is not None and s0 is not None and stages[s] == stages0[s0])) \
                and (node in context) == (node in context0) and (node in starts) == (node in starts0) \
                and all((stage_of.get(m) == s) == (stage_of0.get(m) == s0) for m in self._inputs(node))
        st_env: dict = {}
        loc_env: dict = {}  # the same, with gates and global context seeing nothing (NodeRecord.local_rf)
        offsets = {}
        for s in stages:  # each starting node's channels get their own bits of the stage input
            o = 0
            for name in s.inputs:
                offsets[name] = o
                o += inp_env[self._by_name[name]].channels
        records, recorded = [], []
        differs: set = set()  # the keys whose local field is not their field (none before the first gate)
        node = None
        try:
            for node in order:  # step 3: fields referenced to the stage input
                v = shapes[node]
                if not _is_tensorish(v):
                    continue
                if isinstance(node, Version):
                    s = stage_of.get(node)
                    if node.kind == "view" and node.node in starts:  # a stage input is its own reference
                        st_env[node], loc_env[node] = st_env[node.node], loc_env[node.node]
                    else:
                        st_env[node] = self._version(node, st_env, stage_of, s)
                        loc_env[node] = self._version(node, loc_env, stage_of, s)
                    if loc_env[node] is not st_env[node]:
                        differs.add(node)
                    continue
                kept = base is not None and node in st0 and same_stage(node)
                if node in starts:
                    stage = stages[stage_of[node]]
                    if kept and offsets[node.name] == base.offsets.get(node.name) and \
                            getattr(inp_env.get(node), "sp", None) == getattr(inp0.get(node), "sp", None):
                        st_env[node] = loc_env[node] = st0[node]
                    else:
                        st_env[node] = loc_env[node] = _reference(v.shape, self.dims, offsets[node.name],
                                                                  inp_env.get(node), F_.words_for(stage.channels),
                                                                  stage.resolution)
                elif kept and self._kept(node, ((st_env, st0), (loc_env, loc0))):
                    st_env[node], loc_env[node] = st0[node], loc0[node]
                    if node in base._reasons3:
                        self._declined.setdefault(node, base._reasons3[node])
                elif node.op in _CALLS:
                    mod, rule = self._ctx_and_rule(node)
                    s = stage_of.get(node)
                    f = st_env[node] = self._apply(node, mod, rule, st_env, stage_of, s)
                    loc_env[node] = f  # unless a gate is upstream: then the local field is its own
                    if differs:
                        for m in self._inputs(node):
                            if m in differs:
                                loc_env[node] = self._apply(node, mod, rule, loc_env, stage_of, s)
                                break
                if node in context:
                    loc_env[node] = _nothing(st_env.get(node))
                if loc_env.get(node) is not st_env.get(node):
                    differs.add(node)
                if isinstance(v, TMeta) and node.name not in self.constant_names:
                    if kept and (node in self._declined) == (node in base._declined) and \
                            node in base.records and self._kept(node, ((st_env, st0), (loc_env, loc0), (inp_env, inp0)),
                                                              own=True):
                        records.append(base.records[node])  # the same fields, inputs and stage: the same record
                    else:
                        records.append(self._record(node, v, stage_of, stages, st_env, inp_env, starts, loc_env))
                    recorded.append(node)
        except FxrfError:
            raise
        except Exception as e:
            raise _failure(gm, node, e) from e
        for node, reason in self._declined.items():  # a Version: the write that made it conservative
            node = node.write if isinstance(node, Version) else node
            self.unsupported.append((node.name, _target_str(gm, node), reason))
        for gm_node, r in zip(recorded, records):
            gm_node.meta[META_KEY] = r
            if r.gain is not None and r.gain <= 0 and r.local_gain is not None and r.local_gain > 0:
                self.warnings.append(
                    f"{r.name}: gain 0 rests on gate-induced saturation (a squeeze-excite gate or global context "
                    f"earlier in stage {r.stage} already sees the whole stage input); through the local path its "
                    f"gain is {r.local_gain:.3g} (NodeRecord.local_gain)")
        out = Analysis(gm, model_name, tuple(self.input_shape), self.alpha, stages, records, self.unsupported,
                       self.spatial_cap, self.warnings)
        # what `extend` and `reanalyze` read to analyse this graph with a few nodes more without walking it again
        self.envs = (inp_env, st_env, loc_env, stage_of, stages, starts, context, members)
        self.offsets = offsets
        self.records = dict(zip(recorded, records))
        if base is not None:  # the base's summaries of fields no longer held go (and so does the base)
            held = {id(f) for env in (inp_env, st_env, loc_env) for f in env.values()}
            self._summaries = {k: r for k, r in self._summaries.items() if id(k[0]) in held}
            self.base = None
        out._walk = self
        return out

    def _kept(self, node, envs, own=False) -> bool:
        """reanalyze: whether `node` computes what it computed in the base walk: not inserted, reading the same
        in-place versions, and each of its inputs holding the very Field objects it held there, in each of `envs`
        ((this walk's env, the base's)); own: `node`'s own fields too."""
        base = self.base
        if node in self.fresh or not _same_subs(self._subs.get(node), base._subs.get(node)):
            return False
        ins = self._inputs(node)
        if any(isinstance(m, Version) for m in ins):
            return False
        return all(env.get(m) is env0.get(m) for env, env0 in envs for m in (ins + [node] if own else ins))

    def _naming(self, node) -> "_Naming":
        """Any failure that is not an FxrfError becomes an AnalysisError that names the node."""
        return _Naming(self.gm, node)

    def _inputs(self, node) -> list:
        """The nodes `node` reads, each in its latest in-place version."""
        if isinstance(node, Version):
            return node.inputs
        subs = self._subs.get(node)
        return [subs.get(m, m) for m in node.all_input_nodes] if subs else node.all_input_nodes

    # -- records ------------------------------------------------------------------------------------------------

    def _summary(self, f: Field, cap: tuple, shape: tuple) -> RF:
        """The RF of field `f` on a tensor of `shape`, capped at `cap`."""
        # per-channel ops (BN, ReLU) hand the same Field on: summarise it once (keyed by the Field itself, which
        # hashes by identity: an id could be reused by a later Field once this one is gone, as extend's can be)
        key = (f, cap, shape)
        rf = self._summaries.get(key)
        if rf is None:
            spatial, cmin, cmean = f.summary(tuple(cap), map_size(f, shape), self.spatial_cap)
            rf = self._summaries[key] = RF(spatial, cmin, cmean)
        return rf

    def _record(self, node, v, stage_of, stages, st_env, inp_env, starts, loc_env) -> NodeRecord:
        s = stage_of.get(node)
        f, lf = st_env.get(node), loc_env.get(node)
        shape = tuple(v.shape)
        rf = local_rf = None
        if s is not None:
            cap = stages[s].resolution
            if isinstance(f, Field):
                rf = self._summary(f, cap, shape)
            if isinstance(lf, Field):  # (the same field unless downstream of a gate)
                local_rf = rf if lf is f else self._summary(lf, cap, shape)
        fi = inp_env.get(node)
        input_rf = None
        if isinstance(fi, Field) and self.dims:
            input_rf = self._summary(fi, self._cap_of(fi), shape)
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
                prev, local_prev = st_env.get(src), loc_env.get(src)
                g = self._gain(prev, rf, stages[s], src)
                lg = g if local_prev is prev and local_rf is rf else self._gain(local_prev, local_rf, stages[s], src)
        return NodeRecord(node.name, _op_label(node, mod), _target_str(self.gm, node, mod), shape, s, kernel, rf,
                          g, input_rf, node not in self._declined, f if isinstance(f, Field) else None,
                          fi if isinstance(fi, Field) else None, module_path(node), local_rf, lg)

    def _gain(self, prev, rf, stage, src):
        if rf is None or not isinstance(prev, Field):
            return None
        pv = self._summary(prev, stage.resolution, tuple(self.shapes[src].shape)).volume
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


class _Naming:
    """_Walker._naming's context (a class: a generator-based context manager costs several times more, twice per
    node)."""

    __slots__ = ("gm", "node")

    def __init__(self, gm, node):
        self.gm, self.node = gm, node

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or isinstance(e, FxrfError) or not isinstance(e, Exception):
            return False
        raise _failure(self.gm, self.node, e) from e


def _failure(gm, node, e: Exception) -> AnalysisError:
    """A failure that is not an FxrfError, as an AnalysisError that names the node (a Version: the write, or the
    node it is a version of)."""
    if isinstance(node, Version):
        node = node.write or node.node
    return AnalysisError(f"fxrf failed on {describe(gm, node)}: {type(e).__name__}: {e}. This is a bug in fxrf; as a "
                         f"workaround, mark the module as a leaf (leaf_modules=[...]) or register a rule for this op "
                         f"(docs/architecture.md)")


def _same_subs(a: dict | None, b: dict | None) -> bool:
    """Whether two walks' in-place substitutions of one node name the same nodes and versions."""
    if not a or not b:
        return not a and not b
    return {k.name: v.name for k, v in a.items()} == {k.name: v.name for k, v in b.items()}


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


def extend(base: Analysis, gm: fx.GraphModule, chain: list) -> dict | None:
    """{name: NodeRecord} of `chain`, nodes inserted into `base`'s graph (giving `gm`) right after one of its nodes
    p, each reading the one before (the first reads p) and nothing else, the last one's output replacing p's for
    its consumers: what `fxrf.analyze(gm)` records for them, without walking the rest of the graph again.

    Exact where the chain leaves the rest unchanged upstream of it and does not change p's map: every chain node
    keeps p's shape, map axes and pixel grid (an identity conv, a norm, an activation), so no stage changes, the
    chain joins p's stage, and its fields follow from p's fields in `base` alone. None where that cannot be shown
    (the caller analyses `gm` whole); the organizer's tests compare both on random and torchvision models."""
    w0 = base._walk
    if w0 is None or not chain:
        return None
    inp0, st0, loc0, stage_of0, stages, starts0, context0, members0 = w0.envs
    by_name = {n.name: n for n in w0._by_name.values()}
    p = chain[0].args[0] if chain[0].args else None
    old = by_name.get(getattr(p, "name", None))
    if not isinstance(p, fx.Node) or old is None or old not in members0 or old in context0:
        return None
    v = w0.shapes.get(old)
    s = stage_of0.get(old)
    if not isinstance(v, TMeta) or s is None or not isinstance(inp0.get(old), Field):
        return None
    modules = {n.target: gm.get_submodule(n.target) for n in chain if n.op == "call_module"}
    w = _Walker(gm, {p: v}, [TMeta(w0.input_shape, v.dtype)], modules, w0.alpha, w0.strict, w0.table)
    w.spatial_cap, w.constants, w.constant_names = w0.spatial_cap, w0.constants, w0.constant_names
    w._input_caps = w0._input_caps
    w._summaries = dict(w0._summaries)  # p's are done; new ones must not outlive their fields in base's cache
    prev = p
    for n in chain:  # a plain chain: each reads the one before and nothing else; no view, no slice, no write that
        if n.op not in ("call_module", "call_function", "call_method") or n.all_input_nodes != [prev]:
            return None
        mod, op = w._ctx_and_rule(n)
        if op is None or op.name in _RESHAPES or op.name in _SLICES:
            return None
        if mutates(n, mod) and (prev is p or w._ctx_and_rule(prev)[1].kind not in ("conv", "norm")):
            return None  # could reach p's storage (only a conv's or a norm's output is surely a fresh tensor)
        prev = n
    from .shapes import evaluate
    for n in chain:
        w.shapes[n] = evaluate(n, gm, w.shapes, modules, w.table)
        if not isinstance(w.shapes[n], TMeta) or tuple(w.shapes[n].shape) != tuple(v.shape):
            return None
    inp, st, loc = {p: inp0[old]}, {p: st0.get(old)}, {p: loc0.get(old)}
    stage_of, prev = {p: s}, p
    for n in chain:
        mod, op = w._ctx_and_rule(n)
        with w._naming(n):
            inp[n] = w._apply(n, mod, op, inp)
        f = inp[n]
        if not isinstance(f, Field) or f.sp != inp[p].sp or f.jump != inp[p].jump:
            return None  # another map or pixel grid: the stages could change
        stage_of[n] = s  # the same map as p's input: p's stage, not a start (fxrf.stages)
        with w._naming(n):
            st[n] = w._apply(n, mod, op, st, stage_of, s)
            loc[n] = st[n] if loc[prev] is st[prev] else w._apply(n, mod, op, loc, stage_of, s)
        prev = n
    from .trace import annotate
    annotate(gm, {n: w.shapes[n] for n in chain})  # as analyze does: costs read them
    out = {}
    for n in chain:
        out[n.name] = n.meta[META_KEY] = w._record(n, w.shapes[n], stage_of, stages, st, inp, set(), loc)
    return out


def reanalyze(base: Analysis, gm: fx.GraphModule, fresh, name: str | None = None) -> Analysis | None:
    """`fxrf.analyze` of `gm` (the same records, stages, fields, warnings), where `gm` is `base.graph_module` after
    the nodes `fresh` were inserted into it in place (nothing removed, modules unchanged), without walking it all
    again: shapes are `base`'s but for the fresh nodes (and their consumers, checked unchanged); a node keeps its
    fields (and record) from `base` where it is not fresh, reads the same in-place versions, sits in the same stage
    and its inputs hold the very Field objects they held there. What a fresh node changes is walked again: the
    fields downstream of it referenced to the model input, those referenced to its stage's input downstream of it,
    and their records. None where the graph is not `base`'s plus `fresh` (analyse it whole).

    `base` is left as it was, but its graph is `gm`'s: use it no more. tests/test_incremental.py compares this with
    whole analyses."""
    w0 = base._walk
    fresh = set(fresh)
    if w0 is None or w0.gm is not gm:
        return None
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    old = {n for n in w0.shapes if isinstance(n, fx.Node) and n.op != "output"}
    if {n for n in nodes if n not in fresh} != old or not fresh <= set(nodes):
        return None
    from .shapes import evaluate
    modules = dict(w0.modules)  # the base's, and the fresh nodes' (named_modules() of a big model costs)
    modules.update({n.target: gm.get_submodule(n.target) for n in fresh if n.op == "call_module"})
    shapes = {n: v for n, v in w0.shapes.items() if isinstance(n, fx.Node)}
    for n in nodes:
        if n in fresh:
            shapes[n] = evaluate(n, gm, shapes, modules, w0.table)
    for n in nodes:  # a consumer of a fresh node computes what it computed before, or shapes would change further
        if n not in fresh and any(m in fresh for m in n.all_input_nodes):
            if evaluate(n, gm, shapes, modules, w0.table) != shapes[n]:
                return None
    from .trace import annotate
    annotate(gm, {n: shapes[n] for n in fresh})
    w = _Walker(gm, shapes, [TMeta(w0.input_shape, torch.float32)], modules, w0.alpha, w0.strict, w0.table)
    w.spatial_cap, w.constants, w.constant_names = w0.spatial_cap, w0.constants, w0.constant_names
    w._summaries = dict(w0._summaries)
    w.base, w.fresh = w0, fresh
    return w.run(name or base.model)
