"""Bugs the coverage sweep (docs/coverage.md) found on real models, each reduced to a small model and checked
against autograd (tests/oracle.py) or a hand count; the real model once where it is quick."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxrf
from fxrf.ops import TMeta
from fxrf.shapes import propagate
from oracle import compare

pytestmark = pytest.mark.threads(1)


def exact(model, shape, capture, names=None):
    """The analysis, after checking its stage fields equal autograd's and its input fields bound them (on the
    nodes in `names`, or all)."""
    a = fxrf.analyze(model, shape, capture=capture)
    assert a.capture == capture
    problems, n = compare(model, shape, a)
    assert n > 0 and [p for p in problems if names is None or p.split(" ")[0] in names] == []
    above, _ = compare(model, shape, a, reference="input")
    assert [p for p in above if names is None or p.split(" ")[0] in names] == []
    return a


# ---- 1. unsqueeze: a new axis, exactly (tv:swin3d_t adds a window mask with .unsqueeze(1).unsqueeze(0)) ---------


class Unsqueezed(nn.Module):
    """conv -> unsqueeze(dim) -> relu -> squeeze(dim) -> conv: the relu keeps the pair from being a round trip
    (relu=False: it is one). `squeeze` spells the squeeze back."""

    def __init__(self, dim, squeeze=lambda t, d: t.squeeze(d), relu=True):
        super().__init__()
        self.dim, self.squeeze, self.relu = dim, squeeze, relu
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.a(x).unsqueeze(self.dim)
        return self.b(self.squeeze(torch.relu(y) if self.relu else y, self.dim))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("dim", [0, 1, 2])  # 0: before the batch axis
def test_unsqueeze_is_exact(capture, dim):
    a = exact(Unsqueezed(dim), (1, 2, 8, 8), capture)
    assert not [u for u in a.unsupported if "squeeze" in str(u[1])]  # before: dim 0 declined (batch axis)
    # autograd and by hand: a 3x3 conv after a 3x3 conv sees 5x5 of both input channels
    assert a.convs()[-1].rf.spatial == (5, 5) and a.convs()[-1].rf.channel == 2


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("dim", [-1, 4])  # after the map: the map is no longer trailing
def test_unsqueeze_after_the_map_is_exact(capture, dim):
    a = exact(Unsqueezed(dim), (1, 2, 8, 8), capture)  # every node, the squeeze back and the conv after it too
    assert a.unsupported == []  # before: the squeeze back declined (the reshape rule needs the map trailing)
    r = a.record("unsqueeze")
    assert r.field.sp == (2, 3) and r.field.idx.shape == (3, 1) and r.rf.spatial == (3, 3)
    r = a.record("squeeze")
    assert r.field.sp == (2, 3) and r.field.idx.shape == (3,) and r.rf.spatial == (3, 3)
    # autograd and by hand: a 3x3 conv after a 3x3 conv sees 5x5 of both input channels
    assert a.convs()[-1].rf.spatial == (5, 5) and a.convs()[-1].rf.channel == 2


SQUEEZES = {  # every spelling of squeezing axis d
    "method": lambda t, d: t.squeeze(d),
    "keyword": lambda t, d: t.squeeze(dim=d),
    "function": lambda t, d: torch.squeeze(t, d),
    "dims": lambda t, d: t.squeeze((d,)),
    # the 3 channels' axis (2 after unsqueeze(0), else 1) is not of size 1: kept
    "dims with a non-1 axis": lambda t, d: torch.squeeze(t, (2 if d == 0 else 1, d)),
}


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("form", list(SQUEEZES))
@pytest.mark.parametrize("dim,relu", [(-1, True), (2, True), (0, True), (-1, False)])  # relu=False: a round trip
def test_squeeze_is_exact(capture, form, dim, relu):
    a = exact(Unsqueezed(dim, SQUEEZES[form], relu), (1, 2, 8, 8), capture)
    assert a.unsupported == []
    assert a.convs()[-1].rf.spatial == (5, 5) and a.convs()[-1].rf.channel == 2  # by hand, as above


class PooledSqueeze(nn.Module):
    """conv -> global average pool -> squeeze the 1x1 map away -> linear: the map axes have size 1 and go."""

    def __init__(self, squeeze):
        super().__init__()
        self.squeeze = squeeze
        self.a, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(self.squeeze(F.adaptive_avg_pool2d(self.a(x), 1)))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("squeeze", [lambda t: t.squeeze(-1).squeeze(-1), lambda t: torch.squeeze(t, (2, 3)),
                                     lambda t: t.squeeze()], ids=["twice", "dims", "all"])
def test_squeeze_of_a_pooled_map_is_exact(capture, squeeze):
    a = exact(PooledSqueeze(squeeze), (2, 2, 8, 8), capture)  # batch 2: squeeze() keeps the batch axis
    assert a.unsupported == []
    r = a.records[-1]
    assert r.field.sp == (None, None) and r.rf.spatial == (8, 8) and r.rf.channel == 2  # the whole map


class ChannelsToBatch(nn.Module):
    def forward(self, x):  # (1, 2, 8, 8, 1) -> (2, 8, 8): the two channels, which see different things, as batch
        return torch.relu(x.unsqueeze(-1).squeeze())


def test_squeeze_of_channels_into_the_batch_declines():
    a = fxrf.analyze(ChannelsToBatch(), (1, 2, 8, 8), capture="fx")
    assert [u[0] for u in a.unsupported] == ["squeeze"] and "batch" in a.unsupported[0][2]


class BatchToChannel(nn.Module):
    """unsqueeze(0) of a 3-channel map: the old batch axis (1 here) becomes a channel-like axis, then a 1x1 conv3d
    over it mixes the three channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv3d(1, 2, (3, 1, 1))

    def forward(self, x):  # (1, 3, 8, 8) -> (1, 1, 3, 8, 8) -> conv3d along the channels -> (1, 2, 1, 8, 8)
        return self.b(self.a(x).unsqueeze(0))


def test_unsqueeze_at_zero_keeps_the_map():
    a = fxrf.analyze(BatchToChannel(), (1, 2, 8, 8), capture="export")
    r = a.record("unsqueeze")
    assert r.field.sp == (3, 4) and r.field.idx.shape == (1, 3) and r.rf.spatial == (3, 3)
    assert not a.unsupported


# ---- 1b. a declined window partition: the conservative field has no map (tv:swin3d_t crashed here) --------------


class WindowPartition(nn.Module):
    """Channels-last 3D windows as swin3d makes them: (1, T, H, W, C) -> (1, 1, T, 2, H/2, 2, W/2, C)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(2, 4, 3, padding=1)

    def forward(self, x):
        y = self.a(x).permute(0, 2, 3, 4, 1)
        return y.view(1, 1, 4, 2, 4, 2, 4, 4)


def test_declined_window_partition_is_conservative_without_a_map():
    # before: the conservative field put the map on the trailing axes (2, 4, 4), whose sizes do not fit a 4x8x8
    # map, and the record crashed (argmax of an empty sequence)
    a = fxrf.analyze(WindowPartition(), (1, 2, 4, 8, 8), capture="export")
    r = a.record("view")
    assert [u[0] for u in a.unsupported] == ["view"]
    assert r.field.sp == (None, None, None)
    assert r.rf.spatial == (4, 8, 8) and r.rf.channel == 2  # conservative: the whole map, every channel


def test_swin3d_t_unsqueeze_is_supported():
    torchvision = pytest.importorskip("torchvision")
    a = fxrf.analyze(torchvision.models.video.swin3d_t().eval(), (1, 3, 8, 64, 64), capture="export")
    assert not [u for u in a.unsupported if "unsqueeze" in str(u[1])]


# ---- 2. a conv of constants belongs to no stage (tv:raft_small, timm:edgenext_xx_small: TypeError) -------------


class ConstantConv(nn.Module):
    """A conv over a position grid made in forward (edgenext's Fourier position encoding, raft's coordinates)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.proj = nn.Conv2d(2, 4, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        ys = torch.arange(h, dtype=x.dtype).view(1, 1, h, 1).expand(1, 1, h, w)
        xs = torch.arange(w, dtype=x.dtype).view(1, 1, 1, w).expand(1, 1, h, w)
        return self.conv(x) + self.proj(torch.cat([ys, xs], 1))


class BufferConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.proj = nn.Conv2d(2, 4, 1)
        self.register_buffer("grid", torch.rand(1, 2, 8, 8))

    def forward(self, x):
        return self.conv(x) + self.proj(self.grid)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("model", [ConstantConv, BufferConv])
def test_conv_of_constants_has_no_stage(capture, model):
    a = exact(model().eval(), (1, 3, 8, 8), capture)  # before: TypeError in the record of the constant conv
    consts = [r for r in a.records if r.kernel is not None and r.stage is None]
    assert len(consts) == 1 and consts[0].gain is None and consts[0].rf is None
    conv = next(r for r in a.convs() if r.stage is not None)
    assert conv.rf.spatial == (3, 3) and conv.rf.channel == 3  # by hand: one 3x3 conv over 3 channels


def test_raft_small_analyses():
    tvm = pytest.importorskip("torchvision.models")

    class Raft(nn.Module):
        def __init__(self):
            super().__init__()
            self.raft = tvm.optical_flow.raft_small(weights=None)

        def forward(self, image1, image2):
            return self.raft(image1, image2, num_flow_updates=2)[-1]

    a = fxrf.analyze(Raft().eval(), [(1, 3, 128, 128), (1, 3, 128, 128)])
    assert any(r.stage is None for r in a.convs())  # convs of the flow, which starts as constants: before, TypeError


# ---- 3. shapes: a tensor made from sizes alone is a TMeta (hf:ViT organizer: cpu mask meets meta tensors) -------


class MaskedAttention(nn.Module):
    def forward(self, x):  # x: (1, 2, 5, 4); the mask is made from arange, without any tensor input
        n = x.shape[2]
        mask = (torch.arange(n) >= 0).view(1, 1, 1, n).expand(1, 1, n, n)
        return F.scaled_dot_product_attention(x, x, x, attn_mask=mask, scale=0.5)


def test_factory_tensor_meets_meta_tensors():
    gm = fx.symbolic_trace(MaskedAttention())
    env = propagate(gm, [TMeta((1, 2, 5, 4), torch.float32)])  # before: "Tensor on device cpu is not on ... meta"
    by_name = {n.name: v for n, v in env.items()}
    assert by_name["arange"] == TMeta((5,), torch.int64)
    assert by_name["scaled_dot_product_attention"] == TMeta((1, 2, 5, 4), torch.float32)


def test_vit_organizer_runs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64)
    model = transformers.ViTForImageClassification(cfg).eval()
    res = fxrf.organize_stages(model, (1, 3, 32, 32))  # before: AnalysisError on the lifted graph
    out = res.graph_module(torch.randn(1, 3, 32, 32))
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
    assert out.shape == (1, 2)  # ViTConfig's default two labels
