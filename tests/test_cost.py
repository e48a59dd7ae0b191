"""Tests for fxrf.cost: hand counts, FlopCounterMode cross-checks, parameter sums."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from fxrf.cost import Cost, model_cost, node_cost, total, uncounted
from fxrf.errors import DuplicateRuleError
from fxrf.ops import DEFAULT, Op, define

MAIN = ("conv", "linear")


def traced(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(x)
    return gm


def single(model: nn.Module, x: torch.Tensor) -> Cost:
    """Cost of the only costed node of a one-layer model (wrapped so it is a call_module leaf)."""
    costs = model_cost(traced(nn.Sequential(model), x))
    assert len(costs) == 1, costs
    return next(iter(costs.values()))


def main_macs(costs: dict[str, Cost]) -> int:
    return sum(c.macs for c in costs.values() if c.kind in MAIN)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops()


# ------------------------------------------------------------- hand counts


@pytest.mark.parametrize(
    "layer, shape, macs, params",
    [
        # out 1x32x8x8: 8*8*32 outputs * 16 in-ch * 3*3; params 32*16*9 + 32
        (nn.Conv2d(16, 32, 3, padding=1), (1, 16, 8, 8), 8 * 8 * 32 * 16 * 9, 32 * 16 * 9 + 32),
        # groups=4: each output sees 16/4 = 4 in-ch: 8*8*32 * 4 * 9; params 32*4*9 + 32
        (nn.Conv2d(16, 32, 3, padding=1, groups=4), (1, 16, 8, 8), 8 * 8 * 32 * 4 * 9, 32 * 4 * 9 + 32),
        # depthwise: 8*8*16 outputs * 1 in-ch * 9; params 16*1*9 + 16
        (nn.Conv2d(16, 16, 3, padding=1, groups=16), (1, 16, 8, 8), 8 * 8 * 16 * 1 * 9, 16 * 9 + 16),
        # stride 2, dilation 2, pad 2: out = (8 + 2*2 - 2*(3-1) - 1)//2 + 1 = 4 -> 4*4*32 * 16 * 9
        (nn.Conv2d(16, 32, 3, stride=2, padding=2, dilation=2), (1, 16, 8, 8), 4 * 4 * 32 * 16 * 9, 32 * 16 * 9 + 32),
        # no bias: same MACs (bias never counted), params 32*16*1*1
        (nn.Conv2d(16, 32, 1, bias=False), (1, 16, 8, 8), 8 * 8 * 32 * 16 * 1, 32 * 16),
        # Conv1d, batch 2: out len 20-5+1 = 16 -> 2*16*8 outputs * 4 in-ch * 5; params 8*4*5 + 8
        (nn.Conv1d(4, 8, 5), (2, 4, 20), 2 * 16 * 8 * 4 * 5, 8 * 4 * 5 + 8),
        # Conv3d, pad 1 keeps 4x6x6: 4*6*6*4 outputs * 2 in-ch * 27; params 4*2*27 + 4
        (nn.Conv3d(2, 4, 3, padding=1), (1, 2, 4, 6, 6), 4 * 6 * 6 * 4 * 2 * 27, 4 * 2 * 27 + 4),
        # ConvTranspose2d: each of 8*5*5 inputs scatters into 4 out-ch * 9 taps; params 8*4*9 + 4
        (nn.ConvTranspose2d(8, 4, 3, stride=2), (1, 8, 5, 5), 8 * 5 * 5 * 4 * 9, 8 * 4 * 9 + 4),
        # Linear: 3 rows * 10 outputs * 20 in; params 20*10 + 10
        (nn.Linear(20, 10), (3, 20), 3 * 10 * 20, 210),
        # Linear on a 3-D input: 2*5*10 outputs * 20 in
        (nn.Linear(20, 10), (2, 5, 20), 2 * 5 * 10 * 20, 210),
    ],
)
def test_hand_counts_main_ops(layer, shape, macs, params):
    c = single(layer, torch.randn(shape))
    kind = "linear" if isinstance(layer, nn.Linear) else "conv"
    assert c == Cost(params=params, macs=macs, extra_macs=0, kind=kind)


@pytest.mark.parametrize(
    "layer, extra, params, kind",
    [
        # BatchNorm (affine): 2 per element of 1x16x8x8 = 2*1024; params 16 weight + 16 bias
        (nn.BatchNorm2d(16), 2 * 1024, 32, "norm"),
        # non-affine: 1 per element; running stats are buffers, not params
        (nn.BatchNorm2d(16, affine=False), 1024, 0, "norm"),
        # GroupNorm(4, 16) affine: 2 * 1024
        (nn.GroupNorm(4, 16), 2 * 1024, 32, "norm"),
        # activations: 1 per output element
        (nn.ReLU(), 1024, 0, "activation"),
        (nn.Hardswish(), 1024, 0, "activation"),
        (nn.SiLU(), 1024, 0, "activation"),
        # pooling: 1 per input element (ptflops convention)
        (nn.MaxPool2d(2), 1024, 0, "pool"),
        (nn.AdaptiveAvgPool2d(1), 1024, 0, "pool"),
        # unknown module: nothing
        (nn.Identity(), 0, 0, "other"),
    ],
)
def test_hand_counts_cheap_modules(layer, extra, params, kind):
    assert single(layer, torch.randn(1, 16, 8, 8)) == Cost(params, 0, extra, kind)


class FunctionalConv(nn.Module):
    """F.conv2d / F.linear on get_attr'd nn.Parameters, plus method/function forms."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4, 3, 3))
        self.b = nn.Parameter(torch.randn(8))
        self.wg = nn.Parameter(torch.randn(8, 4, 3, 3))  # groups=2: 8 in-ch / 2
        self.fc_w = nn.Parameter(torch.randn(5, 8))
        self.register_buffer("scale", torch.ones(1, 8, 1, 1))  # a buffer: never a param

    def forward(self, x):
        y = F.conv2d(x, self.w, self.b, padding=1)  # 1x8x6x6
        y = y.relu()
        y = torch.conv2d(y, self.wg, None, 1, 1, 1, 2)  # positional groups=2
        y = y * self.scale
        y = torch.sigmoid(y) + y
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)  # 1x8
        return F.linear(y, self.fc_w)  # 1x5


def test_functional_conv_hand_counts():
    model = FunctionalConv()
    costs = model_cost(traced(model, torch.randn(1, 4, 6, 6)))
    by_kind: dict[str, list[Cost]] = {}
    for c in costs.values():
        by_kind.setdefault(c.kind, []).append(c)
    conv1, conv2 = by_kind["conv"]
    # 6*6*8 outputs * 4 in-ch * 9; params at the consumer: 8*4*9 weight + 8 bias
    assert conv1 == Cost(8 * 4 * 9 + 8, 6 * 6 * 8 * 4 * 9, 0, "conv")
    # groups=2: 6*6*8 outputs * (8/2) in-ch * 9; params 8*4*9
    assert conv2 == Cost(8 * 4 * 9, 6 * 6 * 8 * 4 * 9, 0, "conv")
    # linear: 5 outputs * 8 in; params 5*8
    assert by_kind["linear"] == [Cost(40, 5 * 8, 0, "linear")]
    # relu (method) + sigmoid (torch.*) on 288 elements each
    assert [c.extra_macs for c in by_kind["activation"]] == [288, 288]
    # mul by buffer + add: 288 each
    assert [c.extra_macs for c in by_kind["elementwise"]] == [288, 288]
    assert [c.extra_macs for c in by_kind["pool"]] == [288]
    assert total(costs).params == n_params(model) == 296 + 288 + 40


def test_shared_weights_counted_once():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.w = nn.Parameter(torch.randn(4, 4, 1, 1))

        def forward(self, x):
            x = self.conv(self.conv(x))  # same module twice
            return F.conv2d(F.conv2d(x, self.w), self.w)  # same get_attr'd weight twice

    model = Shared()
    costs = model_cost(traced(model, torch.randn(1, 4, 5, 5)))
    assert [c.params for c in costs.values()] == [4 * 4 * 9 + 4, 0, 16, 0]
    # MACs are per call: 2 * (25*4 outputs * 4 * 9) + 2 * (25*4 * 4 * 1)
    assert total(costs).macs == 2 * 25 * 4 * 4 * 9 + 2 * 25 * 4 * 4
    assert total(costs).params == n_params(model)


def test_leaf_module_with_children_owns_all_params():
    mha = nn.MultiheadAttention(16, 2, batch_first=True)  # out_proj is a child module

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x)[0]

    costs = model_cost(traced(Attn(), torch.randn(1, 3, 16)))
    assert total(costs).params == n_params(mha)


def test_matmul_forms():
    class MM(nn.Module):
        def forward(self, a, b):
            return torch.matmul(a, b) @ b.transpose(0, 1) @ b, torch.bmm(a, a.transpose(1, 2))

    gm = torch.fx.symbolic_trace(MM())
    a, b = torch.randn(2, 3, 4), torch.randn(4, 4)
    ShapeProp(gm).propagate(a, b)
    macs = [c.macs for c in model_cost(gm).values() if c.kind == "linear"]
    # matmul 2x3x4 @ 4x4: 24 outputs * K=4, twice more via @; bmm 2x3x4 @ 2x4x3: 18 outputs * 4
    assert macs == [24 * 4, 24 * 4, 24 * 4, 18 * 4]
    with FlopCounterMode(display=False) as fc:
        MM()(a, b)
    assert 2 * sum(macs) == fc.get_total_flops()


def test_none_and_other_nodes():
    class M(nn.Module):
        def forward(self, x):
            return torch.flatten(x, 1), x.size(0)

    gm = traced(M(), torch.randn(2, 3, 4))
    nodes = {n.name: n for n in gm.graph.nodes}
    assert node_cost(gm, nodes["x"]) is None  # placeholder
    assert node_cost(gm, nodes["output"]) is None
    assert node_cost(gm, nodes["size"]) is None  # returns an int
    assert node_cost(gm, nodes["flatten"]) == Cost(0, 0, 0, "other")
    assert model_cost(gm) == {"flatten": Cost(0, 0, 0, "other")}


def test_operator_add_counts_broadcast_output():
    class M(nn.Module):
        def forward(self, x, y):
            return operator.add(x, y).mul(2.0)

    gm = torch.fx.symbolic_trace(M())
    ShapeProp(gm).propagate(torch.randn(2, 3, 4), torch.randn(4))
    assert [c for c in model_cost(gm).values()] == [Cost(0, 0, 24, "elementwise")] * 2


def test_registry_rejects_duplicates_and_requires_shapes():
    with pytest.raises(DuplicateRuleError, match="duplicate"):
        define("my_conv", nn.Conv2d, cost=lambda call: (0, 0), kind="conv")
    with pytest.raises(DuplicateRuleError, match="duplicate"):
        define("my_relu", "relu", kind="activation")
    with pytest.raises(ValueError, match="unknown cost kind"):
        Op("bad", ("my_op",), kind="flops")
    assert all(DEFAULT.lookup_target(t).cost is not None for t in (F.conv2d, torch.conv2d, nn.Linear))
    with pytest.raises(ValueError, match="ShapeProp"):
        model_cost(torch.fx.symbolic_trace(nn.Conv2d(1, 1, 1)))


def test_total():
    t = total([Cost(1, 2, 3, "conv"), Cost(10, 20, 30, "pool")])
    assert t == Cost(11, 22, 33, "total")
    assert total({}) == Cost(0, 0, 0, "total")


@settings(max_examples=25, deadline=None)
@given(
    cin_g=st.integers(1, 3),
    cout_g=st.integers(1, 3),
    groups=st.integers(1, 3),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    pad=st.integers(0, 2),
    transposed=st.booleans(),
)
def test_random_conv_matches_flop_counter(cin_g, cout_g, groups, k, stride, dilation, pad, transposed):
    cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    conv = cls(cin_g * groups, cout_g * groups, k, stride=stride, padding=pad, dilation=dilation, groups=groups)
    x = torch.randn(2, cin_g * groups, 7, 6)
    c = single(conv, x)
    assert 2 * c.macs == flops(conv, x)
    assert c.params == n_params(conv)


# --------------------------------------------------- whole models vs FlopCounterMode


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, groups=4)
        self.dw = nn.Conv2d(32, 32, 5, padding=4, dilation=2, groups=32)
        self.up = nn.ConvTranspose2d(32, 8, 2, stride=2, groups=2)
        self.w = nn.Parameter(torch.randn(8, 4, 3, 3))  # functional grouped conv
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = self.c2(x)
        x = x + self.dw(x)
        x = F.conv2d(self.up(x), self.w, padding=1, groups=2)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(), (1, 3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), (1, 3, 64, 64)),
    "small_cnn": (SmallCNN, (1, 3, 17, 15)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def real_model(request):
    torch.manual_seed(0)
    make, shape = MODELS[request.param]
    model = make().eval()
    x = torch.randn(shape)
    return model, x, model_cost(traced(model, x))


def test_main_macs_match_flop_counter(real_model):
    model, x, costs = real_model
    # FlopCounterMode counts only conv/mm-like ops, at 2 FLOPs per MAC, bias excluded.
    assert 2 * main_macs(costs) == flops(model, x)


def test_params_sum_matches_model(real_model):
    model, _, costs = real_model
    assert total(costs).params == n_params(model)


# ------------------------------------------------------------- meta device, 224x224

# Reference figures are torchvision's own model metadata (docs "GFLOPS" column, which
# are multiply-accumulates: ResNet-50 = 4.09 G, cf. He et al. 2016, Table 1 "3.8x10^9
# FLOPs" for the original variant; torchvision's stride-on-3x3 v1.5 is 4.09 G):
#   ResNet50_Weights.IMAGENET1K_V1.meta: _ops = 4.089, num_params = 25557032
#   MobileNet_V2_Weights.IMAGENET1K_V1.meta: _ops = 0.301, num_params = 3504872
@pytest.mark.parametrize(
    "make, gmacs, params",
    [
        (torchvision.models.resnet50, 4.09, 25557032),
        (torchvision.models.mobilenet_v2, 0.301, 3504872),
    ],
)
def test_meta_device_torchvision_224(make, gmacs, params):
    with torch.device("meta"):
        model = make().eval()
    assert next(model.parameters()).is_meta
    costs = model_cost(traced(model, torch.empty(1, 3, 224, 224, device="meta")))
    assert main_macs(costs) == pytest.approx(gmacs * 1e9, rel=5e-3)
    assert total(costs).params == params


class ConvAttention(nn.Module):
    """A conv stem whose map becomes tokens for multi-head attention: ops with no cost rule of their own."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = self.attn(t, t, t, need_weights=False)[0]
        q = t.unflatten(2, (4, 8)).transpose(1, 2)
        t = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(2)
        return self.head(t.mean(1))


def test_ops_without_a_cost_rule_are_counted_by_flop_counter():
    model, x = ConvAttention().eval(), torch.randn(1, 3, 8, 8)
    gm = torch.fx.symbolic_trace(model)
    ShapeProp(gm).propagate(x)
    costs = model_cost(gm)
    assert costs["attn"].source == "flop_counter" and costs["scaled_dot_product_attention"].source == "flop_counter"
    # By hand, 8x8 map = 64 tokens of width 32, 4 heads of 8: stem 64*32*27 = 55,296; attention module: in_proj
    # 64*32*96 = 196,608, Q K^T and A V 2 * 4*64*64*8 = 262,144, out_proj 64*32*32 = 65,536; sdpa 262,144;
    # head 32*10 = 320. Total 842,048.
    assert total(costs).macs == 842_048
    # torch's own count of the whole forward, run on meta tensors (on CPU tensors FlopCounterMode misses the
    # fused attention kernels and reports 317,760, the conv and linear layers alone)
    meta_model = copy.deepcopy(model).to("meta")
    with FlopCounterMode(display=False) as counter:
        meta_model(torch.empty(1, 3, 8, 8, device="meta"))
    expected = counter.get_total_flops() // 2
    assert abs(total(costs).macs - expected) <= 0.01 * expected, (total(costs).macs, expected)
    assert uncounted(costs) == []
    # the attention module returns (out, None): its parameters are still counted
    assert total(costs).params == sum(p.numel() for p in model.parameters())


def test_fxrf_trace_counts_params_of_tuple_returning_modules():
    import fxrf
    model = ConvAttention()
    a = fxrf.analyze(model, (1, 3, 8, 8))
    assert total(a.costs).params == sum(p.numel() for p in model.parameters())


def test_node_cost_with_the_params_walked_once_is_model_cost():
    # the organizer costs many nodes of one graph with one parameter walk (`params_by_node`); each must equal
    # model_cost's (which walks once too) and node_cost's own walk; a shared tensor is counted by one node only
    from fxrf.cost import params_by_node
    m = torchvision.models.resnet18().eval()
    gm = traced(m, torch.randn(1, 3, 64, 64))
    params = params_by_node(gm)
    whole = model_cost(gm)
    assert sum(params.values()) == sum(p.numel() for p in m.parameters())
    for n in gm.graph.nodes:
        c = node_cost(gm, n, params=params)
        assert c == whole.get(n.name) == node_cost(gm, n)
