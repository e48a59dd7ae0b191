"""Models that made a rule crash: each now analyses, exactly where the op is supported (checked with autograd), or
with the node listed as unsupported and a conservative field."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxrf
from oracle import compare


def _exact(model, shape, capture):
    """The analysis of `model` under `capture`, checked against autograd node by node (stage fields are exact)."""
    a = fxrf.analyze(model, shape, capture=capture)
    problems, checked = compare(model, shape, a)
    assert not problems and checked, problems
    return a


class PoolIndices(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(F.max_pool2d(self.a(x), 2, return_indices=True)[0])


def test_max_pool_with_indices_then_conv_through_export():
    model, shape = PoolIndices().eval(), (1, 4, 8, 8)
    ex = _exact(model, shape, "export")
    fx_ = fxrf.analyze(model, shape, capture="fx")
    assert not ex.unsupported and not fx_.unsupported
    # by hand: the pool starts a stage on its 4x4 output; b's 3x3 window there sees 3x3 of it, all 4 channels
    assert ex.convs()[-1].rf == fx_.record("b").rf
    assert fx_.record("b").rf.spatial == (3, 3) and fx_.record("b").rf.channel == 4


class PoolNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(self.pool(torch.relu(self.a(x))))


def test_max_pool_in_a_decomposed_export_graph():
    """run_decompositions() turns every max pool into max_pool2d_with_indices(...)[0]."""
    model, shape = PoolNet().eval(), (1, 3, 8, 8)
    ep = torch.export.export(model, (torch.randn(shape),)).run_decompositions()
    gm = ep.module()
    targets = {str(n.target) for n in gm.graph.nodes}
    assert "aten.max_pool2d_with_indices.default" in targets
    a = fxrf.analyze(gm, shape, capture="export")
    assert not a.unsupported
    convs = a.convs()
    # by hand: the pool starts a stage of 4x4; the last conv's 3x3 window sees 3x3 of it, all 4 channels
    assert [r.rf.spatial for r in convs] == [(3, 3), (3, 3)] and convs[-1].rf.channel == 4
    assert convs[-1].input_rf.spatial == (8, 8)  # 3 + (2 - 1) + (3 - 1) * 2 = 8 pixels of the model input


class Up(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(self.up(self.a(x)))


def test_transposed_convolution_in_a_decomposed_export_graph():
    """run_decompositions() writes ConvTranspose2d as aten.convolution(..., transposed=True): no rule (as in the fx
    capture), so it is listed with a conservative field and no kernel type, and the MACs match the fx capture."""
    model, shape = Up().eval(), (1, 4, 6, 6)
    gm = torch.export.export(model, (torch.randn(shape),)).run_decompositions().module()
    a = fxrf.analyze(gm, shape, capture="export")
    fx_ = fxrf.analyze(model, shape, capture="fx")
    assert [u[1] for u in a.unsupported] == ["aten.convolution"]
    assert [u[0] for u in fx_.unsupported] == ["up"]
    assert [r.kernel for r in a.convs()] == [r.kernel for r in fx_.convs()] == ["standard", "standard"]
    # conservative: the transposed conv's output sees its whole 12x12 stage and all 4 channels; the last conv too
    assert a.convs()[-1].rf == fx_.record("b").rf
    from fxrf.cost import total
    # by hand: 2 convs of 4*4*9 MACs per output pixel (36 and 144 pixels), the transposed conv 4*4*4 per input pixel
    assert total(a.costs).macs == total(fx_.costs).macs == 144 * 36 + 64 * 36 + 144 * 144


def _bounds(model, shape, a):
    """Every field of `a` contains autograd's (declined nodes are conservative, not exact)."""
    from oracle import measure
    measured = measure(model, shape, a)
    for r in a.records:
        if r.name not in measured:
            continue
        exts = r.field.extents(a.stages[r.stage].resolution, fxrf.analysis.map_size(r.field, r.shape))
        for c, ((ext, chans), mine, sets) in enumerate(zip(measured[r.name], exts, r.field.sets())):
            assert chans <= sets and all(m >= e for m, e in zip(mine, ext)), (r.name, c, tuple(mine), ext)
    return measured


class DilatedThenPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, dilation=3, padding=3)
        self.b = nn.Conv2d(4, 4, 11)

    def forward(self, x):
        return self.b(F.pad(self.a(x), (5, 5, 5, 5)))


def test_dilated_conv_then_padding_by_the_map_size():
    """The pad puts neurons 5 pixels beyond the 5x5 map while a's field has holes ({-3, 0, 3}): listed, upper bound."""
    model, shape = DilatedThenPad().eval(), (1, 4, 5, 5)
    for capture in ("fx", "export"):
        a = fxrf.analyze(model, shape, capture=capture)
        assert [u[0] for u in a.unsupported] == ["pad"]
        measured = _bounds(model, shape, a)
        # by hand: a's centre neuron (2) reads 2 - 3, 2, 2 + 3: only pixel 2 of the map is inside
        assert a.record("a" if capture == "fx" else "conv2d").rf.spatial == (1, 1)
        assert measured["a" if capture == "fx" else "conv2d"][0][0] == (1, 1)


def test_timm_same_padding_dilated_convs_on_a_small_map():
    from timm.layers import Conv2dSame

    model, shape = nn.Sequential(Conv2dSame(4, 4, 3, dilation=3), Conv2dSame(4, 4, 3, dilation=3)).eval(), (1, 4, 5, 5)
    a = fxrf.analyze(model, shape, capture="export")  # its padding depends on the input size: fx cannot trace it
    assert all(u[1] == "aten.pad" for u in a.unsupported)
    _bounds(model, shape, a)
    # by hand: F.pad(x, (3, 3, 3, 3)) then a valid dilated conv is a's padding=3 conv: 1x1 as above
    assert a.convs()[0].rf.spatial == (1, 1)
