"""Records carry the module path users know (state_dict keys, torchinfo); lookup by either name."""
import pytest
import torch.nn as nn
import torchvision

import fxrf


def test_module_paths_on_records_and_lookup_by_path():
    model = torchvision.models.resnet18()
    a = fxrf.analyze(model, (1, 3, 64, 64))
    r = a.record("layer1.0.conv1")  # a leaf module: its call_module node
    assert r.name == "layer1_0_conv1" and r.path == "layer1.0.conv1" and r.kernel == "standard"
    assert a.record("layer1_0_conv1") is r
    # every conv's path is a real module of the model, the one whose weight state_dict names
    convs = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert {c.path for c in a.convs()} == convs
    # a functional op inside a block belongs to that block: the residual add of layer1.0
    add = next(x for x in a.records if x.name == "add")
    assert add.path == "layer1.0"
    assert a.get("no.such.module") is None
    with pytest.raises(KeyError, match="no node or module named 'no.such.module'.*modules: conv1, bn1"):
        a.record("no.such.module")


def test_traced_through_subclassed_convs_get_their_module_path():
    """torchvision's video nets subclass nn.Conv3d, so fx traces into them: the conv3d call keeps the path."""
    model = torchvision.models.video.r3d_18()
    a = fxrf.analyze(model, (1, 3, 4, 32, 32))
    r = a.record("layer1.0.conv1.0")
    assert r.op == "conv3d" and r.kernel == "standard" and r.name != r.path
    convs = {name for name, m in model.named_modules() if isinstance(m, nn.Conv3d)}
    assert {c.path for c in a.convs()} == convs
