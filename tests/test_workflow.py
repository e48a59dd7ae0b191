"""From a checkpoint to a saved, reloadable optimized model (issue 12): `fxrf optimize --out` writes what default
`torch.load` / `torch.export.load` read back, with the same outputs as the passes run in-process; `--weights`
feeds the passes deterministically; include/exclude restrict what the passes touch; `--dry-run` writes nothing.

Oracles: the in-process API run (fxrf.organize_stages / fxrf.decompose on the same seeded model) for the saved
files, the checkpoint itself for --weights, and the model's conv paths written out by hand for include/exclude.
"""
from __future__ import annotations

import importlib.util
import io
import os
import sys

import pytest
import torch

import fxrf
from fxrf.cli import main, progress
from fxrf.models import vgg11_cifar

SHAPE = (2, 3, 32, 32)
INPUT = "2,3,32,32"
# vgg11_cifar's convs by module path, stage by stage (32, 16, 8, 4, 2 px): features.0 | 4 | 8 11 | 15 18 | 22 25
CONVS = ["features.0", "features.4", "features.8", "features.11", "features.15", "features.18", "features.22",
         "features.25"]


def cli(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _import(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _api_result(weights=None, seed=0):
    """What the CLI's `optimize --stages --kernels DW+PW` computes, run in-process."""
    torch.manual_seed(seed)
    model = vgg11_cifar()
    if weights is not None:
        model.load_state_dict(torch.load(weights))
    r = fxrf.organize_stages(model, SHAPE)
    return fxrf.decompose(r.graph_module, SHAPE, recipe="DW+PW").graph_module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A "pretrained" checkpoint: vgg11_cifar's random init under seed 1, its state_dict saved as a file."""
    path = tmp_path_factory.mktemp("ckpt") / "vgg11.pt"
    torch.manual_seed(1)
    torch.save(vgg11_cifar().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory, checkpoint):
    """One `fxrf optimize ... --weights CKPT --out opt.pt --out opt.pt2` run: (folder, stdout)."""
    d = tmp_path_factory.mktemp("out")
    out = io.StringIO()
    old = sys.stdout
    sys.stdout = out
    try:
        code = main(["optimize", "fxrf:vgg11_cifar", "--input", INPUT, "--stages", "--kernels", "DW+PW", "--form", "graph",
                     "--weights", str(checkpoint), "--out", str(d / "opt.pt"), "--out", str(d / "opt.pt2")])
    finally:
        sys.stdout = old
    assert code == 0
    return d, out.getvalue()


def test_saved_files_load_with_default_torch_load_and_match_the_api(saved, checkpoint):
    d, stdout = saved
    assert sorted(os.listdir(d)) == ["opt.pt", "opt.pt2", "opt.py"]
    expected = _api_result(weights=checkpoint).eval()
    x = torch.randn(SHAPE)
    # the generated class + its state_dict, read with the default torch.load (weights_only=True since torch 2.6)
    cls = _import(d / "opt.py", "opt_saved").VGG
    model = cls()
    assert not model.load_state_dict(torch.load(d / "opt.pt")).missing_keys
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), expected(x))
        # the torch.export program, exported in eval mode
        program = torch.export.load(str(d / "opt.pt2")).module()
        assert torch.allclose(program(x), expected(x), atol=1e-5, rtol=1e-5)
    # the hint names exactly these files and the class
    hints = [line for line in stdout.splitlines() if line.startswith("load it with: ")]
    assert len(hints) == 2
    assert f'"{d / "opt.py"}"); ' in hints[0]  # the source imported by its path
    assert f'model = mod.VGG(); model.load_state_dict(torch.load("{d / "opt.pt"}")); model.eval()' in hints[0]
    assert f'torch.export.load("{d / "opt.pt2"}").module()' in hints[1]


def test_the_load_hint_runs(saved):
    d, stdout = saved
    hint = next(line for line in stdout.splitlines() if "spec_from_file_location" in line)[len("load it with: "):]
    scope: dict = {}
    exec(hint, scope)  # noqa: S102  (the line a user pastes)
    sys.modules.pop(scope["mod"].__name__)  # the hint registers the source under a name of its own, not `opt`
    sd = torch.load(d / "opt.pt")
    assert all(torch.equal(v, sd[k]) for k, v in scope["model"].state_dict().items())


def test_weights_are_the_checkpoints_and_deterministic(tmp_path, checkpoint, capsys):
    def run(*extra):
        out = tmp_path / f"o{len(os.listdir(tmp_path))}.pt"
        code, _, err = cli(["optimize", "fxrf:vgg11_cifar", "--input", INPUT, "--kernels", "DW+PW", "--goal", "paper", "--form", "graph",
                            "--out", str(out), *extra], capsys)
        assert code == 0, err
        return torch.load(out)

    a = run("--weights", str(checkpoint))
    b = run("--weights", str(checkpoint))
    c = run("--weights", str(checkpoint), "--seed", "7")  # every weight comes from the checkpoint: seed is moot
    plain = run()  # seed 0's random init
    assert a.keys() == b.keys() == c.keys() == plain.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    ckpt = torch.load(checkpoint)
    assert torch.equal(a["features.0.weight"], ckpt["features.0.weight"])  # the first conv is never decomposed
    assert not torch.equal(a["features.0.weight"], plain["features.0.weight"])
    # the decomposed convs start from the checkpoint's weights (the SVD transfer), so they differ too
    block = [k for k in a if k.startswith("features.4.") and k.endswith("weight")]
    assert block and any(not torch.equal(a[k], plain[k]) for k in block)
    again = run()
    assert all(torch.equal(plain[k], again[k]) for k in plain)  # unseeded runs no longer differ


def test_decompose_include_exclude_restrict_the_convs():
    model = vgg11_cifar().eval()
    every = [c.target for c in fxrf.decompose(model, SHAPE, recipe="DW+PW").changes]
    assert every == CONVS[1:]  # skip_first keeps features.0
    only = fxrf.decompose(model, SHAPE, recipe="DW+PW", include=["features.1*"])
    assert [c.target for c in only.changes] == ["features.11", "features.15", "features.18"]
    rest = fxrf.decompose(model, SHAPE, recipe="DW+PW", exclude=["features.1*", "features.22"])
    assert [c.target for c in rest.changes] == ["features.4", "features.8", "features.25"]
    both = fxrf.decompose(model, SHAPE, recipe="DW+PW", include="features", exclude="features.8")  # a prefix
    assert [c.target for c in both.changes] == [p for p in CONVS[1:] if p != "features.8"]
    x = torch.randn(SHAPE)
    kept = dict(rest.graph_module.named_modules())  # the excluded convs are the original modules, weights equal
    for p in ("features.11", "features.15", "features.18", "features.22"):
        assert isinstance(kept[p], torch.nn.Conv2d)
        assert torch.equal(kept[p].weight, model.get_submodule(p).weight)
    assert rest.graph_module(x).shape == (2, 10)
    with pytest.raises(fxrf.InputError, match="include pattern 'layer4' matches no conv"):
        fxrf.decompose(model, SHAPE, recipe="DW+PW", include=["layer4"])


def test_organize_include_exclude_restrict_the_changes():
    model = vgg11_cifar().eval()
    free = fxrf.organize_stages(model, SHAPE)
    assert [(c.kind, c.stage) for c in free.changes] == [("remove", 4), ("remove", 3), ("insert", 0), ("insert", 1)]
    # exclude the saturated last conv: it stays (declined, with the reason), stage 4 gets nothing either
    r = fxrf.organize_stages(model, SHAPE, exclude=["features.25"])
    assert ("remove", "features_25") not in [(c.kind, c.node) for c in r.changes]
    assert any(d.kind == "remove" and d.node == "features_25" and "include/exclude" in d.reason for d in r.declined)
    assert r.summary["stage_convs"][4] == 2
    # include stage 3's convs only: the one removal there, no insertion in stages whose convs are not all included
    r = fxrf.organize_stages(model, SHAPE, include=["features.15", "features.18"])
    assert [(c.kind, c.node) for c in r.changes] == [("remove", "features_18")]
    closed = {d.stage for d in r.declined if d.kind == "insert" and "include/exclude" in d.reason}
    assert closed == {0, 1, 2, 4}
    assert r.summary["selection"] == {"include": ["features.15", "features.18"], "exclude": []}
    # include stage 0's only conv: that stage is open (and its inserted conv counts as the pass's own), the
    # others are closed; the free run's stage-1 insertion and both removals do not happen
    r = fxrf.organize_stages(model, SHAPE, include=["features.0"])
    assert [(c.kind, c.stage) for c in r.changes] == [("insert", 0)]
    assert r.changes[0].gain == free.changes[2].gain
    assert {d.stage for d in r.declined if d.kind == "insert" and "include/exclude" in d.reason} == {1, 2, 3, 4}


def test_organize_paper_strategy_honours_exclude():
    model = vgg11_cifar().eval()
    free = fxrf.organize_stages(model, SHAPE, strategy="paper")
    removed = [c.node for c in free.changes if c.kind == "remove"]
    assert removed  # the paper strategy moves convs on VGG11
    r = fxrf.organize_stages(model, SHAPE, strategy="paper", exclude=[removed[0].replace("_", ".")])
    assert removed[0] not in [c.node for c in r.changes if c.kind == "remove"]
    assert sum(r.summary["stage_convs"]) == sum(free.summary["stage_convs"])  # still a fixed number of convs


def test_dry_run_writes_nothing_and_shows_the_plan(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["optimize", "fxrf:vgg11_cifar", "--input", INPUT, "--stages", "--dry-run"], capsys)
    assert code == 0, err
    assert os.listdir(tmp_path) == []
    assert "planned changes (dry run):" in out and out.rstrip().endswith("dry run: nothing written")
    r = fxrf.organize_stages(vgg11_cifar(), SHAPE)
    counts = [line.split()[2:5] for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert counts == [[str(b), "->", str(a)] for b, a in zip(r.summary["convs_per_stage_before"],
                                                               r.summary["stage_convs"])]
    params = next(line for line in out.splitlines() if line.startswith("params")).split()
    from fxrf.report import si
    assert params[1:3] == [si(r.summary["params_before"]), si(r.summary["params_after"])]
    assert "remove features.25 (stage 4, gain 0)" in out  # changes named by module path


def test_progress_lines_only_for_slow_steps():
    import time
    fast, slow = io.StringIO(), io.StringIO()
    with progress("quick", after=5.0, stream=fast):
        pass
    with progress("slow step", after=0.01, stream=slow):
        time.sleep(0.2)
    assert fast.getvalue() == ""
    lines = slow.getvalue().splitlines()
    assert lines[0] == "fxrf: slow step ..." and lines[1].startswith("fxrf: slow step: done in ")
