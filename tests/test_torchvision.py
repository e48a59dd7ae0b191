"""Every torchvision classification model is analysed at its usual input size, with a record for every conv."""
import pytest

import fxrf
from tv_models import build, classification_models, input_size

FAST = ["resnet18", "mobilenet_v2", "shufflenet_v2_x1_0", "inception_v3", "efficientnet_b0", "convnext_tiny",
        "densenet121", "vit_b_16"]


def _analyse(name):
    model = build(name)
    size = input_size(name, model)
    a = fxrf.analyze(model, (1, 3, size, size))
    convs = [n for n in a.graph_module.graph.nodes if n.op == "call_module"
             and type(a.graph_module.get_submodule(n.target)).__name__.startswith("Conv")]
    records = {r.name: r for r in a.records}
    for n in convs:  # a record, a kernel type and a field for every conv
        r = records[n.name]
        assert r.kernel in ("standard", "pointwise", "depthwise", "grouped")
        assert r.rf is not None and r.input_rf is not None
    return a


def test_there_are_80():
    assert len(classification_models()) == 80


@pytest.mark.parametrize("name", FAST)
def test_torchvision_model(name):
    _analyse(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in classification_models() if n not in FAST])
def test_every_torchvision_model(name):
    _analyse(name)


def test_cnns_need_no_conservative_rule():
    """Only the transformers' attention ops fall back to the conservative rule; CNNs are followed exactly."""
    for name in ["resnet50", "mobilenet_v3_large", "regnet_y_400mf", "efficientnet_v2_s", "googlenet"]:
        assert _analyse(name).unsupported == [], name
