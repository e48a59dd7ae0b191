"""The command line: exit codes and messages (one line, no traceback), JSON output, the options of issue 12
(--version, --model-arg, timm:NAME, --depth/--width, --dry-run, did-you-mean). Saving, loading, --weights and
include/exclude end to end: tests/test_workflow.py."""
import json
import os
import subprocess
import sys

import pytest

import fxrf
from fxrf.cli import main

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny_cnn.py")


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_analyze_file_factory_table(capsys):
    code, out, err = run(["analyze", f"{EXAMPLE}:make", "--input", "1,3,32,32"], capsys)
    assert code == 0 and err == ""
    assert "stage 1" in out and "16x16" in out and "depthwise" in out


def test_analyze_torchvision_json_and_out(tmp_path, capsys):
    path = tmp_path / "r.json"
    code, out, _ = run(["analyze", "torchvision:resnet18", "--input", "1,3,64,64", "--json", "--out", str(path)],
                       capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc == json.loads(path.read_text())
    assert doc["model"] == "torchvision:resnet18" and doc["input_shape"] == [1, 3, 64, 64]
    assert sum(1 for n in doc["nodes"] if n["kernel"]) == 20


def test_analyze_module_factory(capsys):
    code, out, _ = run(["analyze", "fxrf.models:vgg11_cifar", "--input", "1,3,32,32"], capsys)
    assert code == 0 and "stage 4" in out and "2x2" in out


@pytest.mark.parametrize("argv, message", [
    (["analyze", "torchvision:resnet5", "--input", "1,3,64,64"], "unknown torchvision model 'resnet5'"),
    (["analyze", "fxrf:nope", "--input", "1,3,32,32"], "unknown fxrf model 'nope'"),
    (["analyze", "nofile.py:make", "--input", "1,3,32,32"], "no such file"),
    (["analyze", "torchvision:resnet18", "--input", "1,3,x"], "--input must be comma-separated"),
    (["analyze", "torchvision:resnet18"], "required: --input"),
    (["analyze", "torchvision:resnet18", "--input", "1,4,64,64"], "expects 3 input channels but gets 4"),
    (["analyze", "resnet18", "--input", "1,3,64,64"], "MODEL must look like"),
    ([], "a command is required"),
    # issue 12: each user error it names, and the other options' bad values
    (["analyze", "fxrf:vgg16", "--input", "1,3,32,32"], "did you mean torchvision:vgg16, fxrf:vgg16_cifar, fxrf:vgg16_cifar100"),
    (["analyze", "torchvision:vgg16_cifar", "--input", "1,3,32,32"], "did you mean fxrf:vgg16_cifar"),
    (["analyze", "fxrf:resnet18", "--input", "1,3,32,32"], "did you mean torchvision:resnet18"),
    (["analyze", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--graph", "x.svg"], "--graph x.svg: use a .dot"),
    (["analyze", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--alpha", "-1"], "argument --alpha: must be a finite"),
    (["analyze", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--alpha", "nan"], "argument --alpha: must be a finite"),
    (["analyze", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--alpha", "inf"], "argument --alpha: must be a finite"),
    (["analyze", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--depth", "0"], "argument --depth: must be a whole"),
    (["analyze", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--model-arg", "100"], "--model-arg must look like"),
    (["analyze", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--model-arg", "colour=1"],
     "building 'fxrf:vgg11_cifar' failed: TypeError"),
    (["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--kernels", "DW+XX", "--dry-run"],
     "--kernels DW+XX: unknown recipe 'DW+XX'; use auto, "),
    (["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--stages"], "say where to write the result"),
    (["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--stages", "--out", "o.tflite"],
     "--out o.tflite: use a .pt"),
    (["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--stages", "--dry-run", "--emit-source", "o.txt"],
     "--emit-source o.txt: use a .py"),
    (["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--stages", "--dry-run", "--alpha", "-1"],
     "argument --alpha: must be a finite"),
    (["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--stages", "--dry-run", "--strategy", "paper",
      "--threshold", "0.5"], "threshold only works with strategy='greedy'"),
    (["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--stages", "--dry-run", "--weights", "nope.pt"],
     "--weights: no such file: nope.pt"),
    (["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--stages", "--dry-run", "--include", "layer9*"],
     "include pattern 'layer9*' matches no conv of the model; its conv paths are features.0, features.4"),
    (["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--kernels", "DW+PW", "--dry-run", "--exclude", "x"],
     "exclude pattern 'x' matches no conv"),
    (["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--stages", "--dry-run", "--seed", "one"],
     "argument --seed: must be a whole number"),
])
def test_usage_errors_exit_2_with_one_line(argv, message, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_alpha_zero_is_what_the_library_computes(capsys):
    """The CLI accepts what fxrf.analyze accepts (alpha >= 0; alpha 0 drops the exponential of the gain) and
    reports the same records as the library."""
    code, out, err = run(["analyze", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--alpha", "0", "--json"], capsys)
    assert code == 0, err
    import fxrf
    from fxrf.models import vgg11_cifar
    lib = fxrf.analyze(vgg11_cifar(), (1, 3, 32, 32), alpha=0).to_dict()
    assert json.loads(out)["nodes"] == json.loads(json.dumps(lib["nodes"], default=str))


def test_weights_that_do_not_fit_exit_2(tmp_path, capsys):
    import torch
    path = tmp_path / "w.pt"
    torch.save({"features.0.weight": torch.zeros(1, 1, 1, 1)}, path)  # a wrong shape for vgg11_cifar's first conv
    code, _, err = run(["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--stages", "--dry-run", "--weights",
                        str(path)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "does not fit the model: size mismatch for features.0.weight" in err
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)  # fits, but the rest is missing
    code, _, err = run(["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--stages", "--dry-run", "--weights",
                        str(path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "missing keys (e.g. features.0.bias)" in err
    torch.save(torch.nn.Conv2d(1, 1, 1), path)  # a pickled module: refused by the default torch.load
    code, _, err = run(["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--stages", "--dry-run", "--weights",
                        str(path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "is not a state_dict torch.load reads with weights_only=True" in err


def test_an_unexpected_failure_is_one_line_exit_1(capsys, monkeypatch):
    # a bug inside fxrf (or a model that breaks an unguarded path): one line naming it, exit 1, no traceback
    import fxrf.analysis

    def broken(*args, **kwargs):
        raise KeyError("stage_of")

    monkeypatch.setattr(fxrf.analysis, "analyze", broken)
    code, _, err = run(["analyze", "fxrf:vgg11_cifar", "--input", "1,3,32,32"], capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("fxrf: internal error: KeyError: 'stage_of' (FXRF_TRACEBACK=1 shows the traceback")
    monkeypatch.setenv("FXRF_TRACEBACK", "1")
    with pytest.raises(KeyError, match="stage_of"):
        main(["analyze", "fxrf:vgg11_cifar", "--input", "1,3,32,32"])


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"fxrf {fxrf.__version__} (torch ") and out.count("\n") == 1


def test_model_args_reach_the_constructor(capsys):
    # vgg11_cifar(num_classes=100): the head has 100 outputs; the JSON shows it
    code, out, _ = run(["analyze", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--json", "--model-arg",
                        "num_classes=100"], capsys)
    assert code == 0
    assert json.loads(out)["nodes"][-1]["shape"] == [1, 100]


def test_torchvision_segmentation_model_builds_without_downloads(capsys):
    # fcn_resnet50 defaults to ImageNet backbone weights (a download); the CLI asks for none
    code, out, err = run(["analyze", "torchvision:fcn_resnet50", "--input", "1,3,64,64", "--json",
                          "--model-arg", "num_classes=5", "--model-arg", "aux_loss=False"], capsys)
    assert code == 0, err
    assert json.loads(out)["nodes"][-1]["shape"] == [1, 5, 64, 64]


def test_timm_models(capsys):
    timm = pytest.importorskip("timm")  # the optional `timm` extra
    code, out, err = run(["analyze", "timm:resnet18", "--input", "1,3,64,64", "--json", "--model-arg",
                          "num_classes=7"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    n_params = sum(p.numel() for p in timm.create_model("resnet18", num_classes=7).parameters())
    assert doc["cost"]["total"]["params"] == n_params and doc["nodes"][-1]["shape"] == [1, 7]
    code, _, err = run(["analyze", "timm:resnet1", "--input", "1,3,64,64"], capsys)
    assert code == 2 and "did you mean timm:resnet10" in err and err.count("\n") == 1


def test_depth_groups_rows_by_module_path(capsys):
    code, out, _ = run(["analyze", "torchvision:resnet18", "--input", "1,3,64,64", "--depth", "1", "--width", "120"],
                       capsys)
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1]
            and line.split()[0] in ("conv1", "layer1", "layer2", "layer3", "layer4", "fc")}
    assert set(rows) == {"conv1", "layer1", "layer2", "layer3", "layer4", "fc"}
    # layer1: two BasicBlocks of two 3x3 convs at 64 channels, 16x16 (64 / 4); layer2..4 also hold a downsample conv
    assert rows["layer1"][1:4] == ["4", "convs", "64x16x16"] and rows["layer2"][1:4] == ["5", "convs", "128x8x8"]
    import fxrf
    import torchvision
    a = fxrf.analyze(torchvision.models.resnet18(), (1, 3, 64, 64))
    layer1 = sum(p.numel() for p in torchvision.models.resnet18().layer1.parameters())  # convs and norms
    from fxrf.report import si
    assert rows["layer1"][-2] == si(layer1)
    assert len([r for r in a.convs() if r.path.startswith("layer1.")]) == 4


def test_width_follows_the_terminal(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")  # what shutil.get_terminal_size reads first
    code, out, _ = run(["analyze", "torchvision:resnet18", "--input", "1,3,64,64"], capsys)
    assert code == 0 and max(len(line) for line in out.splitlines()) <= 60
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run(["analyze", "torchvision:resnet18", "--input", "1,3,64,64"], capsys)
    assert code == 0 and max(len(line) for line in out.splitlines()) > 80


def test_help_and_version_do_not_import_torch(tmp_path):
    # The CLI module on its own (in a package whose __init__ is empty, so the API's eager imports do not count):
    # --help and --version must not import torch, fxrf's analysis or torchvision.
    import shutil
    pkg = tmp_path / "probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("__version__ = '0'\n")
    root = os.path.join(os.path.dirname(__file__), "..", "fxrf")
    for name in ("cli.py", "errors.py", "metric.py", "sources.py", "progress.py"):
        shutil.copy(os.path.join(root, name), pkg / name)
    code = ("import sys, probe.cli\n"
            "for argv in (['--help'], ['--version'], ['optimize', '--help']):\n"
            "    try:\n        probe.cli.main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'numpy', 'networkx') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "usage: fxrf" in r.stdout and "fxrf 0 (torch " in r.stdout  # versions read from the metadata
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_python_dash_m_and_console_script_agree():
    r = subprocess.run([sys.executable, "-m", "fxrf", "analyze", f"{EXAMPLE}:make", "--input", "1,3,32,32",
                        "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stages"][1]["channels"] == 16


def test_analysis_failure_exits_1(capsys, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch.nn as nn\n"
                   "class G(nn.Module):\n"
                   "    def forward(self, x):\n"
                   "        return x if x.sum() > 0 else -x\n"
                   "def make():\n"
                   "    return nn.Sequential(nn.Conv2d(3, 3, 3), G())\n")
    code, _, err = run(["analyze", f"{bad}:make", "--input", "1,3,8,8"], capsys)
    assert code == 1 and "TraceError" in err and "leaf_modules" in err


def test_several_inputs(tmp_path, capsys):
    """--input once per input of forward: the CLI reads the model the library reads given a tuple of shapes."""
    (tmp_path / "two.py").write_text(
        "import torch.nn as nn\n\n\nclass Two(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(5, 8, 3, padding=1)\n"
        "        self.c = nn.Conv2d(8, 8, 3, padding=1)\n\n    def forward(self, x, y):\n"
        "        return self.c(self.a(x) + self.b(y))\n\n\ndef make():\n    return Two()\n")
    code, out, err = run(["analyze", f"{tmp_path / 'two.py'}:make", "--input", "1,3,16,16", "--input", "1,5,16,16",
                          "--json"], capsys)
    assert code == 0, err
    convs = {n["name"]: n for n in json.loads(out)["nodes"] if n.get("kernel")}
    # by hand: c sees 5x5 of both inputs' channels, 3 + 5 = 8 of the stage input's channels
    assert (convs["c"]["rf"]["height"], convs["c"]["rf"]["width"], convs["c"]["rf"]["channel"]) == (5, 5, 8)
    code, out, err = run(["optimize", f"{tmp_path / 'two.py'}:make", "--input", "1,3,16,16", "--input",
                          "1,5,16,16", "--kernels", "DW+PW", "--goal", "paper", "--dry-run"], capsys)
    assert code == 0 and "replace c by DW+PW" in out, err
