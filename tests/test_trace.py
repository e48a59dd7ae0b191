"""Tracing: shapes from closed-form rules equal a real forward; the user's model is never modified."""
import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torchvision
from hypothesis import HealthCheck, given, settings
from torch.fx.passes.shape_prop import ShapeProp

import fxrf
from random_cnn import random_cnns
from tv_models import build


def _real_shapes(model, x):
    gm = fx.symbolic_trace(model)
    ShapeProp(gm).propagate(x)
    return _shapes(gm)


def _our_shapes(model, shape):
    return _shapes(fxrf.trace(model, shape))


def _shapes(gm):  # constants (get_attr) are left out: ShapeProp does not annotate them
    return {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
            if isinstance(n.meta.get("tensor_meta"), fx.passes.shape_prop.TensorMetadata) and n.op != "get_attr"}


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("mobilenet_v3_small", 64), ("shufflenet_v2_x0_5", 64),
                                        ("googlenet", 64), ("inception_v3", 96), ("convnext_tiny", 64),
                                        ("efficientnet_b0", 64), ("squeezenet1_1", 65), ("densenet121", 64),
                                        ("regnet_y_400mf", 64), ("alexnet", 96), ("maxvit_t", 224)])
def test_shapes_equal_real_forward(name, size):
    model = build(name, device="cpu")
    x = torch.rand(1, 3, size, size)
    assert _our_shapes(model, x.shape) == _real_shapes(model, x)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_cnns())
def test_random_cnn_shapes(case):
    model, shape = case
    try:
        x = torch.rand(shape)
        model(x)
    except RuntimeError:
        return
    assert _our_shapes(model, shape) == _real_shapes(model, x)


def test_meta_device_model_and_no_forward():
    with torch.device("meta"):
        m = torchvision.models.resnet50()
    calls = []
    m.register_forward_hook(lambda *a: calls.append(1))
    a = fxrf.analyze(m, (1, 3, 224, 224))
    assert calls == []  # no real (or meta) forward of the model
    assert len(a.convs()) == 53


def _snapshot(m):
    return ({k: v.clone() for k, v in m.state_dict().items()}, [mm.training for mm in m.modules()],
            {k: dict(getattr(mm, k)) for mm in m.modules() for k in ("_forward_hooks", "_forward_pre_hooks")},
            [type(mm) for mm in m.modules()], str(m))


def test_user_model_untouched():
    m = torchvision.models.resnet18().train()
    m.layer1.register_forward_hook(lambda *a: None)
    before = _snapshot(m)
    fxrf.analyze(m, (1, 3, 64, 64))
    after = _snapshot(m)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


def test_graph_module_is_accepted_and_gives_the_same_records():
    m = torchvision.models.resnet18()
    gm = fxrf.trace(m, (1, 3, 64, 64))
    code = gm.code
    a1, a2 = fxrf.analyze(m, (1, 3, 64, 64)), fxrf.analyze(gm, (1, 3, 64, 64))
    assert [(r.name, r.rf, r.gain) for r in a1.records] == [(r.name, r.rf, r.gain) for r in a2.records]
    assert gm.code == code  # structure untouched
    rec = next(n for n in gm.graph.nodes if n.name == "layer1_0_conv1").meta[fxrf.META_KEY]
    assert isinstance(rec, fxrf.NodeRecord) and rec.kernel == "standard"


def test_records_are_frozen_and_rewritten():
    gm = fxrf.trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (1, 3, 8, 8))
    fxrf.analyze(gm, (1, 3, 8, 8))
    node = next(n for n in gm.graph.nodes if n.name == "_0")
    r1 = node.meta[fxrf.META_KEY]
    with pytest.raises(Exception):
        r1.gain = 0.0
    fxrf.analyze(gm, (1, 3, 16, 16))  # re-running overwrites: nothing stale survives
    assert node.meta[fxrf.META_KEY].shape == (1, 4, 14, 14)
    assert copy.copy(node.meta[fxrf.META_KEY]) is not None


class FunctionalPools(nn.Module):
    def forward(self, x):
        a = torch.nn.functional.max_pool2d(x, 3, 2, 1, 1, True)  # positional dilation and ceil_mode
        b = torch.nn.functional.avg_pool2d(x, 3, 2, 0, True)  # positional ceil_mode
        return a[:, :, :b.shape[2], :b.shape[3]] + b


def test_functional_pool_positional_arguments():
    m = FunctionalPools()
    x = torch.rand(1, 2, 10, 10)
    assert _our_shapes(m, x.shape) == _real_shapes(m, x)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("training", [False, True])
def test_the_graph_module_is_in_the_models_mode(capture, training):
    # fx.GraphModule makes the path containers (layer1, layer1.0) afresh and torch.export's module is in training
    # mode throughout: without care an eval-mode model came back reporting training
    import torchvision
    model = torchvision.models.resnet18().train(training)
    gm = fxrf.trace(model, (2, 3, 32, 32), capture=capture)
    assert {m.training for m in gm.modules()} == {training}
    assert {m.training for m in model.modules()} == {training}  # the model itself untouched
