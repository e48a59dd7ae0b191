"""Calibration after pruning: each conv or linear that lost input channels is refit by least squares so that, on
the pruned model's own activations, it computes what the original layer computed at the output channels it kept.

For a layer y = W x + b (a conv read as a matrix over its unfolded patches), with X the pruned model's inputs to it
(patches as rows, a column of ones for the bias) and Y the original layer's outputs on the original model's
inputs, the fit is W' = (X^T X + lambda I)^-1 X^T Y (ridge lambda = `ridge` times the mean diagonal). The layers
are fit in graph order, each on the inputs the layers fit before it produce, so an error made early is corrected
downstream. A fit that does not lower the layer's error on a held-out batch is dropped (it did not help).
Batch norms are re-estimated in the same walk, each before the first layer after it is fit: a fit made before a
norm upstream of it changed would be a fit to activations the model no longer computes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

POSITIONS = 2048  # patches sampled per batch and layer (enough rows for a C*k*k-wide fit, bounded memory)
MAX_WIDTH = 8192  # the widest fit: its normal equations hold MAX_WIDTH^2 doubles (512 MiB); wider layers keep
# their sliced weights (a VGG classifier's 25088 inputs would need 5 GB)


def fittable(m: nn.Module) -> bool:
    """A linear, or a standard 1-D/2-D conv with zero padding (unfold pads with zeros), not too wide."""
    if not (isinstance(m, nn.Linear) or (isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1
                                         and m.padding_mode == "zeros")):
        return False
    return m.weight[0].numel() + 1 <= MAX_WIDTH


@dataclass(frozen=True)
class Refit:
    """One layer's fit: its relative output error on the held-out batch before and after (kept: after < before)."""

    path: str
    error_before: float
    error_after: float
    kept: bool


def _rows(m: nn.Module, x: torch.Tensor, gen: torch.Generator | None, pick=None):
    """(rows, pick): the layer's input as rows of a matrix (unfolded patches for a conv), `POSITIONS` of them per
    batch sampled with `gen` (or the positions `pick` chose before)."""
    if isinstance(m, nn.Linear):
        r = x.reshape(-1, x.shape[-1])
    elif isinstance(m, nn.Conv1d):  # a 1-D conv is a 2-D one over [N, C, L, 1]
        r = F.unfold(x[..., None], (m.kernel_size[0], 1), (m.dilation[0], 1), (m.padding[0], 0), (m.stride[0], 1))
        r = r.transpose(1, 2).reshape(-1, m.weight[0].numel())
    else:
        r = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2).reshape(-1, m.weight[0].numel())
    if pick is None:
        pick = torch.randperm(len(r), generator=gen)[:POSITIONS] if len(r) > POSITIONS else None
    return (r if pick is None else r[pick]), pick


def _targets(m: nn.Module, y: torch.Tensor, pick, keep):
    y = y.reshape(-1, y.shape[-1]) if isinstance(m, nn.Linear) else y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    y = y[:, keep]
    return y if pick is None else y[pick]


def _capture(model, path, xs, output: bool):
    got = []
    mod = model.get_submodule(path)
    h = (mod.register_forward_hook(lambda m, a, o: got.append(o.detach())) if output else
         mod.register_forward_pre_hook(lambda m, a: got.append(a[0].detach())))
    try:
        with torch.no_grad():
            for x in xs:
                model(x)
    finally:
        h.remove()
    return got


@torch.no_grad()
def refit(original: nn.Module, pruned: nn.Module, order: list, batches: list, *, ridge: float = 1e-4,
          seed: int = 0) -> list:
    """Calibrate `pruned` in place, module by module in graph order. order: (path, kept output indices) for a
    layer to refit, (path, None) for a batch norm to re-estimate; batches: input tensors, the last held out to judge
    each fit (`fittable` layers only). A norm is re-estimated before any layer after it is fit, never after: a fit
    made on activations that a later re-estimation upstream changes would be a fit to something else."""
    fit_on, judge = batches[:-1] or batches, batches[-1:]
    gen = torch.Generator().manual_seed(seed)
    out, norms = [], []
    for path, keep in order:
        if keep is None:
            norms.append(path)
            continue
        m = pruned.get_submodule(path)
        if not fittable(m):
            continue
        _reestimate(pruned, norms, batches[:-1] or batches)
        norms = []
        xs = _capture(pruned, path, fit_on, output=False)
        ys = _capture(original, path, fit_on, output=True)
        n = m.weight[0].numel() + 1
        a = torch.zeros(n, n, dtype=torch.float64)
        b = torch.zeros(n, len(keep), dtype=torch.float64)
        for x, y in zip(xs, ys):
            r, pick = _rows(m, x, gen)
            t = _targets(m, y, pick, keep)
            r = torch.cat([r, torch.ones(len(r), 1)], 1).double()
            a += r.T @ r
            b += r.T @ t.double()
        lam = ridge * float(a.diagonal().mean())
        w = torch.linalg.solve(a + lam * torch.eye(n, dtype=a.dtype), b).T.float()  # (out, in*k*k + 1)
        before = _error(original, pruned, path, keep, judge)
        old_w, old_b = m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone()
        if m.bias is not None:
            m.weight.copy_(w[:, :-1].reshape(m.weight.shape))
            m.bias.copy_(w[:, -1])
        else:  # no bias to hold the offset: the fit without the ones column
            w2 = torch.linalg.solve(a[:-1, :-1] + lam * torch.eye(n - 1, dtype=a.dtype), b[:-1]).T.float()
            m.weight.copy_(w2.reshape(m.weight.shape))
        after = _error(original, pruned, path, keep, judge)
        kept = after < before
        if not kept:
            m.weight.copy_(old_w)
            if old_b is not None:
                m.bias.copy_(old_b)
        out.append(Refit(path, before, after, kept))
    _reestimate(pruned, norms, batches[:-1] or batches)
    return out


def _reestimate(model: nn.Module, paths: list, xs: list) -> None:
    """The running statistics of the batch norms at `paths` (and only those) estimated afresh on `xs` (a cumulative
    average, as fxrf.training.calibrate.recalibrate_bn does), the rest of the model as it is."""
    norms = [model.get_submodule(p) for p in paths]
    norms = [bn for bn in norms if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats]
    if not norms:
        return
    saved = [(bn.momentum, bn.training) for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.training = True
    try:
        for x in xs:
            model(x)
    finally:
        for bn, (mom, training) in zip(norms, saved):
            bn.momentum, bn.training = mom, training


def _error(original, pruned, path, keep, judge) -> float:
    """The layer's relative output error on the held-out batch: ||y' - y|| / ||y|| at the kept outputs."""
    y = torch.cat([t.flatten() for t in _select(_capture(original, path, judge, True), keep, original, path)])
    y2 = torch.cat([t.flatten() for t in _capture(pruned, path, judge, True)])
    return float((y2 - y).norm() / y.norm().clamp_min(1e-12))


def _select(ys, keep, model, path):
    lin = isinstance(model.get_submodule(path), nn.Linear)
    return [y[..., keep] if lin else y[:, keep] for y in ys]
