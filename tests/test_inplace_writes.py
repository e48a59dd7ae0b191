"""In-place writes that later readers must see, checked against autograd (tests/oracle.py) under both captures.

A buffer written in forward and read back (each `self.buf` is its own get_attr node under torch.fx, one storage).
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxrf
from oracle import compare, measure

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


# ---- writes into a view ------------------------------------------------------------------------------------------


class ViewWrite(nn.Module):
    """y = depthwise(x) (channel c sees input channel c); then a write of p(x)'s channel 0 (p standard: it sees all
    4 channels) into y's channel 0; dw (depthwise) reads y. By hand: dw's channels see 4, 1, 1, 1 input channels:
    mean 1.75 (before: 1.0, the write was lost); spatially 3 (y) or 1 (p) then 3 (dw): 5 either way."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.p = nn.Conv2d(4, 4, 1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.dw2 = nn.Conv2d(2, 2, 1, groups=2)

    def forward(self, x):
        y = self.a(x)
        early = y[:, 0:2]  # a view made before the write and read after it
        if self.how == "add_":
            y[:, 0].add_(self.p(x)[:, 0])
        elif self.how == "copy_":
            y[:, 0:1].copy_(self.p(x)[:, 0:1])
        elif self.how == "setitem":
            y[:, 0] = self.p(x)[:, 0]
        elif self.how == "split":  # autograd refuses this write (a view from a multi-view op): hand count only
            first, _ = y.split(2, dim=1)
            first[:, 0].add_(self.p(x)[:, 0])
        return self.dw(y) + self.dw2(early).sum(1, keepdim=True)


def _outputs(a):
    """The nodes from dw on: read after the write (autograd measures earlier ones after it too)."""
    names = [r.name for r in a.records]
    return set(names[names.index(a.record("dw").name):])


@pytest.mark.parametrize("how,captures", [("add_", CAPTURES), ("copy_", CAPTURES), ("setitem", ("export",))])
def test_a_write_into_a_view_is_seen_by_readers_of_the_base_and_of_other_views(how, captures):
    got = {}
    for capture in captures:
        model = ViewWrite(how).eval()
        a = fxrf.analyze(model, (1, 4, 8, 8), capture=capture)
        exact(model, (1, 4, 8, 8), capture, names=_outputs(a))
        dw, dw2 = a.record("dw"), a.record("dw2")
        assert (dw.rf.channel_mean, dw.rf.spatial) == (1.75, (5, 5))  # the hand count above
        assert [len(s) for s in dw2.field.sets()] == [4, 1]  # `early` is y's channels 0 and 1, read after the write
        got[capture] = (dw.rf, dw2.rf, dw.input_rf)
    assert len(set(got.values())) == 1  # fx and export agree


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_write_into_a_piece_of_split_reaches_the_split_tensor(capture):
    with torch.no_grad():
        a = fxrf.analyze(ViewWrite("split").eval().requires_grad_(False), (1, 4, 8, 8), capture=capture)
    # by hand, as ViewWrite says: channel 0 of y sees the 4 channels p sees, the others their own
    assert a.unsupported == [] and a.record("dw").rf.channel_mean == 1.75
    assert [len(s) for s in a.record("dw2").field.sets()] == [4, 1]


def test_setitem_in_a_torch_fx_graph():
    """operator.setitem (as torch.compile's graphs write `y[:, 0] = v`) returns nothing: the write must not be lost."""
    m = ViewWrite("add_").eval()
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_module("a", (x,))
    early = g.call_function(operator.getitem, (y, (slice(None), slice(0, 2))))
    p0 = g.call_function(operator.getitem, (g.call_module("p", (x,)), (slice(None), 0)))
    g.call_function(operator.setitem, (y, (slice(None), 0), p0))
    out = g.call_function(operator.add, (g.call_module("dw", (y,)), g.call_method(
        "sum", (g.call_module("dw2", (early,)), 1), {"keepdim": True})))
    g.output(out)
    gm = fx.GraphModule(m, g)
    a = fxrf.analyze(gm, (1, 4, 8, 8))
    exact(gm, (1, 4, 8, 8), "fx", names=_outputs(a))
    assert a.record("dw").rf.channel_mean == 1.75


class UnmappableWrite(nn.Module):
    """Writes that cannot be mapped onto a per-channel field: a band of rows, a permuted view."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.p = nn.Conv2d(4, 4, 5, padding=2)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)

    def forward(self, x):
        y = self.a(x)
        if self.how == "rows":
            y[:, :, 0:2].add_(self.p(x)[:, :, 0:2])  # away from the centre: autograd sees 1 channel there
        else:
            y.transpose(2, 3)[:, 0].add_(self.p(x)[:, 0])
        return self.dw(y)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("how", ["rows", "transpose"])
def test_an_unmappable_write_makes_the_base_conservative_and_says_so(how, capture):
    model = UnmappableWrite(how).eval()
    a = fxrf.analyze(model, (1, 4, 8, 8), capture=capture)
    written = [name for name, _, reason in a.unsupported if "cannot be mapped exactly" in reason]
    assert len(written) == 1 and written[0].startswith("add_")
    measured = measure(model, (1, 4, 8, 8), a, names={a.record("dw").name})[a.record("dw").name]
    dw = a.record("dw")
    sets = dw.field.sets()
    exts = dw.field.extents(a.stages[dw.stage].resolution, (8, 8))
    for c, (ext, chans) in enumerate(measured):  # never below autograd, channel by channel
        assert chans <= sets[c] and all(int(e) >= m for e, m in zip(exts[c], ext))
    assert any(len(chans) < len(sets[c]) for c, (_, chans) in enumerate(measured))  # and it is an upper bound


class QuietWrites(nn.Module):
    """An in-place activation through a reshaped view (elementwise: nothing reads differently), and a write
    through a reshaped view that nothing reads back."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        torch.relu_(y.view(1, -1))
        z = self.b(x)
        z.view(1, -1).mul_(2.0)  # z is not read after this
        return self.dw(y)


@pytest.mark.parametrize("capture", CAPTURES)
def test_writes_that_change_no_reader_decline_nothing(capture):
    a = exact(QuietWrites().eval(), (1, 4, 8, 8), capture, names={"dw", "conv2d_1"})
    # by hand: two depthwise 3x3 convs, the ReLU between them elementwise: 5x5, one channel each
    assert (a.record("dw").rf.spatial, a.record("dw").rf.channel_mean) == ((5, 5), 1.0)
