"""fxrf.optimize(measure=N) times eager and compiled (issue 22): the figures reach summary["latency"], the
before/after table and the JSON; goal="speed" decides in the mode deployed; a result slower than its input is
flagged on a line of its own; --goal's default follows what the CLI is asked; progress is one line per long step
when piped and nothing when the library is used quietly; the 3DRF column states its reference; messages carry no
ANSI codes.

No timing value is asserted: where a ratio matters, a fake timer gives it (by model label and mode), and the
expected figures follow from it by hand.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import fxrf
from fxrf import progress
from fxrf.cli import main
from fxrf.optimize_report import before_after, optimize_summary
from fxrf.passes.latency import LatencyModel
from fxrf.sources import first_line, plain

SHAPE = (1, 3, 16, 16)


class ModeClock:
    """A fake timer: whole models by (mode, label) in seconds (1 ms when not listed), blocks 1 ms."""

    def __init__(self, model_s: dict):
        self.model_s = model_s

    def __call__(self, fn, x, probe):
        return self.model_s.get((probe.mode, probe.label), 1e-3) if probe.recipe == "model" else 1e-3


def lm(model_s: dict, mode: str = "compile") -> LatencyModel:
    return LatencyModel("cpu", batch=1, mode=mode, cache=None, timer=ModeClock(model_s))


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()).eval()


# result faster eager (0.5x), slower compiled (1.5x); the second instance 1.01x the model in both modes
MIXED = {("eager", "result"): 0.5e-3, ("compile", "result"): 1.5e-3,
         ("eager", "model (2nd instance)"): 1.01e-3, ("compile", "model (2nd instance)"): 1.01e-3}


def test_both_modes_are_measured_and_reported():
    r = fxrf.optimize(net(), SHAPE, kernels="DW+PW", measure=1, latency=lm(MIXED))
    t = r.summary["latency"]
    assert set(t["modes"]) == {"eager", "compile"} and t["mode"] == "compile" and t["rounds"] == 1
    # by hand from the clock: per mode result/model and |2nd/model - 1|
    assert (t["modes"]["eager"]["result_vs_model"], t["modes"]["compile"]["result_vs_model"]) == (0.5, 1.5)
    assert t["modes"]["eager"]["noise"] == t["modes"]["compile"]["noise"] == 0.01
    assert t["modes"]["compile"]["ms"] == {"model": 1.0, "result": 1.5, "model (2nd instance)": 1.01}
    # the top level is the mode deployed (compiled); only compiled is slower beyond the noise
    assert (t["result_vs_model"], t["kept"], t["slower_modes"]) == (1.5, "result", ["compile"])
    assert r.changes and r.summary["goal"] == "paper"
    text = optimize_summary(r).splitlines()
    rows = {line.split(" (ms)")[0]: line.split()[-3:] for line in text if line.startswith("latency ")
            and "(ms)" in line}
    assert rows == {"latency eager": ["1.000", "0.500", "-50.0%"], "latency compiled": ["1.000", "1.500", "+50.0%"]}
    assert any(line.startswith("latency: on cpu at batch 1, median of 1 round(s)") for line in text)
    flags = [line for line in text if line.startswith("slower than the input:")]
    assert flags == ["slower than the input: compiled 1.500x its time (noise 0.010), on cpu at batch 1 "
                     "(--goal speed / goal='speed' keeps only what is measured faster)"]
    d = before_after(r.before, r.after, t)  # what the CLI's JSON carries
    assert d["latency"]["modes"]["eager"] == {"ms_before": 1.0, "ms_after": 0.5, "ratio": 0.5, "noise": 0.01}


def test_within_the_noise_is_not_flagged():
    clock = {("eager", "result"): 1.02e-3, ("eager", "model (2nd instance)"): 1.05e-3,
             ("compile", "result"): 0.9e-3}
    r = fxrf.optimize(net(), SHAPE, kernels="DW+PW", measure=1, latency=lm(clock))
    assert r.summary["latency"]["slower_modes"] == []  # 1.02 < 1 + 0.05
    assert not any(line.startswith("slower than") for line in optimize_summary(r).splitlines())


def test_speed_decides_in_the_mode_deployed():
    model = net()
    # deployed compiled (the default) and slower there: the model comes back, though eager was faster
    r = fxrf.optimize(model, SHAPE, kernels="DW+PW", goal="speed", measure=1, latency=lm(MIXED))
    t = r.summary["latency"]
    assert t["kept"] == "model" and r.changes == [] and t["slower_modes"] == []
    assert "compiled" in t["why"]
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        assert torch.equal(r.graph_module.eval()(x), model(x))
    text = optimize_summary(r).splitlines()
    assert not any(line.startswith("slower than") for line in text)  # what came back is the input
    rows = [line.split()[-3:] for line in text if line.startswith("latency ") and "(ms)" in line]
    assert rows == [["1.000", "1.000", "+0.0%"]] * 2
    # deployed eager: faster there, so kept, and the compiled slowdown is flagged
    r = fxrf.optimize(model, SHAPE, kernels="DW+PW", goal="speed", measure=1, latency=lm(MIXED, mode="eager"))
    assert r.summary["latency"]["kept"] == "result" and r.changes
    assert [line for line in optimize_summary(r).splitlines() if line.startswith("slower than")] == [
        "slower than the input: compiled 1.500x its time (noise 0.010), on cpu at batch 1"]


class StubLatency:
    """A LatencyModel-like object: whole-model comparisons answer given ratios; no figure is cached."""

    device, batch, key = "cpu", 1, "stub"

    def __init__(self, result_s: dict, mode: str = "compile"):
        self.result_s, self.mode = result_s, mode

    def in_mode(self, mode):
        return StubLatency(self.result_s, mode)

    def time(self, *args, **kwargs):  # the decomposer prices its blocks with the latency model given
        return 1e-3

    def compare(self, models, shape, rounds, fresh=False):
        return {k: (self.result_s[self.mode] if k == "result" else 1e-3,) * rounds for k in models}


def test_a_stub_latency_model_drives_the_decision():
    r = fxrf.optimize(net(), SHAPE, kernels="DW+PW", goal="speed", measure=2,
                      latency=StubLatency({"eager": 2e-3, "compile": 0.8e-3}))
    t = r.summary["latency"]
    assert t["kept"] == "result" and t["slower_modes"] == ["eager"] and t["modes"]["eager"]["result_vs_model"] == 2


@pytest.mark.slow  # compiles three small models: ~40 s on a loaded 2-core machine
def test_a_real_timing_has_the_structure(tmp_path, monkeypatch):
    """One round with the real timer, eager only deployed and compiled too: figures are positive numbers; their
    values are not asserted."""
    monkeypatch.setenv("FXRF_CACHE_DIR", str(tmp_path))
    small = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    r = fxrf.optimize(small, (1, 3, 8, 8), kernels="DW+PW", measure=1, latency=LatencyModel("cpu", 1, "eager"))
    t = r.summary["latency"]
    for m in t["modes"].values():
        assert set(m["ms"]) == {"model", "result", "model (2nd instance)"} and all(v > 0 for v in m["ms"].values())
        assert m["noise"] >= 0 and m["result_vs_model"] > 0 and isinstance(m["slower"], bool)


# ---------------------------------------------------------------------------------------------- the CLI


def _cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def fake_timer(monkeypatch, tmp_path):
    import fxrf.passes.latency as latency
    monkeypatch.setenv("FXRF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(latency, "default_timer", lambda *a, **k: ModeClock(MIXED))


def test_cli_goal_defaults(fake_timer, tmp_path, capsys):
    (tmp_path / "net.py").write_text("import torch.nn as nn\n\n\ndef make():\n    return nn.Sequential("
                                     "nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1))\n")
    base = ["optimize", f"{tmp_path / 'net.py'}:make", "--input", "1,3,16,16", "--dry-run", "--json"]
    code, out, err = _cli(base + ["--kernels", "DW+PW", "--measure", "1"], capsys)
    doc = json.loads(out)
    assert code == 0, err
    # --kernels alone: speed; compiled (deployed) slower, so the model came back
    assert doc["goal"] == "speed" and doc["latency"]["kept"] == "model"
    assert set(doc["before_after"]["latency"]["modes"]) == {"eager", "compile"}
    # --mode eager: deployed eager, so decided eager, where the clock makes the result 0.5x the model: kept
    code, out, err = _cli(base + ["--kernels", "DW+PW", "--measure", "1", "--mode", "eager"], capsys)
    doc = json.loads(out)
    assert code == 0, err
    assert doc["latency"]["mode"] == "eager" and doc["latency"]["kept"] == "result"
    assert doc["latency"]["result_vs_model"] == 0.5
    code, out, err = _cli(base + ["--kernels", "DW+PW", "--measure", "0"], capsys)
    assert code == 0 and json.loads(out)["goal"] == "paper" and json.loads(out)["latency"] is None
    code, out, err = _cli(base + ["--stages", "--kernels", "DW+PW"], capsys)
    assert code == 0 and json.loads(out)["goal"] == "paper" and json.loads(out)["latency"] is None
    code, out, err = _cli(base[:-1] + ["--kernels", "DW+PW", "--goal", "paper", "--measure", "1"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert any(line.startswith("latency eager (ms)") for line in lines)
    assert any(line.startswith("latency compiled (ms)") for line in lines)
    assert sum(line.startswith("slower than the input: compiled 1.500x") for line in lines) == 1


# ---------------------------------------------------------------------------------------------- progress


def test_progress_is_one_line_per_long_step_when_piped(fake_timer, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FXRF_PROGRESS")  # the CLI's own setting: on
    monkeypatch.setattr(progress, "AFTER", 0.0)  # every step counts as long
    code, out, err = _cli(["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--stages", "--kernels", "auto",
                           "--objective", "latency", "--verify", "0", "--goal", "paper", "--measure", "1",
                           "--dry-run"], capsys)
    assert code == 0, err
    lines = err.splitlines()
    assert lines and all(line.startswith("fxrf: ") for line in lines)
    steps = [line[len("fxrf: "):].rsplit(": ", 1)[0] for line in lines]  # "fxrf: WHAT: N units in T s"
    assert len(steps) == len(set(steps))  # one line per step, never one per iteration
    assert any(s.startswith("organizer: inserting convs") for s in steps)
    assert sum(s.startswith("timing model, result, model (2nd instance) in alternation") for s in steps) == 2
    assert any(s.startswith("decomposing the kernels (auto)") for s in steps)
    search = next(line for line in lines if "latency search" in line)  # the search is a step of its own
    assert "timed)" in search  # the blocks the latency model timed, counted in the step's line
    code, out, err = _cli(["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--stages", "--dry-run"], capsys)
    steps = [line[len("fxrf: "):].rsplit(": ", 1)[0] for line in err.splitlines()]
    assert code == 0 and steps and len(steps) == len(set(steps))


def test_the_library_is_quiet_by_default(capsys, monkeypatch):
    monkeypatch.delenv("FXRF_PROGRESS")
    monkeypatch.setattr(progress, "AFTER", 0.0)
    fxrf.optimize(net(), SHAPE, stages=True)
    assert capsys.readouterr().err == ""
    with progress.show():  # what the CLI does
        list(progress.bar(range(3), "three things", unit="things"))
    assert capsys.readouterr().err.startswith("fxrf: three things: 3 things in ")
    monkeypatch.setenv("FXRF_PROGRESS", "0")  # the environment wins
    with progress.show():
        list(progress.bar(range(3), "three things"))
    assert capsys.readouterr().err == ""


def test_compile_says_when_its_first_call_compiles(capsys, monkeypatch):
    monkeypatch.setenv("FXRF_PROGRESS", "1")
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    torch._dynamo.reset()
    fxrf.compile(m, (1, 3, 8, 8), backend_options={"inner": "eager"}, warmup=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("fxrf: fxrf.compile: compiling a graph of ")
    assert lines[0].endswith("(the first call) ...") and ": done in " in lines[1]


# ---------------------------------------------------------------------------------------------- the 3DRF column


def test_the_3drf_reference_is_stated_and_a_moved_one_marked():
    torch.manual_seed(0)
    strided = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU()).eval()
    r = fxrf.optimize(strided, SHAPE, kernels="DW+PW")
    d = before_after(r.before, r.after)
    # by hand: stage 1 starts after the strided conv: 8x8 with its 64 channels; decomposed, the strided DW ends
    # the stage on its 32 input channels, so stage 1's input becomes 8x8x32
    assert [(s["input_before"], s["input_after"]) for s in d["stages"]] == [("16x16x3", "16x16x3"),
                                                                           ("8x8x64", "8x8x32")]
    text = optimize_summary(r).splitlines()
    rows = {line.split()[0]: line for line in text if line[:1].isdigit()}
    assert rows["1"].endswith("(of 8x8x32, was 8x8x64)") and "(of" not in rows["0"]
    assert any(line.startswith("3DRF: measured against the stage's input") and "changed" in line for line in text)
    plain_run = fxrf.optimize(net(), SHAPE, kernels="DW+PW")
    assert "3DRF: measured against the stage's input (w0 x channels), the same in both models" in \
        optimize_summary(plain_run).splitlines()


# ---------------------------------------------------------------------------------------------- ANSI codes


RED = "\x1b[31m\x1b[1mboom\x1b[0m"


def test_one_line_messages_carry_no_ansi_codes(capsys, monkeypatch):
    assert first_line(RuntimeError(f"\n{RED} in graph\nmore")) == "boom in graph"
    assert plain("a\x1b[2Kb\x1b[38;5;196mc\x1bMd") == "abcd"  # erase line, 256-colour, a two-byte escape
    import fxrf.analysis

    for exc in (RuntimeError(f"{RED}: dynamo says"), fxrf.errors.TraceError(f"{RED}: cannot trace")):
        def broken(*args, _exc=exc, **kwargs):
            raise _exc
        monkeypatch.setattr(fxrf.analysis, "analyze", broken)
        code, _, err = _cli(["analyze", "fxrf:vgg11_cifar", "--input", "1,3,32,32"], capsys)
        assert code == 1 and "\x1b" not in err and "boom" in err and err.count("\n") == 1
