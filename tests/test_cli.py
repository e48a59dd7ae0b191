"""The command line: exit codes and messages (one line, no traceback), JSON output."""
import json
import os
import subprocess
import sys

import pytest

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
])
def test_usage_errors_exit_2_with_one_line(argv, message, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


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
