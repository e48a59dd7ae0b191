"""The torch.export front end: ATen graphs analysed as exactly as fx graphs, and rewritten by both passes."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fxrf
from fxrf.cost import total
from oracle import compare


def _by_path(a):
    return {r.path: (r.rf, r.gain, r.kernel, r.shape) for r in a.convs()}


def test_export_and_fx_agree_on_resnet18():
    model = torchvision.models.resnet18().eval()
    shape = (1, 3, 32, 32)
    fx_, ex = fxrf.analyze(model, shape, capture="fx"), fxrf.analyze(model, shape, capture="export")
    assert (fx_.capture, ex.capture) == ("fx", "export")
    assert not ex.unsupported
    assert _by_path(ex) == _by_path(fx_) and len(_by_path(ex)) == 20  # every conv, by module path
    assert [(s.resolution, s.channels) for s in ex.stages] == [(s.resolution, s.channels) for s in fx_.stages]
    assert total(ex.costs) == total(fx_.costs)
    assert ex.record("layer1.0.conv1").kernel == "standard"
    x = torch.randn(shape)
    assert torch.equal(ex.graph_module(x), model(x))


class ShapeBranches(nn.Module):
    """What symbolic_trace cannot follow: control flow on a shape and iteration over a tensor's channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1, groups=2) for _ in range(2))
        self.head = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        if x.shape[-1] > 4:  # data-independent: export specialises it
            x = F.max_pool2d(x, 2)
        parts = [conv(part) for conv, part in zip(self.convs, x.chunk(2, dim=1))]
        return self.head(torch.cat(parts, 1) + x)


def test_auto_falls_back_to_export_and_stays_exact():
    model, shape = ShapeBranches().eval(), (1, 3, 16, 16)
    with pytest.raises(fxrf.TraceError):
        fxrf.trace(model, shape, capture="fx")
    a = fxrf.analyze(model, shape)
    assert a.capture == "export" and not a.unsupported
    problems, checked = compare(model, shape, a)  # autograd on the real model agrees, node by node
    assert not problems and checked >= 8, problems
    # by hand: the stage after the pool has 8 channels; convs.0 runs on chunk 0 (channels 0-3) with 2 groups, so each
    # output sees 2 stage-input channels, and through the stem all 3 channels of the model input
    assert [r.kernel for r in a.convs()] == ["standard", "grouped", "grouped", "standard"]
    r = a.record("convs.0")
    assert (r.op, r.rf.channel, r.input_rf.channel) == ("conv2d", 2, 3)


def test_both_passes_run_on_export_captured_models():
    model, shape = ShapeBranches().eval(), (1, 3, 16, 16)
    x = torch.randn(shape)
    org = fxrf.organize_stages(model, shape)
    assert org.graph_module(x).shape == model(x).shape
    dec = fxrf.decompose(model, shape, recipe="DW+PW")
    assert dec.changes and dec.graph_module(x).shape == model(x).shape
    # a rewrite that keeps the function (the organizer's identity-initialised insertions only) keeps it on ATen
    grow = fxrf.organize_stages(model, shape, remove_saturated=False, threshold=0.0, max_insertions=1,
                                macs_budget=None)
    assert [c.kind for c in grow.changes] == ["insert"]
    assert torch.allclose(grow.graph_module(x), model(x), atol=1e-5)
    # and the user's model is untouched
    assert isinstance(model.stem, nn.Conv2d) and not hasattr(model, "_guards_fn")


def test_capture_is_validated():
    with pytest.raises(fxrf.InputError, match="capture='jit' is not one of auto, fx, export"):
        fxrf.trace(nn.Conv2d(3, 3, 1), (1, 3, 4, 4), capture="jit")


def test_padding_reads_the_same_through_export():
    """F.pad is aten.pad in an exported graph: one op, so both captures give the same fields (and autograd's)."""
    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.b(F.pad(self.a(F.pad(x, (1, 1, 1, 1), mode="reflect")), (1, 1, 1, 1)))

    model, shape = Padded().eval(), (1, 3, 12, 12)
    fx_, ex = fxrf.analyze(model, shape, capture="fx"), fxrf.analyze(model, shape, capture="export")
    assert not ex.unsupported and _by_path(ex) == _by_path(fx_)
    assert ex.record("b").rf.spatial == (5, 5)  # two 3x3 convs in one stage: padding does not start a stage
    problems, _ = compare(model, shape, ex)
    assert not problems, problems
