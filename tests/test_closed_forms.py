"""g(x, T): the exact propagation equals the closed form per kernel type (docs/formulas.md)."""
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
