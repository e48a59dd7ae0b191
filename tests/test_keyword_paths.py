"""Module paths with a part that is a Python keyword (an nn.ModuleDict key "in"): torch.fx would write
`self.d.in(x)`, a SyntaxError; fxrf's graphs write `getattr(self.d, 'in')(x)`."""
import copy

import pytest
import torch
import torch.nn as nn

import fxrf


class KeywordKeys(nn.Module):
    def __init__(self):
        super().__init__()
        self.d = nn.ModuleDict({"in": nn.Conv2d(3, 8, 3, padding=1), "out": nn.Conv2d(8, 8, 3, padding=1)})

    def forward(self, x):
        return self.d["out"](torch.relu(self.d["in"](x)))


SHAPE = (1, 3, 8, 8)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_analyze_names_keyword_paths(capture):
    a = fxrf.analyze(KeywordKeys(), SHAPE, capture=capture)
    # hand count: one 3x3 conv over all 3 input channels, then another: 3x3x3 and 5x5x3
    assert (a.record("d.in").rf.spatial, a.record("d.in").rf.channel) == ((3, 3), 3)
    assert (a.record("d.out").rf.spatial, a.record("d.out").rf.channel) == ((5, 5), 3)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_organizer_keeps_the_function_and_the_weights(capture):
    torch.manual_seed(0)
    model = KeywordKeys().eval()
    r = fxrf.organize_stages(fxrf.trace(model, SHAPE, capture=capture), SHAPE, remove_saturated=False,
                             macs_budget=None, threshold=0.0, max_insertions=1)
    assert [c.kind for c in r.changes] == ["insert"]  # a graph was rewritten and recompiled
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # an identity conv inserted: the model's own output (torch as the oracle)
        assert torch.allclose(r.graph_module(x), model(x), atol=1e-6)
    assert torch.equal(r.graph_module.get_submodule("d.in").weight, model.d["in"].weight)
    clone = copy.deepcopy(r.graph_module)  # deepcopy regenerates the code
    with torch.no_grad():
        assert torch.equal(clone(x), r.graph_module(x))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_decomposer_replaces_keyword_named_convs(capture):
    model = KeywordKeys().eval()
    r = fxrf.decompose(fxrf.trace(model, SHAPE, capture=capture), SHAPE, recipe="DW+PW", skip_first=False)
    assert sorted(c.target for c in r.changes) == ["d.in", "d.out"]
    assert r.graph_module(torch.randn(2, 3, 8, 8)).shape == (2, 8, 8, 8)
    with pytest.raises(AttributeError):  # the model passed in is untouched
        model.d.get_submodule("in.dw")


def test_keyword_safe_paths_leave_other_paths_to_torch():
    import torch.fx.graph as g
    assert g._format_target("self", "d.in.weight") == "getattr(self.d, 'in').weight"
    assert g._format_target("self", "layer1.0.conv1") == 'getattr(self.layer1, "0").conv1'  # torch's own spelling


def test_saved_result_loads_in_a_fresh_process_that_imports_fxrf(tmp_path):
    # torch.load rebuilds a GraphModule's code with torch's own writer: the process must import fxrf first
    import subprocess
    import sys
    model = KeywordKeys().eval()
    r = fxrf.organize_stages(model, SHAPE, remove_saturated=False, macs_budget=None, threshold=0.0,
                             max_insertions=1)
    torch.save(r.graph_module, tmp_path / "r.pt")
    x = torch.randn(2, 3, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "y.pt")
    code = (f"import fxrf, torch; m = torch.load({str(tmp_path / 'r.pt')!r}, weights_only=False); "
            f"x, y = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'y.pt')!r}); "
            f"print(torch.allclose(m(x), y, atol=1e-6))")
    root = __import__("pathlib").Path(__file__).resolve().parents[1]  # this checkout's fxrf
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
