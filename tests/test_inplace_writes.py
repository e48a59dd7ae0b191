"""In-place writes that later readers must see, checked against autograd (tests/oracle.py) under both captures.

A buffer written in forward and read back (each `self.buf` is its own get_attr node under torch.fx, one storage).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxrf
from oracle import compare

torch.set_num_threads(1)
CAPTURES = ("fx", "export")


def exact(model, shape, capture, names=None):
    """The analysis, after checking that the stage fields equal autograd's and the input fields bound it (on the
    nodes in `names` only, if given: a tensor written in place later is measured by autograd after the write)."""
    a = fxrf.analyze(model, shape, capture=capture)
    assert a.capture == capture and a.unsupported == []
    problems, n = compare(model, shape, a)
    assert n > 0 and [p for p in problems if names is None or p.split(" ")[0] in names] == []
    above, _ = compare(model, shape, a, reference="input")
    assert [p for p in above if names is None or p.split(" ")[0] in names] == []
    return a


def last_conv(a):
    return a.convs()[-1]


# ---- a buffer written in forward ---------------------------------------------------------------------------------


class Context(nn.Module):
    """ctx <- mean of a(x); c reads b(a(x)) + ctx: through the buffer, c sees the whole 8x8 map."""

    def __init__(self):
        super().__init__()
        self.register_buffer("ctx", torch.zeros(1, 4, 1, 1))
        self.a, self.b, self.c = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))

    def forward(self, x):
        y = self.a(x)
        early = y + self.ctx  # read before the write: the zero buffer adds nothing
        c = self.ctx
        c.copy_(y.mean((2, 3), keepdim=True))
        return self.c(self.b(early) + self.ctx)


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_buffer_written_in_forward_is_read_back_written(capture):
    a = exact(Context().eval(), (1, 4, 8, 8), capture)  # every node: the early add 3x3, the last conv 8x8
    # by hand: a 3x3, b 5x5; the buffer holds a's mean over the map, so c's input sees all 8x8 (before: 5x5 + 3x3 = 7)
    assert [r.rf.spatial for r in a.convs()] == [(3, 3), (5, 5), (8, 8)]
