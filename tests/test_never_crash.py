"""Never crash: whatever graph fxrf is given, `analyze` returns or raises an FxrfError (issue 10).

Odd blocks taken from models no one here wrote (attention hybrids that fold heads into the batch axis, tuple-valued
nodes, boolean masks, channels-last inputs, half precision) are composed at random by hypothesis; the crashes the
issue lists are also pinned one by one.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxrf

pytestmark = pytest.mark.threads(1)
C = 4  # channels every block keeps


class HeadsInBatch(nn.Module):  # attention hybrids: reshape(b * heads, ...), softmax over the map, back
    def forward(self, x):
        b, c, h, w = x.shape
        y = x.reshape(b * 2, c // 2, h * w).softmax(-1)
        return y.reshape(b, c, h, w)


class FlattenBatch(nn.Module):  # flatten(0, 1): channels folded into the batch
    def forward(self, x):
        b, c, h, w = x.shape
        return x.flatten(0, 1).unsqueeze(1).reshape(b, c, h, w)


class ChunkH(nn.Module):  # a tuple-valued node along H
    def forward(self, x):
        top, bottom = x.chunk(2, dim=2)
        return torch.cat([bottom, top], dim=2)


class PoolIndices(nn.Module):  # max_pool2d(return_indices=True): a tuple, the map resampled
    def forward(self, x):
        y, idx = F.max_pool2d(x, 2, return_indices=True)
        return F.interpolate(y, size=x.shape[-2:])


class BoolMask(nn.Module):  # .to(dtype=torch.bool) then ~mask
    def forward(self, x):
        mask = (x > 0).to(dtype=torch.bool)
        return x * (~mask).to(x.dtype)


class TupleOut(nn.Module):  # a block returning a tuple, of which one element is used
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        return self.conv(x), x.mean()


class Pick(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)[0]


class InPlaceAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        y.add_(x)
        return y


class LinearGate(nn.Module):  # squeeze-excite with Linear layers
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(C, C)

    def forward(self, x):
        b, c = x.shape[:2]
        return x * torch.sigmoid(self.fc(x.mean((2, 3)))).view(b, c, 1, 1)


class Roll(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, 3)


BLOCKS = {
    "conv": lambda: nn.Conv2d(C, C, 3, padding=1),
    "conv_valid": lambda: nn.Conv2d(C, C, 3),
    "conv_stride": lambda: nn.Conv2d(C, C, 3, stride=2, padding=1),
    "conv_circular": lambda: nn.Conv2d(C, C, 3, padding=2, dilation=2, padding_mode="circular"),
    "reflect": lambda: nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(C, C, 3)),
    "heads": HeadsInBatch, "flatten01": FlattenBatch, "chunk": ChunkH, "indices": PoolIndices, "mask": BoolMask,
    "tuple": lambda: Pick(TupleOut()), "inplace": InPlaceAdd, "gate": LinearGate, "roll": Roll,
    "upsample": lambda: nn.Upsample(scale_factor=2, mode="bicubic"),
    "relu_inplace": lambda: nn.ReLU(inplace=True),
}


def assert_analyses(model, shape, **kw):
    try:
        a = fxrf.analyze(model, shape, **kw)
    except fxrf.FxrfError:
        return None
    assert a.records and all(r.name for r in a.records)
    a.to_dict()  # the report of any analysis can be built
    return a


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(st.sampled_from(sorted(BLOCKS)), min_size=1, max_size=5),
       size=st.sampled_from([8, 12, 16]), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       strict=st.booleans())
def test_random_odd_models_return_or_raise_fxrf_errors(names, size, dtype, strict):
    model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), *(BLOCKS[n]() for n in names)).to(dtype)
    assert_analyses(model, (1, 3, size, size), strict=strict)


class ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, padding=1)

    def forward(self, x):  # x: N H W C
        return self.conv(x.permute(0, 3, 1, 2))


def test_channels_last_input_permuted_before_a_conv():
    # before: ValueError: 1 is not in list. The input's spatial axes are 1 and 2, so the conv is exact: 3x3
    a = fxrf.analyze(ChannelsLast(), (1, 16, 16, 3))
    assert a.unsupported == []
    assert a.record("conv").rf.spatial == (3, 3) and a.record("conv").rf.channel == 3


@pytest.mark.parametrize("block", ["heads", "flatten01"])
def test_heads_folded_into_the_batch_are_conservative_and_listed(block):
    # before: AnalysisError from numpy's reshape. Now the reshape declines: conservative, listed with the reason
    a = fxrf.analyze(nn.Sequential(nn.Conv2d(3, C, 3, padding=1), BLOCKS[block]()), (1, 3, 8, 8))
    assert any("batch axis" in reason for _, _, reason in a.unsupported)
    assert a.records[-1].rf.spatial == (8, 8)


@pytest.mark.parametrize("block,stages", [("chunk", 1), ("indices", 4), ("tuple", 1)])
def test_tuple_valued_nodes(block, stages):
    # before: AttributeError: 'tuple' object has no attribute 'channels' (a tuple-valued node starting a stage).
    # A chunk along H crops (same stage); max pooling resamples (its output and, unused, its indices start stages,
    # and so does the interpolation back to 8x8)
    a = fxrf.analyze(nn.Sequential(nn.Conv2d(3, C, 3, padding=1), BLOCKS[block]()), (1, 3, 8, 8))
    assert len(a.stages) == stages
    assert [n for n, _, _ in a.unsupported] == (["cat"] if block == "chunk" else [])  # cat along H: conservative


def test_bool_mask_keeps_its_dtype():
    gm = fxrf.trace(nn.Sequential(nn.Conv2d(3, C, 3, padding=1), BoolMask()), (1, 3, 8, 8))
    dtypes = {n.name: n.meta["tensor_meta"].dtype for n in gm.graph.nodes if "tensor_meta" in n.meta}
    assert dtypes["to"] == torch.bool and dtypes["invert"] == torch.bool


def test_decompose_a_meta_device_model():
    # before: RuntimeError from .item() in the weight transfer's error
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).to("meta")
    r = fxrf.decompose(m, (1, 3, 16, 16), recipe="DW+PW")
    assert r.changes and all(c.transfer_error is None for c in r.changes)  # no values to compare on meta


class UnusedLowBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.low = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, x):
        y = self.a(x)
        self.low(y)  # computed, never used
        return self.b(y)


def test_decompose_with_an_unused_branch():
    # before: KeyError on a node dead-code elimination removed
    m = UnusedLowBranch().eval()
    r = fxrf.decompose(m, (1, 3, 16, 16), recipe="DW+PW")
    assert [c.conv for c in r.changes] == ["b"]
    assert r.graph_module(torch.randn(1, 3, 16, 16)).shape == (1, 8, 16, 16)
