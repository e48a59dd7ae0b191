"""Batch norms that normalise with the batch's statistics see the whole map of their channel."""
import pytest
import torch
import torch.nn as nn

import fxrf
from oracle import compare


def _net(**bn):
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4, **bn),
                         nn.Conv2d(4, 4, 3, padding=1, groups=4))


def _autograd_extent(model, shape):
    """(rows, cols) of the model input that channel 0 of the centre output neuron depends on, in the model's mode."""
    x = torch.rand(shape, requires_grad=True)
    y = model(x)[0, 0, shape[2] // 2, shape[3] // 2]
    g, = torch.autograd.grad(y, x)
    nz = torch.nonzero(g[0] != 0)
    return tuple(int(nz[:, k].max() - nz[:, k].min() + 1) for k in (1, 2)), set(nz[:, 0].tolist())


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_no_running_statistics_in_eval_mode(capture):
    model, shape = _net(track_running_stats=False).eval(), (1, 4, 9, 9)
    a = fxrf.analyze(model, shape, capture=capture)
    problems, checked = compare(model, shape, a)
    assert not a.unsupported and not problems and checked >= 3, problems
    # by hand: depthwise 3x3, the mean over channel c's 9x9 map, depthwise 3x3: the whole map, one channel
    assert (a.convs()[-1].rf.spatial, a.convs()[-1].rf.channel) == ((9, 9), 1)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_no_running_statistics_in_training_mode(capture):
    model, shape = _net(track_running_stats=False).train(), (1, 4, 9, 9)
    a = fxrf.analyze(model, shape, capture=capture)
    assert not a.unsupported and model.training  # analysed as it is, and left in training mode
    ext, chans = _autograd_extent(model, shape)
    assert (ext, chans) == ((9, 9), {0})
    assert (a.convs()[-1].rf.spatial, a.convs()[-1].rf.channel) == (ext, len(chans))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_running_statistics_are_read_as_deployed_in_training_mode_too(capture):
    """A norm with running statistics normalises with them once deployed (eval): fxrf reads that function, so a
    model still in training mode (every freshly built one) gets the per-channel fields autograd shows in eval."""
    model, shape = _net().train(), (1, 4, 9, 9)
    a = fxrf.analyze(model, shape, capture=capture)
    assert model.training
    ext, chans = _autograd_extent(model.eval(), shape)
    assert (ext, chans) == ((5, 5), {0})  # by hand: two 3x3 windows, 5x5
    assert (a.convs()[-1].rf.spatial, a.convs()[-1].rf.channel) == (ext, len(chans))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_running_statistics_in_eval_mode_stay_per_pixel(capture):
    model, shape = _net().eval(), (1, 4, 9, 9)
    a = fxrf.analyze(model, shape, capture=capture)
    ext, chans = _autograd_extent(model, shape)
    assert (ext, chans) == ((5, 5), {0})  # by hand: two 3x3 windows, 5x5
    assert (a.convs()[-1].rf.spatial, a.convs()[-1].rf.channel) == (ext, len(chans))
