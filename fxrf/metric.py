"""The paper's 3DRF arithmetic: pure functions, no torch.fx.

    3DRF_k   = (3DRF^w_k)^d * 3DRF^c_k
    gain_k   = (3DRF_k - 3DRF_{k-1}) / 3DRF_{k-1} * exp(-alpha * 3DRF_{k-1} / V_0),   V_0 = w_0^d * c_0

>>> round(gain(prev=27, cur=75, v0=32 * 32 * 3, alpha=3.0), 4)   # VGG-11 variant 1, docs/formulas.md
1.7315
"""
from __future__ import annotations

import math
from typing import Sequence

DEFAULT_ALPHA = 3.0  # reproduces the paper's Table 2 (docs/paper.md)


def volume(spatial: Sequence[int], channel: int) -> int:
    """(3DRF^w)^d * 3DRF^c, with one spatial extent per spatial dim (height and width need not be equal)."""
    v = channel
    for s in spatial:
        v *= s
    return v


def gain(prev: float, cur: float, v0: float, alpha: float = DEFAULT_ALPHA) -> float:
    """The 3DRF gain of a layer whose input field has volume `prev` and output field `cur`."""
    if prev <= 0:
        raise ValueError(f"the previous 3DRF volume must be positive, got {prev}")
    return (cur - prev) / prev * math.exp(-alpha * prev / v0)
