"""Bad input gets an error that names the node, the op and what to do."""
import pytest
import torch
import torch.nn as nn
import torchvision

import fxrf


def test_not_a_module():
    with pytest.raises(fxrf.InputError, match="torch.nn.Module objects, got function: pass the model instance"):
        fxrf.analyze(torchvision.models.resnet18, (1, 3, 64, 64))  # the builder, not a model
    with pytest.raises(fxrf.InputError, match="got type"):
        fxrf.analyze(nn.Conv2d, (1, 3, 64, 64))  # the class, not an instance
    with pytest.raises(fxrf.InputError, match="example input must be a tensor or a shape"):
        fxrf.analyze(nn.Conv2d(3, 3, 3), "1,3,8,8")


def test_wrong_rank():
    with pytest.raises(fxrf.InputError, match=r"conv1.*batched 4-D input \(N, C, H, W\).*shape \(3, 64, 64\)"):
        fxrf.analyze(torchvision.models.resnet18(), (3, 64, 64))


def test_wrong_channels():
    with pytest.raises(fxrf.InputError, match="conv1.*expects 3 input channels but gets 1.*pass an example input"):
        fxrf.analyze(torchvision.models.resnet18(), torch.zeros(1, 1, 64, 64))


def test_too_small():
    with pytest.raises(fxrf.InputError, match="too small"):
        fxrf.analyze(nn.Sequential(nn.Conv2d(3, 4, 5)), (1, 3, 3, 3))


def test_wrong_input_size_for_classifier():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    with pytest.raises(fxrf.InputError, match=r"Linear\(3600, 10\).*gets 15376 features"):  # 4 * 62 * 62
        fxrf.analyze(m, (1, 3, 64, 64))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()

    def forward(self, x):
        return self.gate(x)


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: symbolic tracing cannot follow it
            return x
        return -x


def test_untraceable_model():
    with pytest.raises(fxrf.TraceError, match=r"in submodule 'gate' \(.*Gate\).*leaf_modules.*concrete_args"):
        fxrf.analyze(DataDependent(), (1, 3, 8, 8))


def test_leaf_that_cannot_run_on_meta_says_so():
    with pytest.raises(fxrf.AnalysisError, match=r"output shape of call_module 'gate'.*meta.*@fxrf.op\(\.\.\., shape=\.\.\.\)"):
        fxrf.analyze(DataDependent(), (1, 3, 8, 8), leaf_modules=[Gate])


class Scale(nn.Module):
    def forward(self, x):
        return x * 2


def test_custom_leaf_is_conservative_and_listed():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Scale())
    a = fxrf.analyze(m, (1, 3, 8, 8), leaf_modules=[Scale])
    assert [n for n, _, _ in a.unsupported] == ["_1"]
    assert a.to_dict()["unsupported"][0]["reason"] == "no rule"


class Custom(nn.Module):
    def forward(self, x):
        return x


def test_strict_unsupported_op():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3))
    fxrf.analyze(m, (1, 3, 8, 8), strict=True)  # Upsample has a rule
    m2 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.PixelShuffle(2), nn.Hardshrink())
    with pytest.raises(fxrf.UnsupportedOpError, match=r"call_module '2' \(nn.Hardshrink\).*@fxrf.rf_rule\("
                                                       r"torch.nn.modules.activation.Hardshrink\)"):
        fxrf.analyze(m2, (1, 3, 8, 8), strict=True)


def test_unknown_op_is_conservative_and_listed():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Hardshrink(), nn.Conv2d(4, 4, 1))
    a = fxrf.analyze(m, (1, 3, 8, 8))
    assert a.unsupported == [("_1", "1 (Hardshrink)", "no rule")]
    # conservative: the unknown op may mix every channel over the whole map
    r = a.record("_1")
    assert r.rf.channel == 3 and r.rf.height == 8 and not r.supported


def test_registering_a_rule_twice_raises():
    from fxrf.rules import rf_rule
    with pytest.raises(fxrf.DuplicateRuleError, match=r"nn\.modules\.conv\.Conv2d already has the op 'conv'"):
        rf_rule(nn.Conv2d)(lambda ctx: None)
