"""The independent check: receptive fields measured with autograd on the analysed graph itself.

`check(analysis)` runs the GraphModule an fxrf Analysis holds (from `fxrf.analyze(model, x)`, with either capture,
or `analyze_graph`) on a copy with float64, positive weights and biases and batch norms with mean 0 and variance 1,
so that no gradient cancels: a weight that connects two neurons always shows up as a non-zero gradient. Ops that
route the gradient to one element (max pooling, max/min reductions, maximum) run for real but are differentiated
as the sum over the same window (a straight-through surrogate), so every element they read gets a gradient. Fed a
positive input, the gradient of the centre neuron of each output channel with respect to the stage input gives
that channel's true spatial extent (bounding box of the non-zero gradient) and channel set (stage-input channels
with any non-zero gradient). Each node's value is snapshot when the node runs, so a later in-place write into it
(`y[:, :1] = z`, `x += r`, ReLU(inplace=True)) does not change what is measured for it.

Soundness needs every value to stay positive where a ReLU, clamp or other kink could zero a gradient: models under
test keep mixed-sign ops (normalisation with batch statistics, subtraction) behind a sigmoid or away from kinks.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxrf

aten = torch.ops.aten


def positive_(m: nn.Module, seed: int = 0) -> nn.Module:
    """In place: float64, positive parameters scaled by fan-in (activations stay moderate), batch-norm running
    statistics 0 and 1, dropout off."""
    m.double()  # float64: a saturating sigmoid still has a non-zero gradient
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            scale = p[0].numel() if p.dim() > 1 else 1
            p.copy_((torch.rand(p.shape, generator=gen, dtype=p.dtype) * 0.9 + 0.1) / scale)
        for name, b in m.named_buffers():  # modules (fx capture) and ATen graphs (export) name them alike
            if name.endswith("running_mean"):
                b.zero_()
            elif name.endswith("running_var"):
                b.fill_(1.0)
    for mod in m.modules():
        if isinstance(mod, nn.modules.dropout._DropoutNd):
            mod.eval()
    return m


def faithful_copy(model: nn.Module) -> nn.Module:
    """A positive, eval-mode float64 copy of a model (for tests that trace it themselves); max pooling becomes
    average pooling there, so its gradient reaches the whole window."""
    m = positive_(copy.deepcopy(model))
    for name, mod in list(m.named_modules()):
        if isinstance(mod, nn.MaxPool2d):
            parent = m.get_submodule(name.rsplit(".", 1)[0]) if "." in name else m
            setattr(parent, name.rsplit(".", 1)[-1],
                    nn.AvgPool2d(mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode))
    return m.eval()


def faithful_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A positive float64 copy of a GraphModule, in the modes it was analysed in (so nothing is renamed)."""
    g = positive_(copy.deepcopy(gm))
    for n in g.graph.nodes:  # an exported graph bakes the example's dtype into factories (arange(dtype=x.dtype))
        n.args, n.kwargs = fx.node.map_aggregate((n.args, n.kwargs), _float64)
        if n.op == "get_attr":  # plain tensor constants (not parameters or buffers) too
            owner, _, attr = n.target.rpartition(".")
            mod = g.get_submodule(owner) if owner else g
            v = getattr(mod, attr, None)
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and v.is_floating_point():
                setattr(mod, attr, v.double()) if attr not in mod._buffers else None
    g.recompile()
    return g


def _float64(v):
    return torch.float64 if isinstance(v, torch.dtype) and v.is_floating_point else v


# -- gradient-routing ops: the real value, the gradient of the sum over what they read ------------------------------

def _straight(real: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    return real.detach() + (surrogate - surrogate.detach())


def _tup(v, n):
    v = [1] if v is None else list(v) if isinstance(v, (tuple, list)) else [v]
    return v * n if len(v) == 1 else v


def _window_sum(x, n, out, kernel, stride=None, padding=0, dilation=1, ceil_mode=False, *_, **__):
    """The sum over each max-pool window, as a depthwise all-ones conv (any dilation); extra zeros on the right
    give ceil_mode's last window, the crop keeps the real output size."""
    k, p, d = _tup(kernel, n), _tup(padding, n), _tup(dilation, n)
    s = k if stride is None or (isinstance(stride, (tuple, list)) and not stride) else _tup(stride, n)
    batched = x.dim() == n + 2
    xb = x if batched else x.unsqueeze(0)
    pad = []
    for i in reversed(range(n)):
        pad += [p[i], p[i] + s[i]]
    c = xb.shape[1]
    y = (F.conv1d, F.conv2d, F.conv3d)[n - 1](F.pad(xb, pad), xb.new_ones(c, 1, *k), stride=s, dilation=d,
                                               groups=c)
    y = y[(Ellipsis, *[slice(0, o) for o in out.shape[-n:]])]
    return y if batched else y[0]


_MAX_POOL = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, torch.max_pool1d: 1, torch.max_pool2d: 2,
             torch.max_pool3d: 3, aten.max_pool1d.default: 1, aten.max_pool2d.default: 2,
             aten.max_pool3d.default: 3, aten.max_pool2d_with_indices.default: 2,
             aten.max_pool3d_with_indices.default: 3}
_ADAPTIVE_MAX = {F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
                 aten.adaptive_max_pool2d.default: 2, aten.adaptive_max_pool3d.default: 3}
_REDUCE = {torch.max, torch.min, torch.amax, torch.amin, aten.amax.default, aten.amin.default, aten.max.dim,
           aten.min.dim, aten.max.default, aten.min.default, aten.maximum.default, aten.minimum.default,
           torch.maximum, torch.minimum, torch.fmax, torch.fmin}
_REDUCE_METHODS = {"max", "min", "amax", "amin", "maximum", "minimum"}
_CLAMP = {torch.clamp, torch.clip, aten.clamp.Tensor, aten.clamp_min.Tensor, aten.clamp_max.Tensor, "clamp", "clip"}


def _with_first(real, first):
    """`real` with its first element (values; indices follow) replaced, keeping the structseq type."""
    if isinstance(real, torch.Tensor):
        return first
    items = [first, *real[1:]]
    return type(real)(items) if type(real) is not tuple else tuple(items)


def _surrogate(fn, args, kwargs, real):
    """The value `real` of a gradient-routing call, differentiated as the sum over what it reads; None: not one."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    values = real if isinstance(real, torch.Tensor) else real[0]
    if fn in _MAX_POOL:
        kw = {k: v for k, v in kwargs.items() if k != "return_indices"}
        return _with_first(real, _straight(values, _window_sum(x, _MAX_POOL[fn], values, *args[1:], **kw)))
    if fn in _ADAPTIVE_MAX:
        n = _ADAPTIVE_MAX[fn]
        avg = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[n - 1]
        return _with_first(real, _straight(values, avg(x, tuple(values.shape[-n:]))))
    if fn in _CLAMP:  # tensor bounds: the output depends on them wherever they could bind
        bounds = [b for b in (*args[1:], *kwargs.values()) if isinstance(b, torch.Tensor)]
        return _straight(real, sum(bounds, x)) if bounds else None
    if fn in _REDUCE or fn in _REDUCE_METHODS:
        other = args[1] if len(args) > 1 else kwargs.get("other")
        if isinstance(other, torch.Tensor):  # elementwise maximum: both operands
            return _straight(values, x + other)
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        s = x.sum() if dim is None or (isinstance(dim, (list, tuple)) and not dim) else x.sum(dim, keepdim=keep)
        return _with_first(real, _straight(values, s))
    return None


class _Run(fx.Interpreter):
    """Runs the graph. The outputs of `leaves` become fresh leaf tensors (gradients stop there; what runs on is a
    copy, so in-place writes never touch a leaf); every tensor is snapshot (cloned) as it is produced."""

    def __init__(self, gm, leaves):
        super().__init__(gm)
        self.leaves = set(leaves)
        self.values: dict = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and n.name in self.leaves:
            leaf = out.detach().requires_grad_(True)
            self.values[n.name] = leaf
            return leaf.clone()
        self.values[n.name] = out.clone() if isinstance(out, torch.Tensor) else out
        return out

    def call_function(self, target, args, kwargs):
        out = super().call_function(target, args, kwargs)
        if target in _MAX_POOL or target in _ADAPTIVE_MAX or target in _REDUCE or target in _CLAMP:
            got = _surrogate(target, args, kwargs, out)
            return out if got is None else got
        return out

    def call_method(self, target, args, kwargs):
        out = super().call_method(target, args, kwargs)
        if target in _REDUCE_METHODS or target in _CLAMP:
            got = _surrogate(target, args, kwargs, out)
            return out if got is None else got
        return out

    def call_module(self, target, args, kwargs):
        out = super().call_module(target, args, kwargs)
        mod = self.fetch_attr(target)
        x = args[0] if args else None
        if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            n = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[type(mod)]
            values = out if isinstance(out, torch.Tensor) else out[0]
            s = _window_sum(x, n, values, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
            return _with_first(out, _straight(values, s))
        if isinstance(mod, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            n = {nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}[type(mod)]
            return _surrogate(F.adaptive_max_pool1d if n == 1 else F.adaptive_max_pool2d if n == 2
                              else F.adaptive_max_pool3d, (x,), {}, out)
        return out


def _centre(t: torch.Tensor, sp) -> torch.Tensor:
    """Per channel (flattened), the value of the neuron at the centre of the map (the tensor itself if no map)."""
    t = t[0]
    index = [slice(None)] * t.dim()
    for a in sp:
        if a is not None:
            index[a - 1] = t.shape[a - 1] // 2
    t = t[tuple(index)]
    return t.reshape(-1)


def _grads(y: torch.Tensor, leaves: list) -> list:
    """d y[i] / d leaves for every i, as a list (one per leaf) of tensors [len(y), *leaf.shape]."""
    eye = torch.eye(len(y), dtype=y.dtype)
    try:
        gs = torch.autograd.grad(y, leaves, grad_outputs=eye, is_grads_batched=True, retain_graph=True,
                                 allow_unused=True)
        return [torch.zeros((len(y),) + leaf.shape, dtype=y.dtype) if g is None else g
                for g, leaf in zip(gs, leaves)]
    except RuntimeError:  # an op without a batching rule: one backward per channel
        rows = [torch.autograd.grad(y[i], leaves, retain_graph=True, allow_unused=True, materialize_grads=True)
                for i in range(len(y))]
        return [torch.stack([r[k] for r in rows]) for k in range(len(leaves))]


def _spatial_last(g: torch.Tensor, sp) -> torch.Tensor:
    """A leaf's gradient [C..., *map] with its map axes (`sp`, batch = 0) moved last, in reference-dim order."""
    axes = [a - 1 for a in sp if a is not None]
    rest = [a for a in range(g.dim()) if a not in axes]
    return g.permute(*rest, *axes)


def measure_graph(analysis: fxrf.Analysis, names=None, reference: str = "stage", x: torch.Tensor | None = None,
                  seed: int = 0) -> dict:
    """{node name: [(extent per spatial dim, channel set) per output channel]} measured by autograd on a positive
    float64 copy of `analysis.graph_module` (so node names are the analysis's, whatever the capture).

    reference="stage": gradients w.r.t. the node's stage input (the outputs of the stage's starting nodes, channels
    numbered in the order of analysis.stages[s].inputs); "input": w.r.t. the model input. A node whose centre
    neuron does not depend on its reference at all measures as no channels and extent 0.
    """
    gm = faithful_graph(analysis.graph_module)
    if x is None:
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(analysis.input_shape, dtype=torch.float64, generator=gen) + 0.5
    x = x.detach().double()
    records = {r.name: r for r in analysis.records}
    starts = {n for s in analysis.stages for n in s.inputs} if reference == "stage" else set()
    run = _Run(gm, starts)
    if reference == "input":
        x.requires_grad_(True)
    run.run(x)
    out = {}
    for r in analysis.records:
        if names is not None and r.name not in names:
            continue
        f = r.field if reference == "stage" else r.input_field
        if f is None or r.op in ("input", "constant") or (reference == "stage" and r.stage is None):
            continue
        if reference == "stage":
            leaf_names = list(analysis.stages[r.stage].inputs)
            leaves = [run.values[n] for n in leaf_names]
            leaf_sp = [records[n].field.sp for n in leaf_names]
        else:
            leaves, leaf_sp = [x], [records[_placeholder(analysis)].input_field.sp]
        value = run.values.get(r.name)
        if not isinstance(value, torch.Tensor):
            continue
        y = _centre(value, f.sp)
        nothing = [((0,) * f.dims, frozenset())] * len(y)
        if not y.requires_grad:
            out[r.name] = nothing
            continue
        gs = _grads(y, leaves)
        per_channel = []
        for i in range(len(y)):
            channels, boxes, base = set(), [], 0
            for g, leaf, sp in zip(gs, leaves, leaf_sp):
                g = _spatial_last(g[i, 0], sp)  # [C..., *map] of this leaf
                dims = sum(a is not None for a in sp)
                nz = g != 0
                flat = nz.reshape(-1, *g.shape[g.dim() - dims:]) if dims else nz.reshape(-1, 1)
                ch_nz = flat.any(dim=tuple(range(1, flat.dim())))
                channels |= {base + int(c) for c in torch.nonzero(ch_nz).flatten()}
                base += ch_nz.numel()
                if dims and nz.any():
                    sp_nz = flat.any(dim=0)
                    boxes.append([(int(ix.min()), int(ix.max())) for ix in torch.nonzero(sp_nz).T])
            ext = tuple(max(b[k][1] for b in boxes) - min(b[k][0] for b in boxes) + 1 if boxes else 0
                        for k in range(f.dims))
            per_channel.append((ext, frozenset(channels)))
        out[r.name] = per_channel
    return out


def _placeholder(analysis) -> str:
    return next(r.name for r in analysis.records if r.op == "input")


def measure(model: nn.Module, input_shape, analysis: fxrf.Analysis, names=None, reference: str = "stage"):
    """`measure_graph` of `analysis` (kept for older tests: `model` and `input_shape` are what was analysed)."""
    return measure_graph(analysis, names, reference)


def _tainted(analysis) -> set:
    """Nodes whose field may rest on a conservative one: unsupported nodes and everything downstream of them; after
    an in-place write by such a node, every later node (aliases of the written tensor are not tracked here)."""
    bad = {name for name, *_ in analysis.unsupported}
    spread = False
    for n in analysis.graph_module.graph.nodes:
        if spread or n.name in bad or any(m.name in bad for m in n.all_input_nodes):
            bad.add(n.name)
            spread = spread or fxrf.analysis.mutates(n)
    return bad


def check(analysis: fxrf.Analysis, reference: str = "stage", names=None, x=None) -> tuple:
    """(differences between the analysis and autograd as readable strings, number of nodes compared).

    Stage fields of exact nodes must equal autograd's, channel by channel (extent and channel set). Nodes listed
    in `analysis.unsupported`, and those downstream of one, are conservative: their channel sets must contain
    autograd's and their extents bound it. Input-referenced fields are the classic theoretical RF (Araujo et
    al.), which does not subtract windows that fall on padding at a coarser level: an upper bound everywhere.
    """
    a = analysis
    measured = measure_graph(a, names, reference, x)
    loose = _tainted(a)
    problems = []
    for r in a.records:
        if r.name not in measured:
            continue
        f = r.field if reference == "stage" else r.input_field
        cap = a.stages[r.stage].resolution if reference == "stage" else a.input_shape[2:]
        exts = f.extents(cap, fxrf.analysis.map_size(f, r.shape))
        sets = f.sets()
        exact = reference == "stage" and r.name not in loose
        how = "exact" if exact else "bound"
        for c, (ext, chans) in enumerate(measured[r.name]):
            mine = tuple(int(e) for e in exts[c])
            if (exact and sets[c] != chans) or (not exact and not chans <= sets[c]):
                problems.append(f"{r.name} channel {c} ({how}): analysis sees channels {_short(sets[c])}, "
                                f"autograd {_short(chans)}")
                break
            if (exact and mine != ext) or (not exact and any(m < e for m, e in zip(mine, ext))):
                problems.append(f"{r.name} channel {c} ({how}): analysis extent {mine}, autograd {ext}")
                break
    return problems, len(measured)


def _short(s) -> str:
    s = sorted(s)
    return str(s) if len(s) <= 12 else f"{s[:12]}... ({len(s)})"


def compare(model, input_shape, analysis=None, reference="stage"):
    """`check` of `analysis` (or of `fxrf.analyze(model, input_shape)`): (problems, number of nodes compared)."""
    a = analysis or fxrf.analyze(model, input_shape)
    return check(a, reference)
