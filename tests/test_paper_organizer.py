"""The paper's own organizer (strategy="paper"): a fixed number of convs filled by descending 3DRF gain, the
Delta-3DRF column of Tables 3-5, and the uncapped spatial field those tables use (docs/paper.md).

Expected values come from the paper's tables (the poster; docs/paper.md) and from hand derivations written next
to them, never from the organizer itself.
"""
import json
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings

import fxrf
from fxrf import models
from fxrf.cost import total
from random_cnn import assume_runnable, random_cnns

CIFAR = (1, 3, 32, 32)
E = math.exp


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _convs(model, shape) -> int:
    return len(fxrf.analyze(model, shape).convs())


@pytest.fixture(scope="module")
def vgg16():
    torch.manual_seed(0)
    return fxrf.organize_stages(models.vgg16_cifar().eval(), CIFAR, strategy="paper")


# -- Table 3 (CIFAR-10): VGG16-opt and VGG19-opt -------------------------------------------------------------------


# Position gains of CIFAR VGG at alpha 3, uncapped (3DRF^w_k = 2k + 1 for the k-th 3x3 conv of a stage):
# gain(k) = (V_k - V_{k-1}) / V_{k-1} * e^(-3 V_{k-1} / V_0), V_k = (2k+1)^2 c_0, V_0 = w_0^2 c_0. Stages (w_0, c_0):
# (32, 3), (16, 64), (8, 128), (4, 256), (2, 512). The fractions (V_k - V_{k-1}) / V_{k-1} are 16/9 (k=2),
# 24/25 (3), 32/49 (4), 40/81 (5), 48/121 (6).
def _g(k, w0, c0):
    prev, cur = (2 * k - 1) ** 2 * c0, (2 * k + 1) ** 2 * c0
    return (cur - prev) / prev * E(-3 * prev / (w0 * w0 * c0))


S0, S1, S2, S3, S4 = (32, 3), (16, 64), (8, 128), (4, 256), (2, 512)


def test_vgg16_opt_table3(vgg16):
    """13 convs; the 8 free positions by descending gain: 1.7315 (32 px, k=2), 1.5998 (16, 2), 1.1659 (8, 2),
    0.8922 (32, 3), 0.7162 (16, 3), 0.5657 (32, 4), 0.3895 (32, 5), 0.3678 (16, 4); next would be 0.3289 (4 px, 2).
    So 5,4,2,1,1 (Table 3: 5.10M params, 370 MFLOPs, Delta-3DRF 2.30)."""
    s = vgg16.summary
    assert s["strategy"] == "paper" and s["spatial_cap"] is False
    assert s["convs_per_stage_before"] == [2, 2, 3, 3, 3]
    assert s["stage_convs"] == [5, 4, 2, 1, 1]
    assert s["params_after"] == _params(vgg16.graph_module) == _params(models.vgg16_opt_table3()) == 5_101_194
    assert round(s["params_after"] / 1e4) / 100 == 5.10
    assert round(s["macs_after"] / 1e7) * 10 == 370
    added = _g(3, *S0) + _g(4, *S0) + _g(5, *S0) + _g(3, *S1) + _g(4, *S1)  # 2.9314
    removed = _g(3, *S2) + _g(2, *S3) + _g(3, *S3) + _g(2, *S4) + _g(3, *S4)  # 0.2974 + 0.3289 + 0.0088 + 0.0021 + 0
    assert added - removed == pytest.approx(2.2942, abs=1e-4)  # the hand sum, to check the formula above
    assert s["delta_3drf"] == pytest.approx(added - removed, abs=1e-4)
    assert abs(s["delta_3drf"] - 2.30) <= 0.01  # Table 3


def test_vgg19_opt_table3():
    """16 convs: the 8 positions of VGG16 plus 0.3289 (4 px, k=2), 0.2974 (8 px, 3), 0.2783 (32 px, 6) ->
    6,4,3,2,1 = 8,089,674 params (Table 3: 8.09M, 490 MFLOPs, Delta-3DRF 3.13)."""
    r = fxrf.organize_stages(models.vgg19_cifar(), CIFAR, strategy="paper")
    s = r.summary
    assert s["stage_convs"] == [6, 4, 3, 2, 1]
    assert s["params_after"] == _params(models.vgg_cifar((6, 4, 3, 2, 1))) == 8_089_674
    assert round(s["params_after"] / 1e4) / 100 == 8.09
    assert abs(s["macs_after"] / 1e6 - 490) <= 0.02 * 490  # 483.1M
    # removed: 8 px k=4 (9x9x128 over 7x7x128), 4 px k=3, 4 (7x7 and 9x9 of 256), 2 px k=2, 3, 4
    added = sum(_g(k, *S0) for k in (3, 4, 5, 6)) + _g(3, *S1) + _g(4, *S1)
    removed = _g(4, *S2) + _g(3, *S3) + _g(4, *S3) + sum(_g(k, *S4) for k in (2, 3, 4))
    assert s["delta_3drf"] == pytest.approx(added - removed, abs=1e-4)  # 3.2097 - 0.0767 = 3.1330
    assert abs(s["delta_3drf"] - 3.13) <= 0.01


def test_changes_agree_with_the_analyses(vgg16):
    """Each removed conv's gain is its gain in the input model, each inserted conv's its gain in the result
    (both uncapped); the total of the changes is the summary's Delta-3DRF."""
    before = fxrf.analyze(models.vgg16_cifar(), CIFAR, spatial_cap=False)
    after = fxrf.analyze(vgg16.graph_module, CIFAR, spatial_cap=False)
    assert after.spatial_cap is False
    for c in vgg16.changes:
        a = before if c.kind == "remove" else after
        assert a.record(c.node).gain == pytest.approx(c.gain, rel=1e-12)
    assert [c.node for c in vgg16.changes if c.kind == "remove"] == [
        "features_40", "features_37", "features_30", "features_20", "features_27"]
    delta = sum(c.gain if c.kind == "insert" else -c.gain for c in vgg16.changes)
    assert vgg16.summary["delta_3drf"] == pytest.approx(delta, abs=1e-4)
    assert json.loads(json.dumps(vgg16.to_dict()))["summary"]["stage_convs"] == [5, 4, 2, 1, 1]


# -- the definition of Delta-3DRF on a model small enough to do by hand ------------------------------------------


def _two_stages():
    """Stage 0: 8x8, c_0 = 2, two 3x3 convs; stage 1 (after a 2x2 max pool): 4x4, c_0 = 4, four 3x3 convs."""
    def conv(i, o):
        return nn.Conv2d(i, o, 3, padding=1)

    return nn.Sequential(conv(2, 4), nn.ReLU(), conv(4, 4), nn.ReLU(), nn.MaxPool2d(2),
                         *[m for _ in range(4) for m in (conv(4, 4), nn.ReLU())])


# By hand, alpha = 3, gain = (V_k - V_{k-1}) / V_{k-1} * e^(-3 V_{k-1} / V_0):
# stage 0, V_0 = 8*8*2 = 128, fields 3x3x2 = 18, 5x5x2 = 50, 7x7x2 = 98, 9x9x2 = 162:
#   k=2: 32/18 e^(-54/128) = 1.16590;  k=3: 48/50 e^(-150/128) = 0.297394;  k=4: 64/98 e^(-294/128) = 0.065680
# stage 1, V_0 = 4*4*4 = 64, uncapped fields 3x3x4 = 36, 5x5x4 = 100, 7x7x4 = 196, 9x9x4 = 324:
#   k=2: 64/36 e^(-108/64) = 0.32886;  k=3: 96/100 e^(-300/64) = 0.0088413;  k=4: 128/196 e^(-588/64) = 0.0000668
# The paper rule keeps 6 convs, at least one per stage; the free positions by gain: 1.16590 (0, k=2),
# 0.32886 (1, k=2), 0.297394 (0, k=3), 0.065680 (0, k=4), then 0.0088413 (1, k=3), 0.0000668 (1, k=4).
# So stage 0 gets k=3 and k=4, stage 1 loses k=3 and k=4: layout 4,2 and
# Delta-3DRF = 0.297394 + 0.065680 - 0.0088413 - 0.0000668 = 0.354166.
HAND = {"s0": [32 / 18 * E(-54 / 128), 48 / 50 * E(-150 / 128), 64 / 98 * E(-294 / 128)],
        "s1": [64 / 36 * E(-108 / 64), 96 / 100 * E(-300 / 64), 128 / 196 * E(-588 / 64)]}


def test_delta_3drf_definition_by_hand():
    # no MACs budget: a 3x3 conv on the 8x8 map costs 4x what one on the 4x4 map saves (the default is 1.25x)
    r = fxrf.organize_stages(_two_stages(), (1, 2, 8, 8), strategy="paper", macs_budget=None)
    s = r.summary
    assert s["convs_per_stage_before"] == [2, 4] and s["stage_convs"] == [4, 2]
    assert s["convs_before"] == s["convs_after"] == 6
    ins = sorted(c.gain for c in r.changes if c.kind == "insert")
    rem = sorted(c.gain for c in r.changes if c.kind == "remove")
    assert ins == pytest.approx(sorted(HAND["s0"][1:]), rel=1e-9)
    assert rem == pytest.approx(sorted(HAND["s1"][1:]), rel=1e-9)
    assert s["delta_3drf"] == pytest.approx(0.354166, abs=1e-4)  # the summary rounds to 4 decimals
    assert HAND["s0"][1] + HAND["s0"][2] - HAND["s1"][1] - HAND["s1"][2] == pytest.approx(0.354166, abs=1e-6)


def test_delta_3drf_of_the_greedy_strategy_by_hand():
    """Greedy, defaults (capped field, threshold 0.3): stage 1 is saturated from k=2 on: 4x4x4 = V_0, capped
    gains 28/36 e^(-108/64) = 0.14387, then 0, 0, all <= 0.3, so k=4, k=3, k=2 go; stage 0's next conv (0.2974)
    is <= 0.3, so nothing comes in. Delta-3DRF = -(0 + 0 + 0.14387)."""
    r = fxrf.organize_stages(_two_stages(), (1, 2, 8, 8))
    assert r.summary["strategy"] == "greedy" and r.summary["spatial_cap"] is True
    assert r.summary["stage_convs"] == [2, 1]
    assert r.summary["delta_3drf"] == pytest.approx(-28 / 36 * E(-108 / 64), abs=1e-4)


# -- the total number of convs never changes ----------------------------------------------------------------------


def _bottleneck_net():
    """A stem, two torchvision Bottleneck stages (residual adds, a strided projection), a head."""
    from torchvision.models.resnet import Bottleneck
    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         Bottleneck(16, 4), Bottleneck(16, 4), Bottleneck(16, 8, stride=2, downsample=down),
                         Bottleneck(32, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.mark.parametrize("build, shape", [
    (models.vgg11_cifar, CIFAR),
    (_bottleneck_net, (1, 3, 16, 16)),
    (lambda: models.mobilenet_v1(num_classes=10), (1, 3, 16, 16)),
], ids=["vgg11", "bottlenecks", "mobilenet"])
def test_paper_keeps_the_number_of_convs(build, shape):
    model = build()
    n = _convs(model, shape)
    r = fxrf.organize_stages(model, shape, strategy="paper", macs_budget=None)
    assert r.summary["convs_before"] == r.summary["convs_after"] == n == _convs(r.graph_module, shape)
    assert r.summary["inserted"] == r.summary["removed"] > 0  # it did swap
    assert all(x >= 1 for x, y in zip(r.summary["stage_convs"], r.summary["convs_per_stage_before"]) if y)
    with torch.no_grad():  # still a runnable model of the same output shape
        x = torch.randn(shape)
        assert r.graph_module.eval()(x).shape == model.eval()(x).shape


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_cnns())
def test_paper_keeps_the_number_of_convs_random_cnns(case):
    model, shape = case
    assume_runnable(model, shape)
    n = _convs(model, shape)
    r = fxrf.organize_stages(model, shape, strategy="paper", macs_budget=None, max_insertions=4)
    assert r.summary["convs_after"] == n == _convs(r.graph_module, shape)
    assert r.summary["inserted"] == r.summary["removed"]


def test_budgets_hold_and_bad_strategy():
    r = fxrf.organize_stages(models.vgg16_cifar(), CIFAR, strategy="paper", macs_budget=1.1)
    assert r.summary["macs_after"] <= 1.1 * r.summary["macs_before"]
    assert r.summary["convs_after"] == 13
    assert total(fxrf.analyze(r.graph_module, CIFAR).costs).macs == r.summary["macs_after"]
    with pytest.raises(fxrf.InputError, match="strategy must be one of 'greedy', 'paper'"):
        fxrf.organize_stages(models.vgg11_cifar(), CIFAR, strategy="best")


def test_cli_strategy_paper(tmp_path, capsys):
    from fxrf.cli import main
    out = tmp_path / "o.pt"
    rc = main(["optimize", "fxrf:vgg16_cifar", "--input", "1,3,32,32", "--stages", "--strategy", "paper",
               "--out", str(out), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out.split("\nwrote ")[0])["stages"]["summary"]
    assert doc["stage_convs"] == [5, 4, 2, 1, 1] and abs(doc["delta_3drf"] - 2.30) <= 0.01
    rc = main(["optimize", "fxrf:vgg16_cifar", "--input", "1,3,32,32", "--stages", "--strategy", "paper",
               "--threshold", "0.3", "--out", str(out)])
    assert rc == 2
    assert "threshold only works with strategy='greedy'" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, named", [
    (dict(threshold=0.5), "threshold only works"),
    (dict(remove_below=0.0), "remove_below only works"),
    (dict(remove_saturated=False), "remove_saturated=False only works"),
    (dict(threshold=0.3, remove_below=0.1), "threshold, remove_below only work"),
])
def test_paper_refuses_greedy_only_options(kwargs, named):
    """The library refuses what has no meaning for the paper strategy (it keeps the conv count and compares gains
    with each other), as the CLI does for --threshold / --remove-below / --keep-saturated; nothing is traced."""
    with pytest.raises(fxrf.InputError, match=f"^{named} with strategy='greedy'"):
        fxrf.organize_stages(nn.Sequential(nn.Conv2d(3, 3, 3)), (1, 3, 8, 8), strategy="paper", **kwargs)


def test_paper_accepts_the_greedy_defaults_spelled_out():
    """None (the defaults) and remove_saturated=True are not options given: the paper strategy runs."""
    r = fxrf.organize_stages(_two_stages(), (1, 2, 8, 8), strategy="paper", macs_budget=None, threshold=None,
                             remove_below=None, remove_saturated=True)
    assert r.summary["strategy"] == "paper" and r.summary["threshold"] is None
