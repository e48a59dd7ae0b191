"""The artefacts a deployer expects (fxrf.passes.export.save, `fxrf optimize --out`): a .pt2 and an .onnx of any
nn.Module with a dynamic batch, checked before they are put in place; load hints that run in a fresh process and
never collide (two results both named opt.pt load side by side).

Oracles: the models run in this process by torch; what the printed hints load in a fresh Python process (torch,
torch.export.load, onnxruntime) on the same inputs, saved with torch.save; the files on disk for the refusals.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

import fxrf
from fxrf.cli import main
from fxrf.errors import SaveError
from fxrf.passes.export import load_hint, save

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# A fresh process runs each job's hint as printed (an .onnx hint's call, in its comment, with x bound to the input as a
# numpy array) on each of its inputs and saves what comes out: the output's type, its tensor leaves in order, and the
# module the loaded model's class lives in.
FRESH = r"""
import re, sys, torch
from torch.utils._pytree import tree_flatten
jobs = torch.load(sys.argv[1], weights_only=True)
results = []
for job in jobs:
    runs = []
    for xs in job["inputs"]:
        scope = {}
        exec(job["hint"], scope)
        if "sess" in scope:  # the call the .onnx hint shows in its comment
            call = job["hint"].split("#", 1)[1].split(" with ")[0].strip()
            scope.update({k: v.numpy() for k, v in zip(["x"] + [f"x{i}" for i in range(1, len(xs))], xs)})
            exec(call, scope)
            runs.append({"type": "list", "leaves": [torch.from_numpy(y) for y in scope["outputs"]], "module": ""})
        else:
            with torch.no_grad():
                y = scope["model"](*xs)
            runs.append({"type": f"{type(y).__module__}.{type(y).__qualname__}", "leaves": tree_flatten(y)[0],
                         "module": type(scope["model"]).__module__})
    results.append(runs)
torch.save(results, sys.argv[2])
"""


def fresh(jobs, tmp_path) -> list:
    """Run `jobs` ([{"hint": line, "inputs": [tuple of tensors, ...]}]) in one new Python process."""
    torch.save(jobs, tmp_path / "jobs.pt")
    r = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "jobs.pt"), str(tmp_path / "results.pt")],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(tmp_path / "results.pt", weights_only=True)


def leaves(model, xs) -> list:
    """The model's tensor outputs on `xs`, in eval mode, flattened in pytree order."""
    model.eval()
    with torch.no_grad():
        return [t for t in tree_flatten(model(*xs))[0] if isinstance(t, torch.Tensor)]


def assert_leaves(got, want, rtol=1e-5, atol=1e-6):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol * (1 + float(w.abs().max())))


def cnn(width=8, classes=4):
    torch.manual_seed(width)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2 * width, classes)).eval()


class TwoHeads(nn.Module):
    """Returns a dict (a tensor and a tuple of tensors): ONNX gets its tensor leaves, named by their keys."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.body = cnn(6, 5)

    def forward(self, x):
        return {"logits": self.body(x), "extra": (x.mean((2, 3)), x.amax((1, 2, 3)))}


class BatchOne(nn.Module):
    """Runs at batch 1 only: it flattens the batch dimension away."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(0))


class SmallBatches(nn.Module):
    """Runs at any batch but branches on it: torch.export cannot keep its batch dynamic."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y if x.shape[0] <= 4 else -y


MODEL_FILE = """import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, {width}, 3, padding=1)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d({pool}), nn.Flatten(), nn.Linear({features}, 3))

    def forward(self, x):
        return self.head(self.conv(x))


def make():
    return Net()
"""


def _file_model(path, **fmt):
    """Write a model file and build it as `fxrf optimize` does with --seed 0."""
    path.write_text(MODEL_FILE.format(**fmt))
    spec = importlib.util.spec_from_file_location(f"_t_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    return mod.make().eval()


def _hints(stdout: str) -> list:
    return [line[len("load it with: "):] for line in stdout.splitlines() if line.startswith("load it with: ")]


def test_two_opt_pt_from_two_folders_load_side_by_side_in_one_fresh_process(tmp_path, capsys):
    # two different models, both class Net, both written as opt.py + opt.pt; `--kernels DW+PW` never decomposes a
    # model's first conv, so each result computes what its model computes
    models = {"a": _file_model(tmp_path / "neta.py", width=4, pool=1, features=4),
              "b": _file_model(tmp_path / "netb.py", width=6, pool=2, features=24)}
    hints = {}
    for k in models:
        code = main(["optimize", str(tmp_path / f"net{k}.py:make"), "--input", "1,3,12,12", "--kernels", "DW+PW",
                     "--goal", "paper", "--form", "graph",
                     "--out", str(tmp_path / k / "opt.pt")])
        out = capsys.readouterr().out
        assert code == 0
        (hints[k],) = _hints(out)
        assert "sys.path" not in hints[k] and "\n" not in hints[k]
    assert sorted(os.listdir(tmp_path / "a")) == ["opt.pt", "opt.py"]
    xs = {k: (torch.randn(2, 3, 12, 12),) for k in models}
    got = fresh([{"hint": hints[k], "inputs": [xs[k]]} for k in models], tmp_path)
    for (k, model), (run,) in zip(models.items(), got):
        assert_leaves(run["leaves"], leaves(model, xs[k]))
    assert got[0][0]["module"] != got[1][0]["module"]  # two modules, neither shadowing the other


def test_pt2_of_a_plain_module_has_a_dynamic_batch(tmp_path):
    model = cnn()
    paths = save(model, tmp_path / "m.pt2", example_input=(1, 3, 16, 16))  # an nn.Module, not a GraphModule
    assert list(paths) == [str(tmp_path / "m.pt2")] and paths.notes == ()
    hint = load_hint(paths, "Sequential")
    assert hint == f'import torch; model = torch.export.load("{tmp_path / "m.pt2"}").module()'
    inputs = [(torch.randn(1, 3, 16, 16),), (torch.randn(5, 3, 16, 16),)]
    (runs,) = fresh([{"hint": hint, "inputs": inputs}], tmp_path)
    for xs, run in zip(inputs, runs):
        assert_leaves(run["leaves"], leaves(model, xs))


def test_pt2_and_onnx_of_a_dict_model_in_a_fresh_process(tmp_path):
    model = TwoHeads().eval()
    pt2 = save(model, tmp_path / "two.pt2", example_input=(2, 3, 16, 16))
    onnx_paths = save(model, tmp_path / "two.onnx", example_input=(2, 3, 16, 16))
    assert pt2.notes == () and onnx_paths.notes == ()
    onnx_hint = load_hint(onnx_paths, "TwoHeads")
    assert onnx_hint.startswith(f'import onnxruntime as ort; sess = ort.InferenceSession("{tmp_path / "two.onnx"}")')
    assert "(batch, 3, 16, 16)" in onnx_hint and "outputs: [logits, extra_0, extra_1]" in onnx_hint
    inputs = [(torch.randn(2, 3, 16, 16),), (torch.randn(3, 3, 16, 16),)]
    runs_pt2, runs_onnx = fresh([{"hint": load_hint(pt2, "TwoHeads"), "inputs": inputs},
                                 {"hint": onnx_hint, "inputs": inputs}], tmp_path)
    for xs, a, b in zip(inputs, runs_pt2, runs_onnx):
        want = leaves(model, xs)
        assert a["type"] == "builtins.dict"
        assert_leaves(a["leaves"], want)
        assert_leaves(b["leaves"], want, rtol=1e-4, atol=1e-5)  # another runtime's kernels


@pytest.mark.parametrize("model, why", [(SmallBatches, "torch.export: Constraints violated (batch)"),
                                         (BatchOne, "the model does not run at batch 3: ")])
def test_a_model_fixed_to_its_batch_is_saved_with_a_note(tmp_path, model, why):
    torch.manual_seed(0)
    model = model().eval()
    x = torch.randn(1, 3, 8, 8)
    for ext in (".pt2", ".onnx"):
        path = str(tmp_path / f"one{ext}")
        paths = save(model, path, example_input=x)
        (note,) = paths.notes
        assert note.startswith(f"{path}: the batch is fixed at 1 ({why}") and "\n" not in note
    program = torch.export.load(str(tmp_path / "one.pt2")).module()
    torch.testing.assert_close(program(x), model(x))
    with pytest.raises(Exception):  # the fixed batch is enforced, not silently wrong
        program(torch.randn(3, 3, 8, 8))
    hint = load_hint([tmp_path / "one.onnx"], "M")
    assert "(1, 3, 8, 8)" in hint  # the ONNX graph's input is fixed too


class Noisy(nn.Module):
    """Draws random numbers in forward: no written program can reproduce its outputs."""

    def forward(self, x):
        return x + torch.rand_like(x)


@pytest.mark.parametrize("name", ["noisy.pt2", "noisy.onnx"])
def test_a_program_that_does_not_reproduce_the_model_is_not_written(tmp_path, name):
    with pytest.raises(SaveError, match=rf"reloading .*{re.escape(name)} \(batch 1\) does not reproduce the model"):
        save(Noisy(), tmp_path / name, example_input=(1, 3, 4, 4))
    assert os.listdir(tmp_path) == []  # nothing in place, no staging folder left


def test_source_formats_need_a_graph_module(tmp_path):
    with pytest.raises(SaveError, match="writing source needs a torch.fx GraphModule"):
        save(cnn(), tmp_path / "m.pt", example_input=(1, 3, 8, 8))
    with pytest.raises(SaveError, match="writing source needs a torch.fx GraphModule"):
        save(cnn(), tmp_path / "m.pt2", source=tmp_path / "m.py", example_input=(1, 3, 8, 8))
    assert os.listdir(tmp_path) == []


def test_onnx_refuses_to_replace_a_file_it_did_not_write(tmp_path):
    (tmp_path / "theirs.onnx").write_bytes(b"not fxrf's")
    with pytest.raises(SaveError, match="theirs.onnx exists and was not written by fxrf"):
        save(cnn(), tmp_path / "theirs.onnx", example_input=(1, 3, 8, 8))
    assert (tmp_path / "theirs.onnx").read_bytes() == b"not fxrf's"
    save(cnn(), tmp_path / "ours.onnx", example_input=(1, 3, 8, 8))
    save(cnn(), tmp_path / "ours.onnx", example_input=(1, 3, 8, 8))  # fxrf's own: replaced without asking


def test_missing_onnx_packages_name_the_extra(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(SaveError, match=r"needs onnxruntime: pip install 'fxrf\[onnx\]'"):
        save(cnn(), tmp_path / "m.onnx", example_input=(1, 3, 8, 8))
    code = main(["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--stages", "--out", str(tmp_path / "m.onnx")])
    assert code == 2 and "needs onnxruntime: pip install 'fxrf[onnx]'" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_cli_writes_one_of_each_kind_and_prints_a_hint_for_each(tmp_path, capsys):
    model = _file_model(tmp_path / "netc.py", width=5, pool=1, features=5)
    outs = [str(tmp_path / "o" / f"opt{ext}") for ext in (".onnx", ".pt2", ".pt")]
    code = main(["optimize", str(tmp_path / "netc.py:make"), "--input", "1,3,12,12", "--kernels", "DW+PW",
                 "--goal", "paper", "--form", "graph",
                 *[a for o in outs for a in ("--out", o)]])
    out = capsys.readouterr().out
    assert code == 0
    assert sorted(os.listdir(tmp_path / "o")) == ["opt.onnx", "opt.pt", "opt.pt2", "opt.py"]
    hints = _hints(out)  # in the order written: the source + state_dict, the program, the ONNX model
    assert [h.split(";")[0] for h in hints] == ["import importlib.util as iu, sys, torch", "import torch",
                                                "import onnxruntime as ort"]
    inputs = [(torch.randn(1, 3, 12, 12),), (torch.randn(4, 3, 12, 12),)]
    got = fresh([{"hint": h, "inputs": inputs} for h in hints], tmp_path)
    for runs, tol in zip(got, ((1e-5, 1e-6), (1e-5, 1e-6), (1e-4, 1e-5))):
        for xs, run in zip(inputs, runs):
            assert_leaves(run["leaves"], leaves(model, xs), *tol)


@pytest.mark.parametrize("outs, message", [
    (["a.onnx", "b.onnx"], "--out takes at most one .pt (or .safetensors), one .pt2 and one .onnx file"),
    (["a.pt", "b.safetensors"], "--out takes at most one .pt (or .safetensors), one .pt2 and one .onnx file"),
    (["a.tflite"], "--out a.tflite: use a .pt (source + state_dict"),
])
def test_cli_refuses_outs_it_cannot_write(outs, message, capsys):
    code = main(["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--stages",
                 *[a for o in outs for a in ("--out", o)]])
    assert code == 2 and message in capsys.readouterr().err


def test_hugging_face_model_pt2_and_onnx_load_in_a_fresh_process(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification
    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                      num_labels=3)).eval()
    pt2 = save(model, tmp_path / "hf.pt2", example_input=(1, 3, 32, 32))
    onnx_paths = save(model, tmp_path / "hf.onnx", example_input=(1, 3, 32, 32))
    assert pt2.notes == () and onnx_paths.notes == ()
    hint = load_hint(pt2, "ResNetForImageClassification")
    assert hint.startswith("import torch; import transformers.modeling_outputs; ")  # registers the output type
    inputs = [(torch.randn(1, 3, 32, 32),), (torch.randn(3, 3, 32, 32),)]
    runs_pt2, runs_onnx = fresh([{"hint": hint, "inputs": inputs},
                                 {"hint": load_hint(onnx_paths, "x"), "inputs": inputs}], tmp_path)
    for xs, a, b in zip(inputs, runs_pt2, runs_onnx):
        want = leaves(model, xs)
        assert a["type"] == "transformers.modeling_outputs.ImageClassifierOutputWithNoAttention"
        assert_leaves(a["leaves"], want)
        assert_leaves(b["leaves"], want, rtol=1e-4, atol=1e-5)


def test_traced_graph_module_keeps_its_pt_behaviour_and_pt2_batch(tmp_path):
    model = cnn()
    gm = fxrf.trace(model, (1, 3, 16, 16))
    paths = save(gm, tmp_path / "g.pt2", example_input=(1, 3, 16, 16))
    assert paths.notes == ()  # an fx-traced graph does not bake in its batch
    program = torch.export.load(str(tmp_path / "g.pt2")).module()
    x = torch.randn(6, 3, 16, 16)
    torch.testing.assert_close(program(x), leaves(model, (x,))[0])
