"""The paper's numbers, from the paper's tables (docs/paper.md) and the hand derivations in docs/formulas.md."""
import math

import pytest

import fxrf
from fxrf import models


def _inserted_conv_gain(i: int) -> float:
    """Gain of the conv that VGG-11 variant i adds before its i-th max pool (the last conv of stage i-1)."""
    a = fxrf.analyze(models.vgg11_variant(i), (1, 3, 32, 32), alpha=3.0)
    size = 32 // 2 ** (i - 1)
    convs = [r for r in a.convs() if r.shape[-1] == size]
    return convs[-1].gain


# Table 2 (paper): 1.73, 1.60, 0.29, 0.0, 0.0. Closed forms (docs/formulas.md, alpha = 3):
# (16/9)e^(-9a/1024), (16/9)e^(-9a/256), (24/25)e^(-25a/64), 0, 0.
TABLE2 = {1: 16 / 9 * math.exp(-27 / 1024), 2: 16 / 9 * math.exp(-27 / 256), 3: 24 / 25 * math.exp(-75 / 64),
          4: 0.0, 5: 0.0}
PAPER = {1: 1.73, 2: 1.60, 3: 0.29, 4: 0.0, 5: 0.0}


@pytest.mark.parametrize("i", [1, 2, 3, 4, 5])
def test_table2_vgg11_variant_gain(i):
    g = _inserted_conv_gain(i)
    assert g == pytest.approx(TABLE2[i], abs=1e-9)
    assert abs(g - PAPER[i]) < 0.01  # the paper prints two decimals
    assert abs(g - [1.7315, 1.5998, 0.2974, 0.0, 0.0][i - 1]) < 0.005


def test_vgg11_stage_fields():
    """VGG-11 at 32 px: stages 32,16,8,4,2 with 1,1,2,2,2 convs (docs/paper.md); fields by the recurrence by hand."""
    a = fxrf.analyze(models.vgg11_cifar(), (1, 3, 32, 32))
    convs = a.convs()
    got = [(r.rf.height, r.rf.channel) for r in convs]
    # stage 32 (c0=3): 3; 16 (c0=64): 3; 8 (c0=128): 3, 5; 4 (c0=256): 3, min(5,4)=4; 2 (c0=512): 2, 2
    assert got == [(3, 3), (3, 64), (3, 128), (5, 128), (3, 256), (4, 256), (2, 512), (2, 512)]
    assert [s.resolution[0] for s in a.stages if any(r.stage == s.index for r in convs)] == [32, 16, 8, 4, 2]


def test_table2_uncapped():
    """Table 2 with spatial_cap=False: variants 1-3 are unchanged (their fields never reach w_0); variant 4's
    conv (4 px, 256 channels) goes 5x5x256 -> 7x7x256: (24/25) e^(-3*6400/4096) = 0.0088, variant 5's (2 px, 512)
    5x5x512 -> 7x7x512: (24/25) e^(-3*12800/2048) = 6.9e-9; the paper prints 0.0 for both."""
    closed = [16 / 9 * math.exp(-27 / 1024), 16 / 9 * math.exp(-27 / 256), 24 / 25 * math.exp(-75 / 64),
              24 / 25 * math.exp(-75 / 16), 24 / 25 * math.exp(-75 / 4)]
    paper = [1.73, 1.60, 0.29, 0.0, 0.0]
    for i in range(1, 6):
        a = fxrf.analyze(models.vgg11_variant(i), (1, 3, 32, 32), spatial_cap=False)
        side = 32 // 2 ** (i - 1)
        last = [r for r in a.convs() if r.shape[-1] == side][-1]
        assert last.gain == pytest.approx(closed[i - 1], rel=1e-9)
        assert abs(last.gain - paper[i - 1]) < 0.01
        assert last.rf.spatial == ((5, 5) if i < 3 else (7, 7))  # uncapped even on the 4 and 2 px maps
