"""Reflect and replicate padding: exact where a border neuron reads only pixels its own window covers, else listed."""
import pytest
import torch.nn as nn

import fxrf
from oracle import compare, measure


def _conv(mode, **kw):
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding_mode=mode, **kw)).eval()


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_dilated_taps_that_leave_a_small_map(capture, mode):
    """dilation 3 on 5x5: the centre neuron's taps -1, 2, 5 read 1, 2, 3 (reflect) or 0, 2, 4 (replicate)."""
    model, shape = _conv(mode, padding=3, dilation=3), (1, 4, 5, 5)
    a = fxrf.analyze(model, shape, capture=capture)
    assert len(a.unsupported) == 1  # listed, with a conservative field: the whole 5x5 map
    r = a.convs()[0]
    got = measure(model, shape, a)[r.name][0][0]
    assert got == {"reflect": (3, 3), "replicate": (5, 5)}[mode]  # the hand count above, by autograd
    assert all(m >= g for m, g in zip(r.rf.spatial, got)) and r.rf.spatial == (5, 5)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_half_window_padding_is_exact(capture, mode):
    """3x3 convs with padding 1, twice, on a 3x3 map: every read lands inside the neuron's own window."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode=mode),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode=mode)).eval()
    for shape in ((1, 4, 3, 3), (1, 4, 7, 7)):
        a = fxrf.analyze(model, shape, capture=capture)
        problems, checked = compare(model, shape, a)
        assert not a.unsupported and not problems and checked >= 2, problems


@pytest.mark.parametrize("pad", [nn.ReflectionPad2d, nn.ReplicationPad2d])
def test_padding_modules(pad):
    """A pad module then a valid conv: exact for a 3x3 window over 1 pixel of padding (CycleGAN's blocks); listed
    for a dilated window, whose border neurons read reflected pixels between its taps."""
    dense = nn.Sequential(pad(1), nn.Conv2d(4, 4, 3), pad(1), nn.Conv2d(4, 4, 3)).eval()
    for shape in ((1, 4, 3, 3), (1, 4, 8, 8)):
        a = fxrf.analyze(dense, shape, capture="fx")
        problems, checked = compare(dense, shape, a)
        assert not a.unsupported and not problems and checked >= 4, problems
    dilated, shape = nn.Sequential(pad(3), nn.Conv2d(4, 4, 3, dilation=3)).eval(), (1, 4, 5, 5)
    a = fxrf.analyze(dilated, shape, capture="fx")
    assert [u[0] for u in a.unsupported] == ["_0"]  # the node of module "0"
    got = measure(dilated, shape, a)["_1"][0][0]
    assert got == {nn.ReflectionPad2d: (3, 3), nn.ReplicationPad2d: (5, 5)}[pad]  # as for padding_mode above
    assert a.record("_1").rf.spatial == (5, 5)
