"""Models symbolic_trace cannot read are analysed through torch.export, exactly (benchmarks/coverage.py sweeps more).

Each model is built with random weights from a small config (nothing is downloaded). timm and transformers are
optional: a test that needs one is skipped when it is not installed (only the import is guarded).
"""
import pytest
import torch
import torch.nn as nn
import torchvision

import fxrf
from oracle import compare


def _hf_resnet():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                       layer_type="basic", num_labels=4)
    return transformers.ResNetForImageClassification(config).eval()


class Logits(nn.Module):
    """The logits of a Hugging Face model (its forward returns a ModelOutput; the oracle differentiates a tensor)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def _records(a):
    return {r.path: (r.rf, r.gain, r.kernel, r.shape) for r in a.convs()}


@pytest.mark.slow  # two exports and an autograd sweep: ~30 s on a busy core
def test_hugging_face_resnet_is_read_through_export_and_matches_autograd():
    model, shape = Logits(_hf_resnet()), (1, 3, 32, 32)
    # the oracle's faithful copy swaps nn.MaxPool2d for nn.AvgPool2d (no gradient routed away), which renames the
    # node in an ATen graph (max_pool2d -> avg_pool2d); swap it here first so both graphs have the same node names
    model.model.resnet.embedder.pooler = nn.AvgPool2d(3, 2, 1)
    with pytest.raises(fxrf.TraceError, match="cannot trace"):
        fxrf.trace(model, shape, capture="fx")
    a = fxrf.analyze(model, shape)
    assert a.capture == "export" and not a.unsupported, a.unsupported
    # stem conv, 4 stages of one basic block (2 convs each) and the 1x1 shortcuts where the width or stride changes
    # (stages 1, 2: stride 2 with 8->16 and 16->16 channels; stage 3: 16->16 at stride 2): 1 + 8 + shortcuts
    paths = [r.path for r in a.convs()]
    assert "model.resnet.embedder.embedder.convolution" in paths and len(paths) == len(set(paths))
    assert len(paths) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    problems, checked = compare(model, shape, a)  # autograd on the real model agrees, node by node
    # `hidden_state += residual` is aten.add_ in the ATen graph: the oracle's interpreter keeps the mutated tensor,
    # so what it measures at the block's last batch norm is the sum (the record describes the value before add_)
    mutated = {n.args[0].name for n in a.graph_module.graph.nodes
               if n.op == "call_function" and getattr(n.target, "_opname", "").endswith("_")}
    problems = [p for p in problems if p.split()[0] not in mutated]
    assert not problems and checked >= 10, problems


def _first(out):
    return out.logits if hasattr(out, "logits") else out[0]


def test_hugging_face_model_runs_through_both_passes():
    model, shape = _hf_resnet(), (1, 3, 32, 32)
    a = fxrf.analyze(model, shape)
    assert a.capture == "export"
    x = torch.randn(shape)
    with torch.no_grad():
        want = model(x).logits
        assert torch.equal(a.graph_module(x).logits, want)  # the captured graph keeps the ModelOutput
        org = fxrf.organize_stages(model, shape)
        assert _first(org.graph_module(x)).shape == want.shape
        dec = fxrf.decompose(model, shape, recipe="DW+PW")
        assert dec.changes and _first(dec.graph_module(x)).shape == want.shape


def test_passes_keep_the_model_output_type():
    model, shape = _hf_resnet(), (1, 3, 32, 32)
    x = torch.randn(shape)
    with torch.no_grad():
        want = model(x)
        # remove_saturated=False: insertions only, which are exact (identity convs, pass-through norms)
        org = fxrf.organize_stages(model, shape, remove_saturated=False)
        assert org.changes and all(c.kind == "insert" for c in org.changes)
        got = org.graph_module(x)
        assert type(got) is type(want)
        torch.testing.assert_close(got.logits, want.logits)
        dec = fxrf.decompose(model, shape, recipe="DW+PW")  # transferred weights: close to the model, not equal
        got = dec.graph_module(x)
        assert dec.changes and type(got) is type(want) and got.logits.shape == want.logits.shape


@pytest.mark.slow  # ~25 s on a busy core (torch.export of a transformer hybrid)
def test_timm_mobilevit_is_read_through_export():
    timm = pytest.importorskip("timm")
    model, shape = timm.create_model("mobilevit_xxs", pretrained=False, img_size=64).eval(), (1, 3, 64, 64)
    with pytest.raises(fxrf.TraceError, match="control flow"):
        fxrf.trace(model, shape, capture="fx")
    a = fxrf.analyze(model, shape)
    assert a.capture == "export"
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert len({r.path for r in a.convs()}) == n_convs  # every conv found under its module path
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.allclose(a.graph_module(x), model(x), atol=1e-5)


def test_fx_and_export_agree_per_module_path_on_mobilenet_v3():
    # squeeze-excite gates, hardswish, grouped convs: both captures read it, and must give the same conv records
    model, shape = torchvision.models.mobilenet_v3_small().eval(), (1, 3, 64, 64)
    fx_, ex = fxrf.analyze(model, shape, capture="fx"), fxrf.analyze(model, shape, capture="export")
    assert (fx_.capture, ex.capture) == ("fx", "export")
    assert _records(fx_) == _records(ex)
    assert len(_records(ex)) == sum(isinstance(m, nn.Conv2d) for m in model.modules())  # 52 convs, each by path
    assert [(s.resolution, s.channels) for s in ex.stages] == [(s.resolution, s.channels) for s in fx_.stages]


def test_passes_return_the_models_mode():
    # torch.export's GraphModule is in training mode throughout (its ATen calls carry the mode); the passes' results
    # take the model's mode, module by module, so the norms they insert pass their input through
    model, shape = _hf_resnet(), (1, 3, 32, 32)
    for gm in (fxrf.decompose(model, shape, recipe="DW+PW").graph_module,
               fxrf.organize_stages(model, shape).graph_module):
        assert not gm.training
        assert not [n for n, m in gm.named_modules() if m.training and not list(m.children())]  # every layer
    trained = fxrf.organize_stages(_hf_resnet().train(), (2, 3, 32, 32)).graph_module  # (batch norm: batch > 1)
    assert trained.training and all(m.training for m in trained.modules() if not list(m.children()))


def test_passes_new_containers_take_the_models_mode():
    model, shape = _hf_resnet(), (1, 3, 32, 32)
    for gm in (fxrf.decompose(model, shape, recipe="DW+PW").graph_module,
               fxrf.organize_stages(model, shape).graph_module):
        assert not [n for n, m in gm.named_modules() if m.training]
