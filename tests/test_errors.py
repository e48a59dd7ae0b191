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
        fxrf.analyze(DataDependent(), (1, 3, 8, 8), leaf_modules=[Gate], capture="fx")  # auto: export tried too


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


# ---- issue 10: bad inputs get one clear FxrfError line -----------------------------------------------------------


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x, y):
        return self.c(x) + self.c(y)


@pytest.mark.parametrize("alpha,says", [(float("nan"), "finite"), (float("inf"), "finite"), (-1.0, ">= 0"),
                                        ("3", "must be a number")])
def test_bad_alpha(alpha, says):
    m = nn.Sequential(nn.Conv2d(3, 4, 3))
    for call in (lambda: fxrf.analyze(m, (1, 3, 8, 8), alpha=alpha),
                 lambda: fxrf.organize_stages(m, (1, 3, 8, 8), alpha=alpha)):  # decompose takes no alpha
        with pytest.raises(fxrf.InputError, match=f"alpha.*{says}"):
            call()


def test_two_input_model_given_one_input():
    with pytest.raises(fxrf.InputError, match=r"takes 2 inputs \(x, y\) but 1 example input"):
        fxrf.analyze(TwoInputs(), (1, 3, 8, 8))


def test_numpy_int_sizes_are_sizes_and_float_sizes_are_refused():
    import numpy as np
    m = nn.Sequential(nn.Conv2d(3, 4, 3))
    a = fxrf.analyze(m, (np.int64(1), np.int32(3), 8, 8))
    assert a.input_shape == (1, 3, 8, 8)
    with pytest.raises(fxrf.InputError, match=r"not non-negative integers \(8\.0\)"):
        fxrf.analyze(m, (1, 3, 8.0, 8))


@pytest.mark.parametrize("wrap,says", [(torch.jit.script, "the original nn.Module"),
                                       (torch.compile, r"model\._orig_mod"),
                                       (nn.DataParallel, r"model\.module")])
def test_wrapped_models_say_what_to_pass(wrap, says):
    with pytest.raises(fxrf.InputError, match=says):
        fxrf.analyze(wrap(nn.Sequential(nn.Conv2d(3, 4, 3))), (1, 3, 8, 8))


def test_half_model_given_a_shape_takes_its_dtype():
    # the shape walk runs ops without a rule on meta tensors in the model's dtype (before: float32 input, a
    # half weight, and a dtype mismatch)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.PReLU(), nn.Upsample(scale_factor=2)).half()
    gm = fxrf.trace(m, (1, 3, 8, 8))
    assert {n.meta["tensor_meta"].dtype for n in gm.graph.nodes if "tensor_meta" in n.meta} == {torch.float16}


def test_a_failing_rule_is_conservative_or_an_error_under_strict():
    table = fxrf.OpTable()

    @table.rf_rule(nn.Hardshrink)
    def broken(call):
        raise ZeroDivisionError("boom")

    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Hardshrink(), nn.Conv2d(4, 4, 3, padding=1))
    a = fxrf.analyze(m, (1, 3, 8, 8), rules=fxrf.DEFAULT_OPS + table)
    assert a.unsupported == [("_1", "1 (Hardshrink)", "the 'broken' rule failed: ZeroDivisionError: boom")]
    assert a.record("_1").rf.spatial == (8, 8)  # conservative: the whole map
    with pytest.raises(fxrf.AnalysisError, match=r"rule of op 'broken' failed on call_module '1'.*boom"):
        fxrf.analyze(m, (1, 3, 8, 8), rules=fxrf.DEFAULT_OPS + table, strict=True)
