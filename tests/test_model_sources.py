"""The model a command builds: `file.py:fn` and `pkg.mod:fn` sources imported as `python file.py` / `python -m`
would (the console script included), and `--weights` read without running pickled code (torch.load with
weights_only=True, or safetensors), wrapper dicts accepted when unambiguous.

Oracles: the console script run in a fresh process from a temporary folder, its JSON conv count checked against
the convs written in the model by hand; a sentinel folder that pickled code would create; the checkpoint's own
tensors for the loaded weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fxrf.cli import UsageError, load_weights, main
from fxrf.errors import FxrfError

FXRF = str(Path(sys.executable).with_name("fxrf"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def fxrf_cli(args, cwd, env=ENV):
    return subprocess.run([FXRF, *args], capture_output=True, text=True, env=env, cwd=cwd)


def conv_count(stdout: str) -> int:
    return sum(1 for n in json.loads(stdout)["nodes"] if n["kernel"])


DATACLASS_MODEL = textwrap.dedent("""\
    from __future__ import annotations

    from dataclasses import dataclass

    import torch.nn as nn


    @dataclass
    class Config:
        width: int = 8
        depth: int = 2


    def make(cfg: Config | None = None) -> nn.Module:
        cfg = cfg or Config()
        layers = [nn.Conv2d(3, cfg.width, 3, padding=1)]
        layers += [nn.Conv2d(cfg.width, cfg.width, 3, padding=1) for _ in range(cfg.depth - 1)]
        return nn.Sequential(*layers)
    """)


def test_a_file_with_future_annotations_and_a_dataclass_loads(tmp_path):
    # @dataclass looks its module up in sys.modules while the class is made (string annotations): the module must
    # be registered before it runs, as `import` does
    (tmp_path / "cfgnet.py").write_text(DATACLASS_MODEL)
    r = fxrf_cli(["analyze", "cfgnet.py:make", "--input", "1,3,8,8", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert conv_count(r.stdout) == 2  # Config().depth = 2 convs


def test_a_file_imports_its_sibling_module_from_any_folder(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "models" / "blocks.py").write_text(textwrap.dedent("""\
        import torch.nn as nn


        def cbr(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())
        """))
    (tmp_path / "models" / "net.py").write_text(textwrap.dedent("""\
        import torch.nn as nn
        from blocks import cbr  # a sibling module, as `python models/net.py` finds it


        def make():
            return nn.Sequential(cbr(3, 8), cbr(8, 8), cbr(8, 16))
        """))
    r = fxrf_cli(["analyze", "../models/net.py:make", "--input", "1,3,8,8", "--json"], tmp_path / "elsewhere")
    assert r.returncode == 0, r.stderr
    assert conv_count(r.stdout) == 3  # three cbr blocks, one conv each


def test_a_module_source_is_found_in_the_current_folder(tmp_path):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "nets.py").write_text(textwrap.dedent("""\
        import torch.nn as nn


        def make():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
        """))
    r = fxrf_cli(["analyze", "mypkg.nets:make", "--input", "1,3,8,8", "--json"], tmp_path)  # as `python -m` would
    assert r.returncode == 0, r.stderr
    assert conv_count(r.stdout) == 2


@pytest.mark.parametrize("text, spec, says", [
    ("def make(:\n", "broken.py:make", "importing broken.py failed: SyntaxError"),
    ("import torch\nraise RuntimeError('no GPU here')\n", "broken.py:make",
     "importing broken.py failed: RuntimeError: no GPU here"),
    ("x = undefined_name\n", "brokenmod:make", "importing module 'brokenmod' failed: NameError"),
    ("import not_a_package_anywhere\n", "brokenmod:make", "cannot import module 'brokenmod': No module named"),
])
def test_a_source_that_fails_to_import_is_one_line_exit_2(text, spec, says, tmp_path, capsys, monkeypatch):
    (tmp_path / ("broken.py" if spec.startswith("broken.py") else "brokenmod.py")).write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the cwd the import adds goes away with the test
    code = main(["analyze", spec, "--input", "1,3,8,8"])
    err = capsys.readouterr().err
    assert code == 2 and says in err
    assert err.count("\n") == 1 and "Traceback" not in err


# -- --weights ----------------------------------------------------------------------------------------------------


class Evil:
    """Pickled code: unpickling it creates a folder (the sentinel)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_weights_never_run_pickled_code_even_when_torch_is_told_to(tmp_path):
    sentinel = tmp_path / "pwned"
    torch.save({"features.0.weight": torch.zeros(1), "payload": Evil(str(sentinel))}, tmp_path / "evil.pt")
    env = {**ENV, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    control = subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1])",
                              str(tmp_path / "evil.pt")], capture_output=True, text=True, env=env)
    assert sentinel.is_dir(), control.stderr  # the variable does make a default torch.load run the payload
    sentinel.rmdir()
    r = fxrf_cli(["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--stages", "--dry-run", "--weights",
                  "evil.pt"], tmp_path, env=env)
    assert not sentinel.exists()
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "is not a state_dict torch.load reads with weights_only=True" in r.stderr


def small():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_weights_in_a_wrapper_dict_load_when_unambiguous(tmp_path):
    torch.manual_seed(1)
    sd = small().state_dict()
    torch.save({"epoch": 7, "model_state": sd, "optimizer": {"lr": 0.1}}, tmp_path / "ck.pt")
    model = small()
    load_weights(model, str(tmp_path / "ck.pt"))
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    torch.save({"epoch": 7, "weights": sd}, tmp_path / "odd.pt")
    with pytest.raises(UsageError, match=r"holds a dict with keys epoch, weights: not a state_dict .* nor one under "
                                        r"state_dict, model, model_state, model_state_dict"):
        load_weights(small(), str(tmp_path / "odd.pt"))
    torch.save({"state_dict": sd, "model": small().state_dict()}, tmp_path / "two.pt")
    with pytest.raises(UsageError, match=r"holds several state_dicts \(state_dict, model\)"):
        load_weights(small(), str(tmp_path / "two.pt"))


def test_weights_from_safetensors_and_out_as_safetensors(tmp_path, capsys):
    safetensors = pytest.importorskip("safetensors.torch", reason="the safetensors package is missing")
    (tmp_path / "smallnet.py").write_text("import torch.nn as nn\n\n\ndef make():\n    return nn.Sequential("
                                          "nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))\n")
    torch.manual_seed(1)
    sd = small().state_dict()
    safetensors.save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    model = small()
    load_weights(model, str(tmp_path / "w.safetensors"))
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    # end to end: nothing is decomposed (a 1x1 conv and the first conv stay), so the written weights are the
    # checkpoint's own
    code = main(["optimize", str(tmp_path / "smallnet.py") + ":make", "--input", "1,3,8,8", "--kernels", "DW+PW", "--goal", "paper",
                 "--weights", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "out" / "o.safetensors")])
    assert code == 0, capsys.readouterr().err
    written = safetensors.load_file(str(tmp_path / "out" / "o.safetensors"))
    assert written.keys() == sd.keys() and all(torch.equal(written[k], sd[k]) for k in sd)
    assert "load_file(" in capsys.readouterr().out  # the load hint reads safetensors


def test_a_missing_safetensors_package_is_named(tmp_path, monkeypatch):
    import fxrf
    from fxrf.passes.export import save
    gm = fxrf.trace(small(), (1, 3, 8, 8))
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors` raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    (tmp_path / "w.safetensors").write_bytes(b"\0" * 16)
    says = r"reading or writing .safetensors needs the safetensors package: pip install safetensors"
    with pytest.raises(UsageError, match="--weights: " + says):
        load_weights(small(), str(tmp_path / "w.safetensors"))
    with pytest.raises(FxrfError, match=says):
        save(gm, tmp_path / "out" / "o.safetensors")
    assert not (tmp_path / "out" / "o.py").exists()  # nothing put in place
