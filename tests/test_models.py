"""Tests for fxrf.models: the paper's baselines, checked against independent figures.

Expected numbers come from the poster (Tables 2-6) and the worked
notes, both carried in docs/paper.md; each is cited next to it.  The paper's "MFLOPs" are millions of
multiply-accumulates (MACs) rounded to 10M (docs/paper.md), so MACs are compared at that precision, and
more tightly where docs/paper.md gives a finer figure.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fxrf.models import (
    MODELS,
    mobilenet_v1_cifar,
    mobilenet_v1_imagenet,
    resnet50_cifar,
    vgg11_cifar,
    vgg11_variant,
    vgg16_cifar,
    vgg16_cifar100,
    vgg19_cifar,
    vgg19_cifar100,
    vgg_cifar,
)


def n_params(factory, **kw) -> int:
    with torch.device("meta"):  # shapes only: no allocation, no init cost
        model = factory(**kw)
    return sum(p.numel() for p in model.parameters())


def macs(model: nn.Module, size: int = 32) -> int:
    """Multiply-accumulates of convs + linears on a real batch-1 forward (FLOPs = 2 * MACs)."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, size, size))
    counts = counter.get_flop_counts()["Global"]
    flops = sum(v for k, v in counts.items() if str(k).split(".")[-1] in {"convolution", "addmm", "mm"})
    assert flops == counter.get_total_flops()  # nothing else (BN, pools) is counted anyway
    return flops // 2


def m10(n: int) -> int:
    """Round MACs to 10M as the paper does, in M."""
    return int(round(n / 1e7)) * 10


# --------------------------------------------------------------------------- parameters

def test_vgg16_cifar10_exact_params():
    assert n_params(vgg16_cifar) == 14_728_266  # docs/paper.md "CIFAR-10 VGG16/19": 14,728,266 params


_PARAMS = [
    # CIFAR-10, poster Table 3 (and docs/paper.md layouts)
    (vgg16_cifar, {}, 14.73),  # Table 3 VGG16 14.73M
    (vgg19_cifar, {}, 20.04),  # Table 3 VGG19 20.04M
    (mobilenet_v1_cifar, {}, 3.22),  # Table 3 MobileNet 3.22M; docs/paper.md 3.22M
    (resnet50_cifar, {}, 23.52),  # Table 3 ResNet50 23.52M; docs/paper.md 23.52M
    (vgg_cifar, {"stage_convs": (5, 4, 2, 1, 1)}, 5.10),  # Table 3 VGG16-opt 5.10M; docs/paper.md 5,4,2,1,1
    (vgg_cifar, {"stage_convs": (4, 3, 2, 3, 1)}, 9.64),  # Table 6 Baseline 9.64M; docs/paper.md 4,3,2,3,1
    # CIFAR-100, poster Table 4
    (vgg16_cifar100, {}, 34.02),  # Table 4 VGG16 34.02M; docs/paper.md 512-4096-4096-100 head
    (vgg19_cifar100, {}, 39.33),  # Table 4 VGG19 39.33M; docs/paper.md
    (vgg16_cifar, {"num_classes": 100, "classifier": "mlp"}, 34.02),  # same model, spelled out (Table 4)
    (resnet50_cifar, {"num_classes": 100}, 23.71),  # Table 4 ResNet50 23.71M
    pytest.param(
        mobilenet_v1_cifar, {"num_classes": 100}, 3.32,  # Table 4 MobileNet 3.32M
        marks=pytest.mark.xfail(
            strict=True,
            reason="Table 4's 3.32M is not reproducible with docs/paper.md's 3.22M CIFAR layout: swapping the "
            "head to Linear(1024, 100) gives 3,309,476 = 3.31M (see test_mobilenet_cifar100_params)",
        ),
        id="mobilenet_v1_cifar-100-table4",
    ),
    # ImageNet, poster Table 5
    (mobilenet_v1_imagenet, {}, 4.23),  # Table 5 MobileNet 4.23M; docs/paper.md stride-2 stem, Linear(1024, 1000)
]


@pytest.mark.parametrize("factory, kw, expected_m", _PARAMS)
def test_param_counts_match_paper(factory, kw, expected_m):
    assert round(n_params(factory, **kw) / 1e6, 2) == expected_m


def test_mobilenet_cifar100_params():
    # docs/paper.md's CIFAR MobileNet with the classifier widened from 10 to 100 classes: only
    # Linear(1024, classes) changes, by 90 * (1024 + 1) parameters.
    assert n_params(mobilenet_v1_cifar, num_classes=100) - n_params(mobilenet_v1_cifar) == 90 * 1025
    assert n_params(mobilenet_v1_cifar, num_classes=100) == 3_309_476  # 3.31M (Table 4 prints 3.32M)


# --------------------------------------------------------------------------- MACs

def test_vgg16_cifar_macs():
    m = macs(vgg16_cifar())
    assert abs(m - 313.2e6) <= 0.01 * 313.2e6  # docs/paper.md: VGG16 313.2M MACs (conv + linear only)
    assert m10(m) == 310  # Table 3 VGG16 310 MFLOPs


@pytest.mark.parametrize("stage_convs", [(4, 3, 2, 3, 1), (5, 4, 2, 1, 1)])
def test_vgg16_opt_macs(stage_convs):
    m = macs(vgg_cifar(stage_convs))
    assert abs(m - 370e6) <= 0.01 * 370e6  # docs/paper.md: both layouts 370M MACs; Table 3 / Table 6 370


@pytest.mark.parametrize(
    "factory, kw, expected_10m",
    [
        (vgg19_cifar, {}, 400),  # Table 3 VGG19 400
        (mobilenet_v1_cifar, {}, 50),  # Table 3 MobileNet 50
        (resnet50_cifar, {}, 1300),  # Table 3 ResNet50 1,300; docs/paper.md "about 1.30G MACs"
        (vgg16_cifar100, {}, 330),  # Table 4 VGG16 330
        (vgg19_cifar100, {}, 420),  # Table 4 VGG19 420
        (mobilenet_v1_cifar, {"num_classes": 100}, 50),  # Table 4 MobileNet 50
    ],
)
def test_macs_match_paper_rounded(factory, kw, expected_10m):
    assert m10(macs(factory(**kw))) == expected_10m


def test_resnet50_cifar_macs():
    m = macs(resnet50_cifar())
    assert abs(m - 1.30e9) <= 0.01 * 1.30e9  # docs/paper.md: CIFAR ResNet50 about 1.30G MACs


def test_mobilenet_imagenet_macs():
    m = macs(mobilenet_v1_imagenet(), size=224)
    # MobileNet v1 paper (Howard et al. 2017, Table 8, 1.0 MobileNet-224): 569M Mult-Adds.
    # (Poster Table 5 prints 580, which this layout does not reach: 568.7M; see the report.)
    assert abs(m - 569e6) <= 0.01 * 569e6


# --------------------------------------------------------------------------- forward / trace

def _input_size(name: str) -> int:
    return 224 if "imagenet" in name else 32


_NUM_CLASSES = {"vgg16_cifar100": 100, "vgg19_cifar100": 100, "mobilenet_v1_imagenet": 1000}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shape_and_trace(name):
    factory = MODELS[name]
    expected = _NUM_CLASSES.get(name, 10)
    model = factory().eval()
    size = _input_size(name)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, expected)

    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_num_classes_keyword(name):
    with torch.device("meta"):
        model = MODELS[name](num_classes=7)
        y = model(torch.empty(2, 3, _input_size(name), _input_size(name)))
    assert y.shape == (2, 7)


def test_registry_names():
    expected = {
        "vgg11_cifar", "vgg16_cifar", "vgg19_cifar", "vgg16_cifar100", "vgg19_cifar100",
        "vgg16_opt_table6", "vgg16_opt_table3", "mobilenet_v1_cifar", "mobilenet_v1_imagenet",
        "resnet50_cifar", *(f"vgg11_variant{i}" for i in range(1, 6)),
    }
    assert expected <= set(MODELS)
    # docs/paper.md "Table 3-6 notes": Table 6 baseline 4,3,2,3,1 (9.64M), Table 3 VGG16-opt 5,4,2,1,1 (5.10M)
    assert n_params(MODELS["vgg16_opt_table6"]) == n_params(vgg_cifar, stage_convs=(4, 3, 2, 3, 1))
    assert n_params(MODELS["vgg16_opt_table3"]) == n_params(vgg_cifar, stage_convs=(5, 4, 2, 1, 1))


# --------------------------------------------------------------------------- structure

def _convs_per_stage(model: nn.Module) -> list[list[nn.Conv2d]]:
    """Convs between max pools, in execution order (from the fx graph)."""
    gm = torch.fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    stages: list[list[nn.Conv2d]] = [[]]
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = mods[node.target]
        if isinstance(m, nn.Conv2d):
            stages[-1].append(m)
        elif isinstance(m, nn.MaxPool2d):
            stages.append([])
    assert stages[-1] == []  # VGG ends with a pool
    return stages[:-1]


def test_vgg11_layout():
    # docs/paper.md Table 2: stages at 32, 16, 8, 4, 2 px with 1, 1, 2, 2, 2 convs of 64, 128, 256, 512, 512
    stages = _convs_per_stage(vgg11_cifar())
    assert [len(s) for s in stages] == [1, 1, 2, 2, 2]
    assert [s[-1].out_channels for s in stages] == [64, 128, 256, 512, 512]
    for s in stages:
        for c in s:
            assert c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is not None


@pytest.mark.parametrize("i", [1, 2, 3, 4, 5])
def test_vgg11_variant_extra_conv(i):
    # Poster Table 2: "inserting a single standard convolution before each max pooling"
    base = [len(s) for s in _convs_per_stage(vgg11_cifar())]
    stages = _convs_per_stage(vgg11_variant(i))
    counts = [len(s) for s in stages]
    assert sum(counts) == sum(base) + 1
    assert counts == [b + (k == i - 1) for k, b in enumerate(base)]
    extra = stages[i - 1][-1]
    width = (64, 128, 256, 512, 512)[i - 1]  # the stage's width
    assert (extra.in_channels, extra.out_channels, extra.kernel_size) == (width, width, (3, 3))


def test_vgg11_variant_rejects_bad_index():
    for i in (0, 6):
        with pytest.raises(ValueError):
            vgg11_variant(i)


def test_vgg_classifiers():
    assert isinstance(vgg16_cifar().classifier, nn.Linear)  # docs/paper.md: one Linear(512, 10)
    head = vgg16_cifar100().classifier  # docs/paper.md: 512-4096-4096-100
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 4096), (4096, 4096), (4096, 100)]
    with pytest.raises(ValueError):
        vgg16_cifar(classifier="nope")


def test_mobilenet_layout():
    # docs/paper.md CIFAR MobileNet: stem 3->32 stride 1, 13 DW3x3 + PW1x1 blocks, no conv bias
    with torch.device("meta"):
        convs = [m for m in mobilenet_v1_cifar().modules() if isinstance(m, nn.Conv2d)]
        stem2 = next(m for m in mobilenet_v1_imagenet().modules() if isinstance(m, nn.Conv2d))
    assert len(convs) == 1 + 2 * 13
    assert all(c.bias is None for c in convs)
    assert (convs[0].in_channels, convs[0].out_channels, convs[0].stride) == (3, 32, (1, 1))
    assert stem2.stride == (2, 2)
    dws, pws = convs[1::2], convs[2::2]
    assert all(c.groups == c.in_channels == c.out_channels and c.kernel_size == (3, 3) for c in dws)
    assert all(c.groups == 1 and c.kernel_size == (1, 1) for c in pws)
    assert [c.out_channels for c in pws] == [64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    assert [i for i, c in enumerate(dws) if c.stride == (2, 2)] == [1, 3, 5, 11]


def test_resnet50_cifar_layout():
    # docs/paper.md CIFAR ResNet50: 3x3 stem 3->64, no max pool, [3,4,6,3] bottlenecks, Linear(2048, classes)
    with torch.device("meta"):
        model = resnet50_cifar()
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert [len(getattr(model, f"layer{k}")) for k in range(1, 5)] == [3, 4, 6, 3]
    assert model.fc.in_features == 2048
    shortcuts = [m.downsample for m in model.modules() if getattr(m, "downsample", None) is not None]
    assert len(shortcuts) == 4  # one 1x1 projection (conv + BN) per stage
    assert all(s[0].kernel_size == (1, 1) and isinstance(s[1], nn.BatchNorm2d) for s in shortcuts)
