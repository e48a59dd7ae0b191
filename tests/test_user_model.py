"""The result handed back as the user's own class (passes/user_model.py): module surgery on a copy, the structure
plan, `fxrf.apply`. The oracle is the emitted GraphModule the passes built (itself checked elsewhere): the user's
class, changed by surgery, must compute what it computes; a fresh model with the plan applied and the weights
loaded must compute the same again; the user's model is never touched."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fxrf
from fxrf.errors import InputError
from random_cnn import random_cnns


def _eval_out(model, x):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for m, t in modes:
            m.training = t


def _leaves(out):
    from torch.utils._pytree import tree_flatten
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _same(a, b, tol=1e-4):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb) and la
    for u, v in zip(la, lb):
        assert u.shape == v.shape
        assert torch.allclose(u, v, rtol=tol, atol=tol * (1 + float(u.abs().max())))


def _check_module_form(model, shape, r):
    """Everything the module form promises, against the graph form and a fresh model."""
    assert type(r.model) is type(model) and r.plan is not None and r.form_why is None
    x = torch.randn(2, *shape[1:])
    _same(_eval_out(r.graph_module, x), _eval_out(r.model, x))
    from fxrf.passes.user_model import dumps_plan
    plan = json.loads(dumps_plan(r.plan))  # what is written to disk
    assert plan == json.loads(json.dumps(r.plan))
    fresh = fxrf.apply(copy.deepcopy(model), plan)
    fresh.load_state_dict(r.model.state_dict())
    _same(_eval_out(r.model, x), _eval_out(fresh, x))


RECIPES = st.sampled_from(["DW+PW", "DW+GPW-g4", "DW+RPW-g4-o50", "GC+shuffle-g4", "auto"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_cnns(), RECIPES, st.booleans())
def test_random_cnns_come_back_as_their_own_class_computing_what_the_graph_computes(case, recipe, stages):
    model, shape = case
    try:
        model(torch.rand(shape))
    except RuntimeError:  # the random net pooled its map away
        assume(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    r = fxrf.optimize(model, shape, kernels=recipe, stages=stages or None)
    assert {k: v for k, v in model.state_dict().items()}.keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())  # the user's model untouched
    if r.form == "module":
        _check_module_form(model, shape, r)
    else:  # the graph form, and a one-line reason naming what was not local
        assert r.model is r.graph_module and r.plan is None
        assert isinstance(r.form_why, str) and r.form_why and "\n" not in r.form_why


def test_organizer_insertions_and_removals_become_module_surgery_on_resnet18():
    import torchvision
    model = torchvision.models.resnet18(num_classes=10).eval()
    r = fxrf.optimize(model, (1, 3, 64, 64), stages=True)
    ops = sorted({c["op"] for c in r.plan["changes"]})
    # removals (identity), an insertion after the stem's ReLU (append), one inside a block before its last conv
    # (prepend: that ReLU is called twice, the conv it feeds once)
    assert ops == ["append", "identity", "prepend"], r.plan
    _check_module_form(model, (1, 3, 64, 64), r)
    assert isinstance(r.model.layer1[1].conv2, nn.Sequential)  # torchvision's own container path, grown
    assert r.model.fc.out_features == 10


def test_stages_then_kernels_decompose_an_inserted_conv_inside_its_wrapper():
    from fxrf.models import vgg16_cifar
    model = vgg16_cifar().eval()
    r = fxrf.optimize(model, (1, 3, 32, 32), stages=True, kernels="DW+PW")
    assert r.form == "module"
    inserted = [c for c in r.plan["changes"] if c["op"] in ("append", "prepend")]
    assert inserted and any(c["op"] == "replace" and ".stage" in c["path"] for c in r.plan["changes"])
    _check_module_form(model, (1, 3, 32, 32), r)


def test_timm_model_keeps_its_api():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", num_classes=5).eval()
    r = fxrf.optimize(model, (1, 3, 64, 64), kernels="auto")
    assert r.form == "module"
    _check_module_form(model, (1, 3, 64, 64), r)
    x = torch.randn(1, 3, 64, 64)
    feats = r.model.forward_features(x)
    assert feats.shape[1] == model.num_features
    r.model.reset_classifier(3)
    assert r.model(x).shape == (1, 3) and model(x).shape == (1, 5)  # the user's own model unchanged
    assert r.model.pretrained_cfg == model.pretrained_cfg


def test_hugging_face_model_keeps_model_output_and_save_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = transformers.ResNetForImageClassification(cfg).eval()
    r = fxrf.optimize(model, (1, 3, 32, 32), kernels="DW+PW")
    assert r.form == "module", r.form_why
    x = torch.randn(2, 3, 32, 32)
    out = _eval_out(r.model, x)
    assert type(out).__name__ == "ImageClassifierOutputWithNoAttention" and out.logits.shape == (2, 3)
    _same(_eval_out(r.graph_module, x), out)
    r.model.save_pretrained(tmp_path)
    # from_pretrained builds the original structure: the plan, then the saved weights, give the optimized model
    back = fxrf.apply(type(model).from_pretrained(tmp_path), r.plan)
    back.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    assert torch.allclose(_eval_out(back, x).logits, out.logits, atol=1e-5)


def test_a_function_call_between_modules_does_not_stop_block_replacements():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    net = Net().eval()
    r = fxrf.optimize(net, (1, 3, 8, 8), kernels="DW+PW")
    assert r.form == "module"  # the blocks replace modules: local
    _check_module_form(net, (1, 3, 8, 8), r)


def test_an_inserted_function_call_gives_the_graph_form_and_says_why():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 2, 2], num_labels=3)
    model = transformers.ResNetForImageClassification(cfg).eval()
    r = fxrf.optimize(model, (1, 3, 64, 64), stages=True)  # captured by torch.export: ATen relu calls, no modules
    assert [c.kind for c in r.changes] and r.form == "graph" and r.model is r.graph_module
    assert "is a function call (relu.default), not a module" in r.form_why


def test_apply_refuses_a_plan_for_another_class_and_a_missing_path():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    r = fxrf.optimize(net, (1, 3, 8, 8), kernels="DW+PW")
    with pytest.raises(InputError, match="made for torch.nn.modules.container.Sequential"):
        fxrf.apply(nn.ModuleList(), r.plan)
    with pytest.raises(InputError, match="does not have"):
        fxrf.apply(nn.Sequential(nn.Conv2d(3, 8, 3)), r.plan)
    with pytest.raises(InputError, match="not an fxrf structure plan"):
        fxrf.apply(net, {"changes": []})


# -- the command line: what --out writes in each form ----------------------------------------------------------------


def _hints(stdout: str) -> list:
    return [line[len("load it with: "):] for line in stdout.splitlines() if line.startswith("load it with: ")]


def test_cli_writes_the_models_own_class_and_a_fresh_process_loads_it(tmp_path, capsys):
    import subprocess
    import sys

    from fxrf.cli import main
    args = ["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--kernels", "DW+PW", "--goal", "paper",
            "--out", "o.pt", "--out", "o.pt2"]
    import os
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(args) == 0
        out = capsys.readouterr().out
        assert sorted(p.name for p in tmp_path.iterdir()) == ["o.plan.json", "o.pt", "o.pt2"]
        assert "written as VGG itself" in out
        assert main(args) == 0  # again: fxrf wrote both files, so it may replace them without --force
        out = capsys.readouterr().out
    finally:
        os.chdir(cwd)
    module_hint, program_hint = _hints(out)
    # a fresh process: the hint's model is the user's class; it computes what the .pt2 program (the same result,
    # exported by torch.export) computes, at two batch sizes
    code = (f"{module_hint}\n{program_hint.replace('model =', 'program =')}\n"
            "import torch; torch.manual_seed(0)\n"
            "assert type(model).__name__ == 'VGG', type(model)\n"
            "for b in (1, 3):\n"
            "    x = torch.randn(b, 3, 32, 32)\n"
            "    with torch.no_grad(): assert torch.allclose(model(x), program(x), atol=1e-5)\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_cli_form_graph_writes_the_emitted_source(tmp_path, capsys):
    from fxrf.cli import main
    assert main(["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--kernels", "DW+PW", "--goal", "paper",
                 "--form", "graph", "--out", str(tmp_path / "g.pt")]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.pt", "g.py"]
    assert "written as a GraphModule" in out and "asked for" in out


def test_cli_form_module_refused_in_one_line_when_a_change_is_not_local(tmp_path, capsys):
    pytest.importorskip("transformers")
    (tmp_path / "hf.py").write_text(
        "import transformers\n\n\ndef make():\n    return transformers.ResNetForImageClassification(transformers."
        "ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 2, 2], num_labels=3)).eval()\n")
    from fxrf.cli import main
    code = main(["optimize", f"{tmp_path / 'hf.py'}:make", "--input", "1,3,64,64", "--stages", "--form", "module",
                 "--out", str(tmp_path / "o.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "--form module" in err and "not a module" in err and "Traceback" not in err
    assert not (tmp_path / "o.pt").exists()
