"""Every op the fx capture covers is covered in an exported (ATen) graph too, so the two captures agree."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxrf
from fxrf.ops import DEFAULT
from oracle import compare

aten = torch.ops.aten

# fx-covered ops with no ATen op of any of their targets' names, and why that is right
NO_ATEN_FORM = {
    "getitem": "operator.getitem stays operator.getitem in export graphs (tuple outputs); tensor indexing becomes "
               "aten.slice / aten.select, registered as aten_slice / aten_select",
    "getattr": "attribute reads (x.shape, x.dtype) are resolved while exporting: no node",
    "upsample": "F.interpolate exports as aten.upsample_<mode><d>d / aten._upsample_nearest_exact<d>d, the mode in "
                "the name: checked in test_resampling_modes_have_their_aten_ops",
}


def _registered(name: str) -> bool:
    packet = getattr(aten, name, None)
    return isinstance(packet, torch._ops.OpOverloadPacket) and any(
        DEFAULT.lookup_target(getattr(packet, o)) is not None for o in packet.overloads())


def _names(op) -> set:
    """The names of an op's torch functions, tensor methods and modules (`__add__` -> add, `relu_` -> relu_)."""
    out = set()
    for t in op.targets:
        if isinstance(t, torch._ops.OpOverload):
            continue
        name = t.rsplit(".", 1)[-1].split(":")[-1] if isinstance(t, str) else getattr(t, "__name__", "")
        out.add(name.strip("_") if name.startswith("__") else name)
    return out


def _fx_ops():
    """Ops with an fx spelling (a function, method or module) and a field or shape rule."""
    return [o for o in DEFAULT.ops() if (o.rf or o.shape) and _names(o)]


def test_every_fx_target_with_an_aten_namesake_is_registered():
    """An ATen op named like a function or method fxrf covers (aten.reciprocal for torch.reciprocal) has a rule."""
    missing = sorted((o.name, n) for o in _fx_ops() for n in _names(o)
                     if isinstance(getattr(aten, n, None), torch._ops.OpOverloadPacket) and not _registered(n))
    assert not missing, missing


def test_every_fx_covered_op_has_an_aten_form():
    uncovered = sorted(o.name for o in _fx_ops() if not any(_registered(n) for n in _names(o)))
    assert uncovered == sorted(NO_ATEN_FORM), uncovered


def test_resampling_modes_have_their_aten_ops():
    for name in ("upsample_nearest", "_upsample_nearest_exact", "upsample_linear"):
        assert _registered(f"{name}1d")
    for name in ("upsample_nearest", "_upsample_nearest_exact", "upsample_bilinear", "upsample_bicubic"):
        assert _registered(f"{name}2d")
    for name in ("upsample_nearest", "_upsample_nearest_exact", "upsample_trilinear"):
        assert _registered(f"{name}3d")


class Between(nn.Module):
    """conv -> the op under test -> conv, on 4 channels."""

    def __init__(self, fn):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.fn = fn
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(self.fn(self.a(x)))


class Rsub(nn.Module):
    def forward(self, x):
        return 1 - x  # aten.rsub.Scalar


class Reciprocal(nn.Module):
    def forward(self, x):
        return torch.reciprocal(x + 2)


class NearestExact(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="nearest-exact")  # aten._upsample_nearest_exact2d


# by hand, on a 9x9 input: two 3x3 convs around a per-element op see 5x5; around an instance norm (statistics over
# the whole map) b sees the whole 9x9 map; a 2x upsample starts a new 18x18 stage, where b's 3x3 window sees 3x3
CASES = {
    "rsub": (Rsub(), (5, 5)),
    "reciprocal": (Reciprocal(), (5, 5)),
    "instance_norm": (nn.InstanceNorm2d(4, affine=True), (9, 9)),
    "nearest_exact": (NearestExact(), (3, 3)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_both_captures_agree_with_autograd(name):
    fn, last = CASES[name]
    model, shape = Between(fn).eval(), (1, 4, 9, 9)
    got = {}
    for capture in ("fx", "export"):
        a = fxrf.analyze(model, shape, capture=capture)
        assert not a.unsupported, a.unsupported
        problems, checked = compare(model, shape, a)
        assert not problems and checked >= 3, problems
        got[capture] = [(r.rf, r.input_rf, r.kernel) for r in a.convs()]
    assert got["fx"] == got["export"]
    assert got["fx"][-1][0].spatial == last


def test_instance_norm_with_running_statistics_is_per_channel():
    """track_running_stats in eval mode: an affine map per channel (use_input_stats=False), 5x5 as for rsub."""
    norm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
    model, shape = Between(norm).eval(), (1, 4, 9, 9)
    for capture in ("fx", "export"):
        a = fxrf.analyze(model, shape, capture=capture)
        problems, _ = compare(model, shape, a)
        assert not a.unsupported and not problems, problems
        assert a.convs()[-1].rf.spatial == (5, 5)
