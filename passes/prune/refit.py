"""Calibration after pruning: each conv or linear that lost input channels is refit by least squares so that, on
the pruned model's own activations, it computes what the original layer computed at the output channels it kept.

For a layer y = W x + b (a conv read as a matrix over its unfolded patches), with X the pruned model's inputs to it
(patches as rows, a column of ones for the bias) and Y the original layer's outputs on the original model's
inputs, the fit is W' = (X^T X + lambda I)^-1 X^T Y (ridge lambda = `ridge` times the mean diagonal). The layers
are fit in graph order, each on the inputs the layers fit before it produce, so an error made early is corrected
downstream. A fit that does not lower the layer's error on a held-out batch is dropped (it did not help).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

POSITIONS = 2048  # patches sampled per batch and layer (enough rows for a C*k*k-wide fit, bounded memory)
MAX_WIDTH = 8192  # the widest fit: its normal equations hold MAX_WIDTH^2 doubles (512 MiB); wider layers keep
# their sliced weights (a VGG classifier's 25088 inputs would need 5 GB)


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
def refit(original: nn.Module, pruned: nn.Module, layers: dict, batches: list, *, ridge: float = 1e-4,
          seed: int = 0) -> list:
    """Refit `pruned`'s layers in place. layers: {path: kept output indices}, in graph order; batches: input
    tensors, the last held out to judge each fit. Only standard convs (groups=1, 2-D, zero padding) and linears
    narrower than MAX_WIDTH inputs are fit."""
    fit_on, judge = batches[:-1] or batches, batches[-1:]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for path, keep in layers.items():
        m = pruned.get_submodule(path)
        if not (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1
                                             and m.padding_mode == "zeros")):  # (unfold pads with zeros)
            continue
        if m.weight[0].numel() + 1 > MAX_WIDTH:
            continue
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
        m.weight.copy_(w[:, :-1].reshape(m.weight.shape))
        if m.bias is not None:
            m.bias.copy_(w[:, -1])
        elif w[:, -1].abs().max() > 0:  # no bias to hold the offset: fit again without the ones column
            w2 = torch.linalg.solve(a[:-1, :-1] + lam * torch.eye(n - 1, dtype=a.dtype), b[:-1]).T.float()
            m.weight.copy_(w2.reshape(m.weight.shape))
        after = _error(original, pruned, path, keep, judge)
        kept = after < before
        if not kept:
            m.weight.copy_(old_w)
            if old_b is not None:
                m.bias.copy_(old_b)
        out.append(Refit(path, before, after, kept))
    return out


def _error(original, pruned, path, keep, judge) -> float:
    """The layer's relative output error on the held-out batch: ||y' - y|| / ||y|| at the kept outputs."""
    y = torch.cat([t.flatten() for t in _select(_capture(original, path, judge, True), keep, original, path)])
    y2 = torch.cat([t.flatten() for t in _capture(pruned, path, judge, True)])
    return float((y2 - y).norm() / y.norm().clamp_min(1e-12))


def _select(ys, keep, model, path):
    lin = isinstance(model.get_submodule(path), nn.Linear)
    return [y[..., keep] if lin else y[:, keep] for y in ys]
