"""clamp with a tensor bound: each output element sees its input's element and the bound's element there."""
import pytest
import torch
import torch.nn as nn

import fxrf


class Bounded(nn.Module):
    """a: a depthwise 3x3 conv (channel c sees channel c); b: a 1x1 conv over all 4 channels, shifted by `shift`."""

    def __init__(self, which, shift=0.0):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.b = nn.Conv2d(4, 4, 1)
        self.which, self.shift = which, shift

    def forward(self, x):
        bound = self.b(x) + self.shift
        return torch.clamp(self.a(x), **{self.which: bound})


def _autograd_union(which, shape):
    """Channels and extent the centre neuron of channel 0 depends on, by autograd: clamp routes the gradient to x
    or to the bound, whichever is active, so the bound is shifted far up and far down and the two unioned."""
    torch.manual_seed(0)
    base = Bounded(which)
    chans, rows = set(), set()
    for shift in (-100.0, 100.0):
        m = Bounded(which, shift)
        m.load_state_dict(base.state_dict())
        x = torch.rand(shape, requires_grad=True)
        y = m(x)[0, 0, shape[2] // 2, shape[3] // 2]
        g, = torch.autograd.grad(y, x)
        nz = g[0] != 0
        chans |= set(torch.nonzero(nz.any(dim=(1, 2))).flatten().tolist())
        rows |= set(torch.nonzero(nz.any(dim=(0, 2))).flatten().tolist())
    return chans, max(rows) - min(rows) + 1


@pytest.mark.parametrize("which", ["max", "min"])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_tensor_bound_adds_its_field(which, capture):
    shape = (1, 4, 7, 7)
    a = fxrf.analyze(Bounded(which).eval(), shape, capture=capture)
    r = [r for r in a.records if r.op == "clamp"][-1]
    chans, extent = _autograd_union(which, shape)
    # by hand: a's 3x3 window on channel 0 and b's 1x1 pixel on all 4 channels: 4 channels, 3x3
    assert (chans, extent) == ({0, 1, 2, 3}, 3)
    assert (r.rf.channel, r.rf.spatial) == (4, (3, 3)) and not a.unsupported
    assert set(r.field.sets()[0]) == chans
