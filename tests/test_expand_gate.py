"""A squeeze-excitation gate broadcast with expand_as stays in its map's stage: the product sees the whole map."""
import pytest
import torch.nn as nn
import torch.nn.functional as F

import fxrf
from oracle import compare


class SE(nn.Module):
    def __init__(self, expand_as):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4)
        self.expand_as = expand_as

    def forward(self, x):
        x = self.a(x)
        b, c = x.shape[:2]
        y = self.fc(F.adaptive_avg_pool2d(x, 1).view(b, c)).view(b, c, 1, 1)
        return x * (y.expand_as(x) if self.expand_as else y)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("expand_as", [True, False])
def test_expand_as_gate_sees_the_whole_map(capture, expand_as):
    model, shape = SE(expand_as).eval(), (1, 4, 9, 9)
    a = fxrf.analyze(model, shape, capture=capture)
    assert len(a.stages) == 1 and not a.unsupported  # expand_as does not start a stage of its own
    mul = a.records[-2] if a.records[-1].op == "output" else a.records[-1]
    # by hand: the gate averages a's whole 9x9 output, so x * gate sees the whole map and all 4 channels
    assert (mul.rf.spatial, mul.rf.channel, mul.input_rf.spatial) == ((9, 9), 4, (9, 9))
    for reference in ("stage", "input"):
        problems, checked = compare(model, shape, a, reference=reference)
        assert not problems and checked >= 4, problems
