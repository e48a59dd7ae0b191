"""Stages: a stage is the set of convs sharing one resolution, whichever way the graph was captured.

torch.export slices one axis at a time (`x[:, :, ::2, ::2]` is two aten.slice calls) where torch.fx records one
getitem: the half-sliced tensor in between must not open a stage of its own.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxrf
from oracle import compare

torch.set_num_threads(1)
SHAPE = (1, 3, 32, 32)


class Strided(nn.Module):
    """Two 3x3 convs at 32x32, a strided slice, two 3x3 convs at 16x16 (or 16x32 for the one-axis slice)."""

    def __init__(self, index):
        super().__init__()
        self.index = index
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        c = 2 if index == "channels" else 4
        self.c, self.d = nn.Conv2d(c, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.b(self.a(x))
        if self.index == "both":
            y = y[:, :, ::2, ::2]
        elif self.index == "channels":
            y = y[:, :2, ::2, ::2]
        elif self.index == "rows":
            y = y[:, :, ::2]
        return self.d(self.c(y))


def _stages(a):
    return [(s.resolution, s.channels) for s in a.stages]


@pytest.mark.parametrize("index,stages", [
    # by hand: the input stage is 32x32 with the model input's 3 channels; the slice resamples once, so the second
    # stage is its output: 16x16 (16x32 for rows only) with the channels it keeps
    ("both", [((32, 32), 3), ((16, 16), 4)]),
    ("channels", [((32, 32), 3), ((16, 16), 2)]),
    ("rows", [((32, 32), 3), ((16, 32), 4)]),
])
def test_fx_and_export_give_the_same_stages_for_a_strided_slice(index, stages):
    model = Strided(index).eval()
    fx_, ex = fxrf.analyze(model, SHAPE, capture="fx"), fxrf.analyze(model, SHAPE, capture="export")
    assert (fx_.capture, ex.capture) == ("fx", "export")
    assert _stages(fx_) == _stages(ex) == stages
    # the same convs in the same stages, by module path
    assert {r.path: r.stage for r in ex.convs()} == {r.path: r.stage for r in fx_.convs()} == \
        {"a": 0, "b": 0, "c": 1, "d": 1}
    for a in (fx_, ex):  # and the stage fields are autograd's
        problems, n = compare(model, SHAPE, a)
        assert n > 0 and problems == [], (a.capture, problems)


def test_organizer_counts_the_convs_of_each_resolution_after_an_exported_slice():
    model = Strided("both").eval()
    for graph in (model, fxrf.trace(model, SHAPE, capture="export")):
        r = fxrf.organize_stages(graph, SHAPE, threshold=1e9, remove_below=None, remove_saturated=False)
        # by hand: a, b at 32x32 and c, d at 16x16; before, the export graph had a phantom 16x32 stage: [2, 0, 2]
        assert r.summary["stage_convs"] == [2, 2]
