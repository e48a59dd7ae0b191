"""The torch.compile backend: outputs equal eager, the report from inside torch.compile equals fxrf.analyze on the
module (convs matched by order: dynamo and symbolic_trace name nodes differently), graph breaks give one analysed
report per graph, options and passes, registration by name, fxrf.compile (fxrf.compiler).

inductor is exercised once, on a small model; elsewhere the inner backend is "eager" or "aot_eager" (the analysis
and the passes run before the inner backend, whichever it is).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torchvision

import fxrf
from fxrf import backend as B
from fxrf import compiler as C
from fxrf.models import vgg_from_cfg

ATOL = 1e-4


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    B.clear_reports()
    yield
    torch._dynamo.reset()


def conv_rows(a):
    """Per conv, in graph order: kernel kind, 3DRF height, width, channels, gain (None: the conv starts a stage)."""
    return [(r.kernel, r.rf.height, r.rf.width, r.rf.channel, None if r.gain is None else round(r.gain, 9))
            for r in a.convs()]


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that a wrong fold or a dropped norm shows in the outputs."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def dw_pw_vgg() -> nn.Module:
    """A small VGG whose convs after the first are depthwise 3x3 + pointwise 1x1 (what DW+PW makes of a VGG)."""

    def dw_pw(c_in, c_out):
        return [nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in), nn.BatchNorm2d(c_in), nn.ReLU(),
                nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), *dw_pw(16, 32),
                         nn.MaxPool2d(2), *dw_pw(32, 32), *dw_pw(32, 64), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def compile_and_run(model, x, **options):
    compiled = torch.compile(model, backend="fxrf", options=options)
    with torch.no_grad():
        return compiled(x), model(x)


def test_resnet18_matches_eager_and_the_module_analysis():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    got, want = compile_and_run(model, x, inner="aot_eager", log_table=False)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    (report,) = B.last_report()
    assert report.graph == 0 and report.graph_break is None and report.error is None
    ref = fxrf.analyze(model, tuple(x.shape))
    assert len(report.analysis.convs()) == 20
    assert conv_rows(report.analysis) == conv_rows(ref)
    assert [s.resolution for s in report.analysis.stages] == [s.resolution for s in ref.stages]
    cost = fxrf.cost.total(ref.costs)
    assert (report.params, report.macs) == (cost.params, cost.macs) == (11_689_512, cost.macs)
    assert report.analysis.unsupported == ref.unsupported == []


def _decomposed_vgg():
    model = randomize_bn(vgg_from_cfg([16, "M", 32, 32, "M", 64, 64, "M", 64, "M", "M"])).eval()
    result = fxrf.decompose(model, (1, 3, 32, 32), recipe="DW+PW")
    assert result.summary["replaced"] == 5
    return result.graph_module.eval()


def test_decomposed_vgg_matches_eager_and_the_module_analysis():
    model = _decomposed_vgg()
    x = torch.randn(2, 3, 32, 32)
    got, want = compile_and_run(model, x, inner="aot_eager")
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    (report,) = B.last_report()
    rows = conv_rows(report.analysis)
    assert rows == conv_rows(fxrf.analyze(model, tuple(x.shape)))
    assert [k for k, *_ in rows] == ["standard"] + ["depthwise", "pointwise"] * 5


def test_inductor_on_a_small_dw_pw_model():
    model = randomize_bn(dw_pw_vgg()).eval()
    x = torch.randn(2, 3, 16, 16)
    got, want = compile_and_run(model, x)  # inner defaults to inductor
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    (report,) = B.last_report()
    assert report.inner == "inductor"
    assert conv_rows(report.analysis) == conv_rows(fxrf.analyze(model, tuple(x.shape)))


class TwoBlocks(nn.Module):
    """Two conv blocks with a graph break between them (print, or torch._dynamo.graph_break())."""

    def __init__(self, brk="print"):
        super().__init__()
        self.brk = brk
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                               nn.Conv2d(16, 16, 3, padding=1, groups=4))

    def forward(self, x):
        x = self.a(x)
        if self.brk == "print":
            print("between the blocks")
        else:
            torch._dynamo.graph_break()
        return self.b(x)


@pytest.mark.parametrize("brk", ["print", "graph_break"])
def test_a_graph_break_gives_two_analysed_reports(brk, capsys):
    model = TwoBlocks(brk).eval()
    x = torch.randn(1, 3, 16, 16)
    got, want = compile_and_run(model, x, inner="eager")
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    first, second = B.last_report()
    assert (first.graph, second.graph) == (0, 1) and first.call == second.call
    assert first.graph_break is not None and "test_backend.py" in first.graph_break
    assert second.graph_break is None and second.frame.startswith("torch_dynamo_resume_in_forward")
    # each graph analysed on its own: the second graph's input starts its stages afresh
    assert conv_rows(first.analysis) == conv_rows(fxrf.analyze(model.a, tuple(x.shape)))
    assert conv_rows(second.analysis) == conv_rows(fxrf.analyze(model.b, (1, 8, 16, 16)))
    assert conv_rows(second.analysis)[-1][:4] == ("grouped", 5, 5, 8)  # 4 of 16 channels, each seeing all 8
    assert first.params + second.params == sum(p.numel() for p in model.parameters())


class Outer(nn.Module):
    """A graph break inside a submodule's forward: dynamo compiles the outer frame, the inner frame, their resumes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.inner = TwoBlocks("graph_break")
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.cat([x[:, :3], x[:, 3:6]], 1)[:, :3] + 0  # 3 channels again, for TwoBlocks
        return self.head(self.inner(x))


def test_nested_graph_breaks_belong_to_one_call_and_a_new_model_starts_another():
    x = torch.randn(1, 3, 16, 16)
    got, want = compile_and_run(Outer().eval(), x, inner="eager")
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    graphs = B.last_report()
    assert len(graphs) >= 3 and [r.graph for r in graphs] == list(range(len(graphs)))
    assert len({r.call for r in graphs}) == 1
    assert sum(len(r.analysis.convs()) for r in graphs) == 6
    compile_and_run(nn.Conv2d(3, 4, 3).eval(), x, inner="eager")
    (other,) = B.last_report()
    assert other.call == graphs[0].call + 1 and len(B.reports()) == len(graphs) + 1


def test_a_recompilation_starts_a_new_call_and_dynamic_shapes_are_analysed():
    model = TwoBlocks("graph_break").eval()
    compiled = torch.compile(model, backend="fxrf", options={"inner": "eager"}, dynamic=True)
    with torch.no_grad():
        compiled(torch.randn(1, 3, 16, 16))
        first = B.last_report()
        y = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(compiled(y), model(y), atol=ATOL, rtol=0)  # the same graphs, other sizes
    assert len(first) == 2 and all(r.analysis is not None for r in first)
    assert conv_rows(first[0].analysis) == conv_rows(fxrf.analyze(model.a, (1, 3, 16, 16)))
    compiled = torch.compile(model, backend="fxrf", options={"inner": "eager"}, dynamic=False)
    with torch.no_grad():
        compiled(torch.randn(1, 3, 8, 8))
    again = B.last_report()
    assert again[0].call > first[-1].call and again[0].analysis.input_shape == (1, 3, 8, 8)


def test_passes_run_in_order_and_the_graph_after_them_is_analysed():
    seen = []

    def drop_relu(gm, example_inputs):  # an inference-safe rewrite of relu(relu(x)) -> relu(x)
        seen.append(("drop_relu", len(example_inputs)))
        for node in list(gm.graph.nodes):
            if node.target is torch.relu and node.args[0].target is torch.relu:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
        gm.recompile()
        return gm

    def count(gm, example_inputs):
        seen.append(("count", sum(n.target is torch.relu for n in gm.graph.nodes)))
        return gm

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.relu(torch.relu(self.c(x)))

    model = M().eval()
    got, want = compile_and_run(model, torch.randn(1, 3, 8, 8), inner="eager", passes=[drop_relu, count])
    torch.testing.assert_close(got, want)
    assert seen == [("drop_relu", 3), ("count", 1)]
    (r,) = B.last_report()
    assert r.passes == ("drop_relu", "count")
    assert len(r.analysis.records) == len(r.after_passes.records) + 1


def test_bad_options_and_bad_passes_fail_with_a_message():
    with pytest.raises(ValueError, match="unknown fxrf backend option.*inner, passes"):
        B.make_backend(innner="eager")
    with pytest.raises(ValueError, match="unknown pass 'nope'"):
        B.make_backend(passes=["nope"])

    def adds_input(gm, example_inputs):
        gm.graph.placeholder("extra")
        return gm

    with pytest.raises(Exception, match="changed the graph's inputs"):
        compile_and_run(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), inner="eager", passes=[adds_input])


def test_report_is_logged_at_info_and_serialisable(caplog):
    with caplog.at_level(logging.INFO, logger="fxrf"):
        compile_and_run(dw_pw_vgg().eval(), torch.randn(1, 3, 16, 16), inner="eager")
    text = caplog.text
    assert "graph 0 (call 0, compile 0/0)" in text and "7 convs in 3 stages" in text and "3DRF" in text
    d = B.last_report()[0].to_dict()
    assert d["graph"] == 0 and len([n for n in d["analysis"]["nodes"] if n["kernel"]]) == 7
    import json
    json.dumps(d)


def test_fake_tensor_metadata_gives_the_same_analysis_and_explain_names_the_break():
    model = TwoBlocks("print").eval()
    x = torch.randn(1, 3, 16, 16)
    e = B.explain(model, x)
    assert e.graph_count == 2 and len(e.break_reasons) == 1 and "test_backend.py" in e.break_reasons[0]
    assert conv_rows(e.analyses[0]) == conv_rows(fxrf.analyze(model.a, tuple(x.shape)))
    assert conv_rows(e.analyses[1]) == conv_rows(fxrf.analyze(model.b, (1, 8, 16, 16)))
    assert "2 graph(s), 1 graph break(s)" in str(e)


def test_compile_model_runs_the_module_passes_then_the_backend():
    model = randomize_bn(vgg_from_cfg([16, "M", 32, 32, "M", 64, 64, "M", 64, "M", "M"])).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = C.compile_model(model, x, kernels="DW+RPW-g4-o50", backend_options={"inner": "eager"}, warmup=True)
    kernels = compiled.fxrf.passes["kernels"]
    assert kernels.summary["replaced"] == 5
    (report,) = compiled.fxrf.reports
    assert report.macs == kernels.summary["macs_after"] < kernels.summary["macs_before"]
    assert conv_rows(report.analysis) == conv_rows(fxrf.analyze(kernels.graph_module, tuple(x.shape)))
    # the default graph pass turned the rotations fold could not remove into slices + cat, fields unchanged
    assert report.passes == ("roll_as_cat",) and kernels.summary["permutations_remaining"] > 0
    assert conv_rows(report.after_passes) == conv_rows(report.analysis)
    assert not any(r.op == "roll" for r in report.after_passes.records)
    assert sum(r.op == "roll" for r in report.analysis.records) == kernels.summary["permutations_remaining"]
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), kernels.graph_module(x), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="backend_options"):
        C.compile_model(model, x, backend="inductor")


def test_compile_model_with_stages_and_kernels():
    model = randomize_bn(vgg_from_cfg([16, "M", 32, "M", 64, "M", 64, "M", "M"])).eval()
    x = torch.randn(1, 3, 32, 32)
    compiled = C.compile_model(model, x, stages={"macs_budget": 2.0}, kernels="DW+PW",
                               backend_options={"inner": "eager"}, warmup=True)
    stages, kernels = compiled.fxrf.passes["stages"], compiled.fxrf.passes["kernels"]
    assert stages.summary["stage_convs"] != stages.summary["convs_per_stage_before"]
    (report,) = compiled.fxrf.reports
    assert conv_rows(report.analysis) == conv_rows(fxrf.analyze(kernels.graph_module, tuple(x.shape)))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), kernels.graph_module(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("shift,dim", [(-8, 1), (3, 1), (16, 1), (5, -1), ((2,), (2,))])
def test_roll_as_cat_is_exact(shift, dim):
    class M(nn.Module):
        def forward(self, x):
            return torch.roll(torch.relu(x), shift, dim) * 2

    x = torch.randn(2, 16, 6, 7)
    got, want = compile_and_run(M(), x, inner="eager", passes=["roll_as_cat"])
    assert torch.equal(got, want)
    (r,) = B.last_report()
    assert not any(n.op == "roll" for n in r.after_passes.records)


def test_registered_by_name_on_import_and_through_the_entry_point():
    from torch._dynamo.backends.registry import lookup_backend
    assert lookup_backend("fxrf") is B.fxrf_backend
    assert "fxrf" in torch._dynamo.list_backends()
    code = textwrap.dedent("""
        import torch, torch.nn as nn
        m = nn.Conv2d(3, 4, 3, padding=1)
        out = torch.compile(m, backend="fxrf", options={"inner": "eager"})(torch.randn(1, 3, 8, 8))
        import fxrf.backend as B
        print(len(B.last_report()), B.last_report()[0].analysis.convs()[0].rf.height)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "3"]


def test_the_split_modules_keep_the_old_names():
    """fxrf.backend still exports what moved to fxrf.dynamo and fxrf.passes.graph_passes (below it); fxrf.compile
    lives in fxrf.compiler alone (above it: re-exporting it from the backend made an import cycle)."""
    import fxrf.dynamo
    import fxrf.passes.graph_passes as G
    assert fxrf.compile is C.compile_model and not hasattr(B, "compile_model")
    assert C.DEFAULT_GRAPH_PASSES == ("roll_as_cat",)
    assert (B.explain, B.Explanation, B.analyze_dynamo_graph) == \
        (fxrf.dynamo.explain, fxrf.dynamo.Explanation, fxrf.dynamo.analyze_dynamo_graph)
    assert (B.roll_as_cat, B.register_pass, B.PASSES) == (G.roll_as_cat, G.register_pass, G.PASSES)
    assert G.PASSES["roll_as_cat"] is G.roll_as_cat
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        B.nope


def test_roll_as_cat_rewrites_a_copy_over_the_callers_parameters():
    """What the backend compiles is the pass's output: it must read the model's own parameters (training updates
    them), and the graph it was given stays as it was."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return torch.roll(self.c(x), 3, 1)

    gm = torch.fx.symbolic_trace(M())
    x = torch.randn(1, 3, 6, 6)
    out = B.roll_as_cat(gm, [x])
    assert out is not gm and out.c is gm.c and out.meta["fxrf_roll_as_cat"] == 1
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.roll]
    assert torch.roll not in [n.target for n in out.graph.nodes]
    with torch.no_grad():
        torch.testing.assert_close(out(x), gm(x), atol=0, rtol=0)
