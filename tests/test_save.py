"""Saving a result (fxrf.passes.export.save, `fxrf optimize --out`): what is written reloads in a fresh process
(plain torch, strict load_state_dict) to the same outputs and output type, save checks that itself before putting
files in place, and it never replaces a file fxrf did not write.

Oracles: a reload in a fresh Python process (subprocess), compared with the original nn.Module run by torch (or,
where a pass changed the model, with the in-memory pass result); file bytes before and after for the refusals.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fxrf
from fxrf.errors import SaveError
from fxrf.passes.export import MARKER, emit_source, save

FXRF = str(Path(sys.executable).with_name("fxrf"))  # the console script of this venv
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# A fresh process loads the written class and weights with plain torch (strict load_state_dict) and writes its
# output: {"type": "module.Class", "out": {name: tensor}}.
RELOAD = r"""
import importlib, sys, torch
folder, stem, cls, weights, x_path, out_path = sys.argv[1:]
sys.path.insert(0, folder)
if weights.endswith(".pt2"):
    model = torch.export.load(weights).module()
else:
    model = getattr(importlib.import_module(stem), cls)()
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(weights)
    else:
        sd = torch.load(weights, weights_only=True)
    model.load_state_dict(sd)  # strict: any missing or unexpected key fails the test
    model.eval()
with torch.no_grad():
    y = model(torch.load(x_path, weights_only=True))
flat = dict(y) if isinstance(y, dict) else {"out": y} if isinstance(y, torch.Tensor) else dict(enumerate(y))
torch.save({"type": f"{type(y).__module__}.{type(y).__qualname__}", "out": flat}, out_path)
"""


def reload_fresh(folder, stem, cls, weights, x, tmp_path):
    """(output type name, {name: tensor}) of the saved model reloaded in a new Python process."""
    torch.save(x, tmp_path / "x_in.pt")
    r = subprocess.run([sys.executable, "-c", RELOAD, str(folder), stem, cls, str(weights), str(tmp_path / "x_in.pt"),
                        str(tmp_path / "y_out.pt")], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    got = torch.load(tmp_path / "y_out.pt", weights_only=True)
    return got["type"], got["out"]


class RelativeBias(nn.Module):
    """Two non-persistent buffers, as in an input normalisation and in swin/coatnet/levit attention: a 3-value mean
    (small: written inline) and a 81x81 relative-position index (6561 elements: more than the source takes inline,
    so it travels in the weights file)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.table = nn.Parameter(torch.randn(17 * 17))
        ys, xs = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()  # token i sits at (ys[i], xs[i]) of the 9x9 map
        index = (ys[:, None] - ys[None, :] + 8) * 17 + (xs[:, None] - xs[None, :] + 8)
        self.register_buffer("index", index, persistent=False)

    def forward(self, x):
        t = self.conv(x - self.mean).flatten(2)  # (1, 8, 81)
        attn = torch.softmax(t.transpose(1, 2) @ t + self.table[self.index], dim=-1)  # (1, 81, 81)
        return (attn @ t.transpose(1, 2)).mean(1)


def test_non_persistent_buffers_survive_a_reload_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = RelativeBias().eval()
    assert set(model.state_dict()) == {"conv.weight", "conv.bias", "table"}  # neither buffer is in the state dict
    x = torch.rand(1, 3, 9, 9) + 5.0  # far from 0: a zero or garbage mean changes the output visibly
    gm = fxrf.trace(model, x)
    save(gm, tmp_path / "rel.pt", class_name="Rel", example_input=x)
    kind, out = reload_fresh(tmp_path, "rel", "Rel", tmp_path / "rel.pt", x, tmp_path)
    with torch.no_grad():
        expected = model(x)
    assert kind == "torch.Tensor"
    torch.testing.assert_close(out["out"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["levit_128s", *(pytest.param(n, marks=pytest.mark.slow) for n in (
    "swin_tiny_patch4_window7_224", "coatnet_nano_rw_224", "tiny_vit_5m_224"))])
def test_timm_relative_position_buffers_survive_a_reload(name, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    assert any(m._non_persistent_buffers_set for m in model.modules())  # what this test is about
    x = torch.randn(1, 3, 224, 224)
    save(fxrf.trace(model, x), tmp_path / "net.pt", class_name="Net", example_input=x)
    _, out = reload_fresh(tmp_path, "net", "Net", tmp_path / "net.pt", x, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(out["out"], model(x), rtol=1e-4, atol=1e-5)


def test_optimize_out_keeps_non_persistent_buffers(tmp_path):
    # the console script on a file model: `--kernels DW+PW` leaves its only conv (the first is never decomposed),
    # so the saved result must compute what the model itself computes
    src = Path(__file__).read_text()
    body = src[src.index("class RelativeBias"):src.index("def test_non_persistent")]
    (tmp_path / "relnet.py").write_text("import torch\nimport torch.nn as nn\n\n\n" + body
                                        + "\ndef make():\n    return RelativeBias()\n")
    r = subprocess.run([FXRF, "optimize", "relnet.py:make", "--input", "1,3,9,9", "--kernels", "DW+PW", "--goal",
                        "paper", "--form", "graph", "--out", "out/opt.pt"], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    torch.manual_seed(0)  # what `--seed 0` (the default) builds
    model = RelativeBias().eval()
    x = torch.rand(1, 3, 9, 9) + 5.0
    kind, out = reload_fresh(tmp_path / "out", "opt", "RelativeBias", tmp_path / "out" / "opt.pt", x, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(out["out"], model(x), rtol=1e-5, atol=1e-6)


class Scaled(nn.Module):
    """A leaf whose constructor does not give back its state: the buffer is set after construction."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(1), persistent=False)

    def forward(self, x):
        return x * self.scale


def test_a_save_that_does_not_reload_raises_and_writes_nothing(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Scaled()).eval()
    model[1].scale.fill_(3.0)  # the rebuilt leaf has scale 1: its outputs are a third of the model's
    gm = fxrf.trace(model, (1, 3, 8, 8), leaf_modules=[Scaled])
    with pytest.raises(SaveError, match=r"reloading .*net.pt does not reproduce the model: output 0 differs"):
        save(gm, tmp_path / "net.pt", example_input=(1, 3, 8, 8))
    assert os.listdir(tmp_path) == []  # neither the source nor the weights, nor a staging folder


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight  # one tensor, two names in the state dict

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("make, shape", [(ConvBN, (2, 3, 8, 8)), (Tied, (2, 6))])
def test_export_captured_models_reload_with_a_strict_load_state_dict(make, shape, tmp_path):
    torch.manual_seed(0)
    model = make().eval()
    if isinstance(model, ConvBN):  # running statistics that are not the identity
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    gm = fxrf.trace(model, shape, capture="export")
    save(gm, tmp_path / "m.pt", class_name="M")
    x = torch.randn(shape)
    _, out = reload_fresh(tmp_path, "m", "M", tmp_path / "m.pt", x, tmp_path)  # strict load inside
    with torch.no_grad():
        torch.testing.assert_close(out["out"], model(x), rtol=1e-5, atol=1e-6)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return {"map": y, "score": y.mean((1, 2, 3))}


def test_an_exported_dict_output_stays_a_dict(tmp_path):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    gm = fxrf.trace(model, (1, 3, 8, 8), capture="export")
    save(gm, tmp_path / "heads.pt", class_name="Heads")
    x = torch.randn(1, 3, 8, 8)
    kind, out = reload_fresh(tmp_path, "heads", "Heads", tmp_path / "heads.pt", x, tmp_path)
    assert kind == "builtins.dict" and list(out) == ["map", "score"]
    with torch.no_grad():
        for k, v in model(x).items():
            torch.testing.assert_close(out[k], v, rtol=1e-5, atol=1e-6)


def test_a_hugging_face_result_reloads_as_its_model_output(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                       layer_type="basic", num_labels=4)
    torch.manual_seed(0)
    r = fxrf.decompose(transformers.ResNetForImageClassification(config).eval(), (1, 3, 32, 32), recipe="DW+PW")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = r.graph_module.eval()(x)
    assert type(expected).__name__ == "ImageClassifierOutputWithNoAttention"
    save(r.graph_module, tmp_path / "hf.pt", class_name="HF", example_input=x)
    kind, out = reload_fresh(tmp_path, "hf", "HF", tmp_path / "hf.pt", x, tmp_path)
    assert kind == "transformers.modeling_outputs.ImageClassifierOutputWithNoAttention"
    torch.testing.assert_close(out["logits"], expected.logits, rtol=1e-5, atol=1e-6)


def test_safetensors_out_writes_the_source_and_safetensors_weights(tmp_path):
    pytest.importorskip("safetensors", reason="the safetensors package is missing")
    torch.manual_seed(0)
    model = RelativeBias().eval()
    x = torch.rand(1, 3, 9, 9)
    paths = save(fxrf.trace(model, x), tmp_path / "rel.safetensors", class_name="Rel", example_input=x)
    assert paths == [str(tmp_path / "rel.py"), str(tmp_path / "rel.safetensors")]
    _, out = reload_fresh(tmp_path, "rel", "Rel", tmp_path / "rel.safetensors", x, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(out["out"], model(x), rtol=1e-5, atol=1e-6)
    save(fxrf.trace(model, x), tmp_path / "rel.safetensors", class_name="Rel", example_input=x)  # its own: again


def test_pt2_reloads_and_is_rewritten_but_a_foreign_program_is_not(tmp_path):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    gm = fxrf.trace(model, (1, 3, 8, 8))
    save(gm, tmp_path / "m.pt2", example_input=(1, 3, 8, 8))
    x = torch.randn(1, 3, 8, 8)
    kind, out = reload_fresh(tmp_path, "-", "-", tmp_path / "m.pt2", x, tmp_path)
    assert kind in ("builtins.dict", "torch.fx.immutable_collections.immutable_dict")  # (a dict subclass)
    with torch.no_grad():
        torch.testing.assert_close(out["score"], model(x)["score"], rtol=1e-5, atol=1e-6)
    save(gm, tmp_path / "m.pt2", example_input=(1, 3, 8, 8))  # fxrf's own program: replaced without asking
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "theirs.pt2")
    before = (tmp_path / "theirs.pt2").read_bytes()
    with pytest.raises(SaveError, match="theirs.pt2 exists and was not written by fxrf"):
        save(gm, tmp_path / "theirs.pt2", example_input=(1, 3, 8, 8))
    assert (tmp_path / "theirs.pt2").read_bytes() == before


USER_SOURCE = textwrap.dedent("""\
    import torch.nn as nn


    def make():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))


    def make_wide():  # another factory the user keeps in the same file
        return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    """)


def test_save_never_replaces_a_file_fxrf_did_not_write(tmp_path):
    (tmp_path / "mynet.py").write_text(USER_SOURCE)
    torch.save({"w": torch.ones(2)}, tmp_path / "ckpt.pt")
    ckpt = (tmp_path / "ckpt.pt").read_bytes()
    gm = fxrf.trace(nn.Sequential(nn.Conv2d(3, 8, 3)), (1, 3, 8, 8))
    with pytest.raises(SaveError, match=r"mynet.py exists and was not written by fxrf .* overwrite=True"):
        save(gm, tmp_path / "mynet.pt")
    with pytest.raises(SaveError, match="mynet.py exists and was not written by fxrf"):
        emit_source(gm, tmp_path / "mynet.py")
    with pytest.raises(SaveError, match="ckpt.pt exists and was not written by fxrf"):
        save(gm, tmp_path / "ckpt.pt")  # a checkpoint with no fxrf source beside it
    assert (tmp_path / "mynet.py").read_text() == USER_SOURCE and (tmp_path / "ckpt.pt").read_bytes() == ckpt
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "mynet.py"]  # and nothing else written
    save(gm, tmp_path / "out.pt")  # fxrf's own files, written twice: the second time replaces them
    save(gm, tmp_path / "out.pt")
    assert (tmp_path / "out.py").read_text().startswith(MARKER)
    save(gm, tmp_path / "mynet.pt", overwrite=True)  # said explicitly
    assert (tmp_path / "mynet.py").read_text().startswith(MARKER)


def test_optimize_refuses_to_replace_the_models_source_or_checkpoint(tmp_path):
    (tmp_path / "mynet.py").write_text(USER_SOURCE)
    exec_scope: dict = {}
    exec(USER_SOURCE, exec_scope)  # noqa: S102  (the user's file: its factory, for a fitting checkpoint)
    torch.save(exec_scope["make"]().state_dict(), tmp_path / "mynet_ckpt.pt")
    ckpt = (tmp_path / "mynet_ckpt.pt").read_bytes()
    base = [FXRF, "optimize", "mynet.py:make", "--input", "1,3,16,16", "--kernels", "DW+PW", "--form", "graph"]
    for extra in (["--out", "mynet.pt"], ["--weights", "mynet_ckpt.pt", "--out", "mynet_ckpt.pt"]):
        r = subprocess.run(base + extra, capture_output=True, text=True, env=ENV, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert "exists and was not written by fxrf" in r.stderr and "--force" in r.stderr
    assert (tmp_path / "mynet.py").read_text() == USER_SOURCE
    assert (tmp_path / "mynet_ckpt.pt").read_bytes() == ckpt
    assert sorted(os.listdir(tmp_path)) == ["mynet.py", "mynet_ckpt.pt"]
    r = subprocess.run(base + ["--out", "mynet.pt", "--force"], capture_output=True, text=True, env=ENV,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "mynet.py").read_text().startswith(MARKER)
