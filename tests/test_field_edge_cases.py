"""Fields at the edges, each checked against autograd (tests/oracle.py) or a hand count.

Stages start where a map is resampled, not where padding trims it; a gate made of Linear layers belongs to its
stage; in-place ops are followed; padding modes, resampling modes, roll, a flatten undone by a view and several
inputs of different sizes get the fields autograd sees (input_rf: never below it).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxrf
from blocks import SEStage
from fxrf.passes import finish
from oracle import compare

pytestmark = pytest.mark.threads(1)


def exact(model, shape, names=None):
    """The analysis, after checking its stage fields equal autograd's and its input fields bound them."""
    a = fxrf.analyze(model, shape)
    problems, n = compare(model, shape, a)
    problems = [p for p in problems if names is None or p.split(" ")[0] in names]
    assert n > 0 and problems == []
    above, _ = compare(model, shape, a, reference="input")
    assert [p for p in above if names is None or p.split(" ")[0] in names] == []
    return a


# ---- 1. a gate made from a vector belongs to its stage -------------------------------------------------------


class LinearSE(nn.Module):
    """Squeeze-excite written with Linear layers: pool(x).view(b, c) -> fc -> fc -> .view(b, c, 1, 1)."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(c, 2), nn.Linear(2, c)
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.conv(x)
        b, c = y.shape[:2]
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(y, 1).view(b, c)))))
        return self.out(y * g.view(b, c, 1, 1))


class GCBlock(nn.Module):
    """GCNet's context block: softmax attention over the map pools a context vector, added to every pixel."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.mask = nn.Conv2d(c, 1, 1)
        self.transform = nn.Sequential(nn.Conv2d(c, 2, 1), nn.ReLU(), nn.Conv2d(2, c, 1))

    def forward(self, x):
        y = self.conv(x)
        b, c, h, w = y.shape
        attn = self.mask(y).view(b, 1, h * w).softmax(-1)  # [b, 1, hw]
        context = torch.matmul(y.view(b, c, h * w), attn.transpose(1, 2)).view(b, c, 1, 1)
        return y + self.transform(context)


@pytest.mark.parametrize("block", [LinearSE, GCBlock])
def test_gate_from_a_vector_is_in_its_stage(block):
    # before: the 1x1 map made from a vector started a stage of its own and the output conv saw 3x3; autograd
    # sees the whole 9x9 map through the gate
    m = block()
    a = exact(m, (1, 4, 9, 9), names={"conv", "out", "add", "mul", "conv_1", "transform_2"})
    assert len(a.stages) == 1
    last = a.records[-1]
    assert last.rf.spatial == (9, 9)
    assert last.local_rf.spatial == (3, 3)  # through the local path (the gate excluded): conv's 3x3 only


# ---- 2. padding trims, it does not start a stage ----------------------------------------------------------------


def test_unpadded_convs_stay_in_one_stage():
    # 12x12 input, three unpadded 3x3 convs: one stage, fields 3, 5, 7 (each adds 2 at the centre)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3))
    a = exact(m, (1, 3, 12, 12))
    assert len(a.stages) == 1
    assert [r.rf.spatial for r in a.convs()] == [(3, 3), (5, 5), (7, 7)]
    assert all(r.gain > 0 for r in a.convs()[1:])  # before: every conv started a stage, no gain at all


@pytest.mark.parametrize("pad", [nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ZeroPad2d, nn.CircularPad2d,
                                 lambda p: nn.ConstantPad2d(p, 0.5)])
def test_pad_layers_and_convs_form_one_stage(pad):
    m = nn.Sequential(pad(1), nn.Conv2d(3, 4, 3), nn.ReLU(), pad(1), nn.Conv2d(4, 4, 3))
    a = exact(m, (1, 3, 9, 9))
    assert len(a.stages) == 1
    assert [r.rf.spatial for r in a.convs()] == [(3, 3), (5, 5)]
    assert a.unsupported == []


def test_functional_pad_asymmetric_and_negative():
    class P(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, dilation=2)

        def forward(self, x):
            y = self.a(F.pad(x, (1, 2, 0, 1)))
            return self.b(F.pad(y, (2, 2, -1, 3), mode="constant", value=0.5))

    a = exact(P(), (1, 3, 9, 9))
    assert len(a.stages) == 1 and a.unsupported == []
    assert fxrf.analyze(P(), (1, 3, 9, 9)).record("pad").shape == (1, 3, 10, 12)  # H 9+0+1, W 9+1+2


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv_padding_mode(mode):
    # a dilated conv after a dense one on an 8x8 map: circular padding wraps the dilated taps around the map
    m = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=3, dilation=3, padding_mode=mode))
    a = exact(m, (1, 3, 8, 8))
    if mode == "circular":  # autograd: the whole map; zero padding would give 7 (offsets -4..4 at centre 4 cut at 7)
        assert a.convs()[1].rf.spatial == (8, 8)


# ---- 3. in-place ops --------------------------------------------------------------------------------------------


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 5, padding=2), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        z = self.a(x)
        z.add_(self.b(x))  # result unused: z itself changes
        z.relu_()
        return self.c(z)


def test_inplace_add_is_seen_by_later_users():
    # c reads z after z += b(x): 5x5 (b's window), not a's 3x3 (what the analysis said before)
    a = exact(InPlace(), (1, 2, 9, 9), names={"c"})
    assert a.record("c").rf.spatial == (5, 5)


def test_finish_keeps_an_unused_inplace_statement():
    m = InPlace().eval()
    x = torch.randn(1, 2, 9, 9)
    gm = fx.symbolic_trace(copy.deepcopy(m))
    finish(gm)
    assert "add_" in gm.code
    assert torch.equal(gm(x), m(x))


class InPlaceModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.act = nn.Hardtanh(-0.1, 0.1, inplace=True)

    def forward(self, x):
        z = self.a(x)
        z += 1.0  # operator.iadd is traced as add; the module below mutates z and its result is unused
        self.act(z)
        return self.b(z)


def test_pass_that_claims_function_preserved_does_preserve_it():
    m = InPlaceModule().eval()
    x = torch.randn(1, 2, 8, 8)
    r = fxrf.organize_stages(m, (1, 2, 8, 8), threshold=1e9, remove_below=0.0)  # nothing to insert or remove
    assert r.summary["function_preserved"]
    assert torch.allclose(r.graph_module(x), m(x))


# ---- 4. input_rf never below autograd; roll, view round trips, several inputs ------------------------------------


class Resize(nn.Module):
    def __init__(self, mode, scale=None, size=None, align=None):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 4, padding=2)
        self.mode, self.scale, self.size, self.align = mode, scale, size, align

    def forward(self, x):
        kw = {} if self.align is None else {"align_corners": self.align}
        return self.b(F.interpolate(self.a(x), scale_factor=self.scale, size=self.size, mode=self.mode, **kw))


@pytest.mark.parametrize("mode,align", [("nearest", None), ("bilinear", None), ("bilinear", True),
                                        ("bicubic", None), ("bicubic", True), ("area", None)])
@pytest.mark.parametrize("scale,size", [(2, None), (3, None), (None, (11, 11)), (0.5, None), (None, (5, 5))])
def test_input_rf_bounds_autograd_after_resampling(mode, align, scale, size):
    # before: bicubic at scale 2 reported 4 where autograd sees 6, bilinear and area fell below too
    m = Resize(mode, scale, size, align)
    a = fxrf.analyze(m, (1, 2, 8, 8))
    below, n = compare(m, (1, 2, 8, 8), a, reference="input")
    assert n > 0 and below == []


class Roll(nn.Module):
    def __init__(self, shift):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.shift = shift

    def forward(self, x):
        return self.b(torch.roll(self.a(x), self.shift, 3))


def test_roll_along_width_is_a_shift():
    # roll by 1 on an 8-wide map: the roll's centre (4) reads a at 3, which sees 2..4 (3 wide); b's centre reads
    # the roll at 3..5, so a at 2..4, pixels 1..5 (5 wide). Before: the whole row (8) at both
    a = exact(Roll(1), (1, 2, 8, 8))
    assert [a.record(n).rf.spatial for n in ("roll", "b")] == [(3, 3), (5, 5)]


@pytest.mark.parametrize("shift", [3, 4, -2])
def test_roll_past_the_border_is_an_upper_bound(shift):
    # paths that wrap past the border and into zero padding are counted (docs/concepts.md): never below autograd
    m = Roll(shift)
    a = fxrf.analyze(m, (1, 2, 8, 8))
    from oracle import measure
    got = measure(m, (1, 2, 8, 8), a)
    for name, per_channel in got.items():
        r = a.record(name)
        assert all(m_ <= e for ext, _ in per_channel for m_, e in zip(ext, r.rf.spatial))


class FlattenBack(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        b, c, h, w = y.shape
        return self.b(y.flatten(1).view(b, c, h, w))


def test_flatten_then_view_back_is_exact():
    # before: the flatten spread every feature over the map, so b saw 8x8; autograd: 5x5
    a = exact(FlattenBack(), (1, 2, 8, 8), names={"view", "b_1"})
    assert a.records[-1].rf.spatial == (5, 5)


class TwoSizes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(1, 2, 7, padding=3)

    def forward(self, small, large):
        return self.a(small), self.b(large)


def test_input_rf_cap_comes_from_each_input():
    # a 7x7 conv on a 16x16 second input: 7 (before: capped at the first input's 4x4)
    a = fxrf.analyze(TwoSizes(), ((1, 1, 4, 4), (1, 1, 16, 16)))
    assert a.record("a").input_rf.spatial == (3, 3)
    assert a.record("b").input_rf.spatial == (7, 7)


# ---- 8. the local field and the gate warning ----------------------------------------------------------------


def test_local_field_and_gain_exclude_the_gate():
    a = exact(SEStage(), (1, 4, 8, 8), names={"c1", "mul", "c2", "c3"})
    c2, c3 = a.record("c2"), a.record("c3")
    # full field: the gate already saw the whole 8x8 map and all 4 channels, so c2 and c3 add nothing
    assert (c2.rf.spatial, c2.rf.channel, c2.gain) == ((8, 8), 4, 0.0)
    # local path: c1 3x3 -> c2 5x5 -> c3 7x7, 4 channels; gains from 3*3*4=36 to 5*5*4=100 and 100 to 196
    assert (c2.local_rf.spatial, c3.local_rf.spatial) == ((5, 5), (7, 7))
    v0 = 8 * 8 * 4
    import math
    assert c2.local_gain == pytest.approx((100 - 36) / 36 * math.exp(-3 * 36 / v0))
    assert c3.local_gain == pytest.approx((196 - 100) / 100 * math.exp(-3 * 100 / v0))
    assert any(w.startswith("c2: gain 0 rests on gate-induced saturation") for w in a.warnings)
    assert a.record("c1").local_rf == a.record("c1").rf  # upstream of the gate both fields agree
