"""The independent check: receptive fields measured with autograd on a structurally faithful copy of a model.

The copy has positive weights and biases, batch norms with mean 0 and variance 1 (eval mode), and average
pooling where the model max-pools, so that no gradient cancels or is routed away: a weight that connects two
neurons always shows up as a non-zero gradient. Fed a positive input, the gradient of the centre neuron of each
output channel with respect to the stage input gives that channel's true spatial extent (bounding box of the
non-zero gradient) and channel set (stage-input channels with any non-zero gradient).
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

import fxrf


def faithful_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model).double()  # float64: a saturating sigmoid still has a non-zero gradient
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():  # positive, scaled by fan-in so activations stay moderate
            scale = p[0].numel() if p.dim() > 1 else 1
            p.copy_((torch.rand(p.shape, generator=gen, dtype=p.dtype) * 0.9 + 0.1) / scale)
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                mod.running_mean.zero_()
                mod.running_var.fill_(1.0)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, nn.MaxPool2d):
            parent = m.get_submodule(name.rsplit(".", 1)[0]) if "." in name else m
            setattr(parent, name.rsplit(".", 1)[-1],
                    nn.AvgPool2d(mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode))
    return m.eval()


class _Run(fx.Interpreter):
    """Runs the graph, turning the outputs of `leaves` into fresh leaf tensors (gradients stop there)."""

    def __init__(self, gm, leaves):
        super().__init__(gm)
        self.leaves = set(leaves)
        self.values: dict = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.leaves and isinstance(out, torch.Tensor):
            out = out.detach().requires_grad_(True)
        self.values[n.name] = out
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


def measure(model: nn.Module, input_shape, analysis: fxrf.Analysis, names=None, reference: str = "stage"):
    """{node name: [(extent per spatial dim, bbox touches the border, channel set) per output channel]}.

    reference="stage": gradients w.r.t. the node's stage input (the outputs of the stage's starting nodes, channels
    numbered in the order of analysis.stages[s].inputs); "input": w.r.t. the model input.
    """
    fm = faithful_copy(model)
    x = torch.rand(input_shape, dtype=torch.float64) + 0.5
    gm = fxrf.trace(fm, x, capture=analysis.capture)  # the same capture, so the node names match
    starts = {n: s for s in analysis.stages for n in s.inputs} if reference == "stage" else {}
    run = _Run(gm, set(starts))
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
            leaves_names = list(analysis.stages[r.stage].inputs)
            leaves = [run.values[n] for n in leaves_names]
        else:
            leaves = [x]
        y = _centre(run.values[r.name], f.sp)
        if not y.requires_grad:
            continue
        gs = _grads(y, leaves)
        per_channel = []
        for i in range(len(y)):
            channels, boxes, base = set(), [], 0
            for g, leaf in zip(gs, leaves):
                g = g[i, 0]  # [C..., H, W] of this leaf
                nz = g != 0
                dims = f.dims
                ch_nz = nz.reshape(-1, *g.shape[-dims:]).any(dim=tuple(range(1, 1 + dims))) if dims else nz.reshape(-1)
                channels |= {base + int(c) for c in torch.nonzero(ch_nz).flatten()}
                base += ch_nz.numel()
                if dims and nz.any():
                    sp_nz = nz.reshape(-1, *g.shape[-dims:]).any(dim=0)
                    boxes.append([(int(ix.min()), int(ix.max()), n) for ix, n in
                                  zip(torch.nonzero(sp_nz).T, g.shape[-dims:])])
            ext = []
            for k in range(f.dims):
                if not boxes:
                    ext.append(0)
                    continue
                lo = min(b[k][0] for b in boxes)
                hi = max(b[k][1] for b in boxes)
                ext.append(hi - lo + 1)
            per_channel.append((tuple(ext), frozenset(channels)))
        out[r.name] = per_channel
    return out


def compare(model, input_shape, analysis=None, reference="stage"):
    """(differences between the analysis and the measurement as readable strings, number of nodes compared)."""
    a = analysis or fxrf.analyze(model, input_shape)
    measured = measure(model, input_shape, a, reference=reference)
    problems = []
    for r in a.records:
        if r.name not in measured:
            continue
        f = r.field if reference == "stage" else r.input_field
        cap = a.stages[r.stage].resolution if reference == "stage" else a.input_shape[2:]
        exts = f.extents(cap, fxrf.analysis.map_size(f, r.shape))
        sets = f.sets()
        for c, (ext, chans) in enumerate(measured[r.name]):
            mine = tuple(int(e) for e in exts[c])
            if sets[c] != chans:
                problems.append(f"{r.name} channel {c}: analysis sees channels {sorted(sets[c])[:12]}..., "
                                f"autograd {sorted(chans)[:12]}...")
                break
            # stage fields are exact; the input-referenced field is the classic theoretical RF (Araujo et al.),
            # which does not subtract windows that fall on padding at a coarser level: an upper bound
            exact = reference == "stage"
            if (exact and mine != ext) or (not exact and any(m < e for m, e in zip(mine, ext))):
                problems.append(f"{r.name} channel {c}: analysis extent {mine}, autograd {ext}")
                break
    return problems, len(measured)
