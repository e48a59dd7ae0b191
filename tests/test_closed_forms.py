"""g(x, T): the exact propagation equals the closed form per kernel type (docs/formulas.md)."""
import math

import pytest
import torch.nn as nn

import fxrf

C = 24  # stage channels


def _fields(*layers):
    a = fxrf.analyze(nn.Sequential(*layers), (1, C, 15, 15))
    return [r.rf.channel for r in a.convs()]


def test_standard_sees_every_channel():  # g(x, S) = c0
    assert _fields(nn.Conv2d(C, 32, 3, padding=1)) == [C]


def test_pointwise_sees_every_channel():  # g(x, PW) = c0
    assert _fields(nn.Conv2d(C, 32, 1)) == [C]


def test_depthwise_keeps_the_field():  # g(x, DW) = x: 1 at the stage input, c0 after a standard conv
    assert _fields(nn.Conv2d(C, C, 3, padding=1, groups=C)) == [1]
    assert _fields(nn.Conv2d(C, C, 1), nn.Conv2d(C, C, 3, padding=1, groups=C)) == [C, C]


@pytest.mark.parametrize("groups", [2, 3, 4, 6, 8])
def test_grouped_after_depthwise(groups):  # g(1, GPW-G) = c0 / G: a group's C_in/G channels, each seeing itself
    dw = nn.Conv2d(C, C, 3, padding=1, groups=C)
    assert _fields(dw, nn.Conv2d(C, C, 1, groups=groups)) == [1, C // groups]


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_chain_stays_in_group(groups):  # no shuffle: g(c0/G, GPW-G) = c0/G
    gpw = [nn.Conv2d(C, C, 1, groups=groups) for _ in range(3)]
    assert _fields(*gpw) == [C // groups] * 3


def test_grouped_after_standard():  # g(c0, G) = c0
    assert _fields(nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 3, padding=1, groups=4)) == [C, C]


def test_spatial_recurrence_and_cap():  # w_k = min(w_{k-1} + (k-1)*dil, w0): 3, 7 (dil 2), 13, 15 (cap)
    a = fxrf.analyze(nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 3, padding=2, dilation=2),
                                   nn.Conv2d(C, C, 7, padding=3), nn.Conv2d(C, C, 3, padding=1)), (1, C, 15, 15))
    assert [r.rf.height for r in a.convs()] == [3, 7, 13, 15]


def test_spatial_recurrence_without_the_cap():  # spatial_cap=False: w_k = w_{k-1} + (k-1)*dil, past w0 = 15
    layers = [nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 3, padding=2, dilation=2), nn.Conv2d(C, C, 7, padding=3),
              nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, C, 3, padding=1)]
    capped = fxrf.analyze(nn.Sequential(*layers), (1, C, 15, 15))
    uncapped = fxrf.analyze(nn.Sequential(*layers), (1, C, 15, 15), spatial_cap=False)
    assert [r.rf.height for r in capped.convs()] == [3, 7, 13, 15, 15]
    assert [r.rf.height for r in uncapped.convs()] == [3, 7, 13, 15, 17]
    assert capped.spatial_cap is True and uncapped.spatial_cap is False
    assert [r.rf.channel for r in uncapped.convs()] == [C] * 5  # channels are not affected
    # gain of the last conv: capped 15x15 -> 15x15 = 0; uncapped (17^2 - 15^2) / 15^2 * e^(-3 * 15^2 C / (15^2 C))
    assert capped.convs()[-1].gain == 0
    assert uncapped.convs()[-1].gain == pytest.approx((289 - 225) / 225 * math.exp(-3))


def test_dilated_conv_on_a_small_map_without_the_cap():
    # 3x3 dilation 2 on a 3x3 map: the centre neuron's taps at -2, 0, +2 leave only offset 0 on the map (exact: 1);
    # the classic extent counts the whole dilated kernel: (3 - 1) * 2 + 1 = 5
    net = nn.Sequential(nn.Conv2d(C, C, 3, padding=2, dilation=2))
    assert fxrf.analyze(net, (1, C, 3, 3)).convs()[0].rf.spatial == (1, 1)
    assert fxrf.analyze(net, (1, C, 3, 3), spatial_cap=False).convs()[0].rf.spatial == (5, 5)
