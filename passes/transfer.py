"""Weight transfer: initialise a factorized block from the standard conv it replaces.

Every factorizer takes the original weight W [O, C, kh, kw] (and bias) and returns the weights of the block's
convs by child name, plus `effective`, the linear map the block computes when its intermediate norms are the
identity and its activations pass everything (the composition of its convs). The reported error of a layer is
||W - effective||_F / ||W||_F, so it measures exactly what the block can and cannot express.

Each factorizer is the Frobenius-optimal choice for its block's structure (the problem decouples per input
channel, and Eckart-Young gives each channel's optimum):

- DW+PW, DW+GPW-g, DW+RPW-g-o: W[o, c] ~ P[o, c] * D[c]. Input channel c meets only the outputs of its group
  (for RPW: the group its rotated position falls in), so P[:, c] is zero elsewhere; the best rank-1 fit of the
  in-group rows W[group(c), c, :] (first singular pair) is optimal, and the out-of-group mass is the floor of
  the error. With one group the floor is zero: exact when W is separable (rank 1 per input channel).
- GC+shuffle-g: a grouped k x k conv whose outputs are shuffled; output p comes from GC row perm[p], which sees
  only that row's input group: keep W[p] on that group, drop the rest (optimal: the kept entries are free).
- PW+DW+PW-e: hidden channel c*E + r copies input channel c; its depthwise filter and projection are the r-th
  singular pair of W[:, c]: the best rank-E approximation per input channel (exact once E >= min(O, kh*kw)).
  Hidden channels beyond the rank get a small filter and a zero projection, so they start silent but train.

The transfer is exact for the convs; intermediate norms are initialised to the identity (eval mode), and an
activation between two factors is only exact where its input is non-negative.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Factors(NamedTuple):
    weights: dict  # child name -> (weight, bias or None)
    effective: torch.Tensor  # [O, C, kh, kw]: the linear map of the block's convs

    def error(self, w: torch.Tensor) -> float | None:
        """Relative Frobenius error of the block's linear map against the original weight (None for weights on
        the meta device: there are no values to compare)."""
        if w.is_meta or self.effective.is_meta:
            return None
        norm = float(w.norm())
        return float((w - self.effective.to(w)).norm()) / norm if norm > 0 else 0.0


def rotation(channels: int, shift: int) -> torch.Tensor:
    """The index a roll by -shift along channels reads: position j holds channel (j + shift) mod C."""
    return (torch.arange(channels) + shift) % channels


def shuffle_perm(channels: int, groups: int) -> torch.Tensor:
    """nn.ChannelShuffle(groups): output p holds input perm[p] = (p % g) * (C / g) + p // g."""
    p = torch.arange(channels)
    return (p % groups) * (channels // groups) + p // groups


def _top(m: torch.Tensor, r: int):
    """Batched best rank-r factors of matrices m [B, rows, cols] (cols small: the k*k taps): m ~ a @ b with
    a [B, rows, r], b [B, r, cols], each factor carrying sqrt(sigma). From the eigenvectors of the small Gram
    matrix m^T m (its top eigenvectors are the right singular vectors), which is much faster than an SVD."""
    lam, v = torch.linalg.eigh((m.transpose(1, 2) @ m).double())  # ascending; only this small solve in float64
    lam, v = lam.flip(-1)[:, :r].clamp_min(0).to(m.dtype), v.flip(-1)[:, :, :r].to(m.dtype)  # [B, r], [B, cols, r]
    sigma = lam.sqrt()
    tiny = sigma <= sigma[:, :1] * 1e-4  # below the float32 noise of the Gram matrix
    scale = torch.where(tiny, 0.0, sigma.clamp_min(torch.finfo(m.dtype).tiny).rsqrt())
    a = (m @ v) * scale[:, None, :]  # u * sqrt(sigma) = m v / sqrt(sigma)
    b = (v * torch.where(tiny, 1.0, sigma.sqrt())[:, None, :]).transpose(1, 2)
    return a, b


def dw_pw(w: torch.Tensor, bias=None, groups: int = 1, shift: int = 0) -> Factors:
    """Depthwise k x k (child "dw") then a pointwise conv with `groups` groups (child "pw") reading the depthwise
    output rolled by `shift` channels: W[o, c] ~ P[o, c] D[c], P zero outside c's (rotated) group."""
    o_ch, c_ch, kh, kw = w.shape
    m, n = c_ch // groups, o_ch // groups
    where = (torch.arange(c_ch) - shift) % c_ch  # dw channel c sits at pw input position where[c]
    group = where // m
    rows = group[:, None] * n + torch.arange(n)  # [C, n]: the outputs input channel c reaches
    per_c = w.detach().float().permute(1, 0, 2, 3).reshape(c_ch, o_ch, kh * kw)
    block = torch.gather(per_c, 1, rows[:, :, None].expand(c_ch, n, kh * kw))  # [C, n, k*k]
    a, b = _top(block, 1)  # per input channel: best rank 1 (Eckart-Young)
    a, b = a[:, :, 0], b[:, 0]  # [C, n], [C, k*k]
    dw = b.reshape(c_ch, 1, kh, kw)
    pw = torch.zeros(o_ch, m)
    pw[rows, (where - group * m)[:, None].expand(c_ch, n)] = a
    eff = torch.zeros(c_ch, o_ch, kh * kw)
    eff.scatter_(1, rows[:, :, None].expand(c_ch, n, kh * kw), a[:, :, None] * b[:, None, :])
    eff = eff.reshape(c_ch, o_ch, kh, kw).permute(1, 0, 2, 3)
    return Factors({"dw": (dw.to(w), None), "pw": (pw.reshape(o_ch, m, 1, 1).to(w), bias)}, eff.to(w))


def gc_shuffle(w: torch.Tensor, bias=None, groups: int = 2) -> Factors:
    """Grouped k x k conv (child "gc") whose outputs then pass nn.ChannelShuffle(groups)."""
    o_ch, c_ch, kh, kw = w.shape
    m, n = c_ch // groups, o_ch // groups
    perm = shuffle_perm(o_ch, groups)  # final output p = gc output perm[p]
    gc = torch.zeros(o_ch, m, kh, kw, dtype=w.dtype, device=w.device)
    eff = torch.zeros_like(w)
    for p in range(o_ch):
        row = int(perm[p])
        g = row // n
        gc[row] = w[p, g * m:(g + 1) * m]
        eff[p, g * m:(g + 1) * m] = w[p, g * m:(g + 1) * m]
    b = None if bias is None else bias.detach()[torch.argsort(perm)]  # gc row perm[p] carries bias[p]
    return Factors({"gc": (gc.detach(), b)}, eff.detach())


def inverted(w: torch.Tensor, bias=None, expansion: int = 6) -> Factors:
    """Pointwise expansion (child "expand", C -> E*C), depthwise k x k on the hidden channels ("dw"), pointwise
    projection ("pw"): per input channel, the best rank-E approximation of W[:, c]."""
    o_ch, c_ch, kh, kw = w.shape
    e = expansion
    per_c = w.detach().float().permute(1, 0, 2, 3).reshape(c_ch, o_ch, kh * kw)
    keep = min(e, kh * kw)
    a, b = _top(per_c, keep)  # [C, O, keep], [C, keep, k*k]: the best rank-`keep` factors per input channel
    gen = torch.Generator().manual_seed(0)
    dw = torch.randn(c_ch, e, kh * kw, generator=gen) / math.sqrt(kh * kw)
    pw = torch.zeros(o_ch, c_ch, e)  # beyond the rank: silent (zero projection), trainable
    live = a.norm(dim=1) > 0  # [C, keep]
    dw[:, :keep] = torch.where(live[:, :, None], b, dw[:, :keep])
    pw[:, :, :keep] = a.permute(1, 0, 2)
    expand = torch.zeros(c_ch, e, c_ch)
    expand[torch.arange(c_ch), :, torch.arange(c_ch)] = 1.0  # hidden channel c*E + r copies input channel c
    eff = torch.einsum("ocr,crk->ock", pw, dw).reshape(o_ch, c_ch, kh, kw)
    return Factors({"expand": (expand.reshape(c_ch * e, c_ch, 1, 1).to(w), None),
                    "dw": (dw.reshape(c_ch * e, 1, kh, kw).to(w), None),
                    "pw": (pw.reshape(o_ch, c_ch * e, 1, 1).to(w), bias)}, eff.to(w))
