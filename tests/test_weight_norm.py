"""Old-style torch.nn.utils.weight_norm (a forward pre-hook, `weight` a plain non-leaf tensor) through both passes:
deepcopy refuses such a tensor; the passes copy it as a value that the hook recomputes."""
import warnings

import pytest
import torch
import torch.nn as nn

import fxrf

SHAPE = (1, 3, 16, 16)


def net():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrizations.weight_norm
        first = nn.utils.weight_norm(nn.Conv2d(3, 8, 3, padding=1))
    return nn.Sequential(first, nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_organizer_insertion_keeps_the_function_and_the_hook(capture):
    model = net()
    r = fxrf.organize_stages(fxrf.trace(model, SHAPE, capture=capture), SHAPE, remove_saturated=False,
                             macs_budget=None)
    assert [c.kind for c in r.changes] == ["insert", "insert"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(r.graph_module(x), model(x))  # identity convs inserted: the model's own output
        r.graph_module.get_parameter("0.weight_g").mul_(2)  # the result's own weight norm, not the model's
        assert not torch.allclose(r.graph_module(x), model(x))
    assert torch.equal(model[0].weight_g, net()[0].weight_g)  # the model passed in is untouched


def test_decomposer_replaces_the_weight_normed_conv_as_its_plain_twin():
    # oracle: torch's own remove_weight_norm gives the plain conv with the same weight; both decompositions must
    # build the same blocks from it
    model, twin = net(), net()
    nn.utils.remove_weight_norm(twin[0])
    r = fxrf.decompose(model, SHAPE, recipe="DW+PW", skip_first=False)
    t = fxrf.decompose(twin, SHAPE, recipe="DW+PW", skip_first=False)
    assert [c.target for c in r.changes] == [c.target for c in t.changes] == ["0", "2"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(r.graph_module(x), t.graph_module(x), atol=1e-6)

