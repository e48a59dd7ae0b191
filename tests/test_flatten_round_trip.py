"""A flatten undone by a view back is exact when per-element ops sit between the two: an op that maps each element
on its own keeps every position, so the view back puts each pixel where it was. Checked against autograd
(tests/oracle.py) in both captures."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxrf
from oracle import compare

pytestmark = pytest.mark.threads(1)


class FlattenThrough(nn.Module):
    """conv 3x3 -> conv 3x3 -> flatten(2) -> ops -> view back -> conv 1x1."""

    def __init__(self, ops):
        super().__init__()
        self.ops = ops
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.c = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.b(self.a(x))
        b, c, h, w = y.shape
        t = y.flatten(2)
        for op in self.ops:
            t = op(t)
        return self.c(t.view(b, c, h, w))


OPS = {
    "sigmoid": (torch.sigmoid,),
    "sigmoid then scale": (torch.sigmoid, lambda t: t * 2.0),
    "relu, tanh": (torch.relu, torch.tanh),
    "none": (),  # a direct view back, exact before too
}


def analyse(model, shape, capture):
    a = fxrf.analyze(model, shape, capture=capture)
    assert a.capture == capture
    maps = {r.name for r in a.records if len(r.shape) == 4}  # the flattened tensors are conservative: not compared
    problems, n = compare(model, shape, a)  # stage fields equal autograd's
    assert n > 0 and [p for p in problems if p.split(" ")[0] in maps] == []
    above, _ = compare(model, shape, a, reference="input")  # input fields bound autograd's
    assert [p for p in above if p.split(" ")[0] in maps] == []
    return a


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("ops", list(OPS))
def test_per_element_ops_between_flatten_and_view_keep_the_field(capture, ops):
    a = analyse(FlattenThrough(OPS[ops]), (1, 2, 16, 16), capture)
    # by hand: two 3x3 convs see 5x5 of both input channels; a 1x1 conv after the round trip adds nothing.
    # Before: the view back of the sigmoid's output saw the whole 16x16 map
    r = a.record("c")
    assert r.rf.spatial == (5, 5) and r.rf.channel == 2


def test_an_op_across_positions_between_flatten_and_view_sees_the_whole_map():
    # softmax over the flattened positions mixes them all: by hand, every output of the view back sees the whole
    # 16x16 map of both input channels (autograd agrees), so the round trip must not be taken for exact
    for capture in ("fx", "export"):
        a = analyse(FlattenThrough((lambda t: t.softmax(2),)), (1, 2, 16, 16), capture)
        r = a.record("c")
        assert r.rf.spatial == (16, 16) and r.rf.channel == 2


def test_a_flattened_tensor_with_other_readers_is_no_round_trip():
    # the sigmoid's output is also read by a mean over the positions: only single-user chains are taken, so the
    # view back stays conservative (the whole map), an upper bound of autograd's 3x3
    a = fxrf.analyze(FlattenTwoUsers(), (1, 2, 8, 8))
    assert a.record("c").rf.spatial == (8, 8)
    above, n = compare(FlattenTwoUsers(), (1, 2, 8, 8), a, reference="input")
    assert n > 0 and above == []


class FlattenTwoUsers(nn.Module):
    """The sigmoid's output is read by the view back and by a mean over the flattened positions."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.c = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.a(x)
        b, c, h, w = y.shape
        t = torch.sigmoid(y.flatten(2))
        return self.c(t.view(b, c, h, w)) + t.mean(2)[..., None, None]
