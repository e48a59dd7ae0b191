"""The latency model (passes/latency.py) and decompose(objective="latency"), with fake timers: no real timing is
asserted here (benchmarks/bench_models.py measures)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import fxrf
from fxrf.errors import InputError
from fxrf.passes.latency import LatencyModel, Probe, cache_path, roofline, site_module

SHAPE = (1, 3, 16, 16)


def _model() -> nn.Module:
    def cbr(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
    torch.manual_seed(0)
    return nn.Sequential(*cbr(3, 16), *cbr(16, 16), *cbr(16, 16), nn.MaxPool2d(2),
                         *cbr(16, 32), *cbr(32, 32), *cbr(32, 32)).eval()


class FakeTimer:
    """Seconds from a table by recipe name (default: `other`), scaled by the input's pixels; records each probe."""

    def __init__(self, table: dict, other: float = 0.5):
        self.table, self.other, self.probes = table, other, []

    def seconds(self, recipe: str, in_shape: tuple) -> float:
        return self.table.get(recipe, self.other) * in_shape[0] * in_shape[2] * in_shape[3] * 1e-6

    def __call__(self, fn, x, probe: Probe) -> float:
        assert tuple(x.shape) == probe.in_shape
        self.probes.append(probe)
        return self.seconds(probe.recipe, probe.in_shape)


class ModelTimer(FakeTimer):
    """FakeTimer whose whole-model timings (probe.recipe "model") come from `models` by the comparison's label."""

    def __init__(self, table: dict, models: dict, other: float = 0.5):
        super().__init__(table, other)
        self.models = models

    def seconds(self, recipe, in_shape):
        return super().seconds(recipe, in_shape)

    def __call__(self, fn, x, probe: Probe) -> float:
        if probe.recipe == "model":
            self.probes.append(probe)
            t = self.models[probe.label]
            return t.pop(0) if isinstance(t, list) else t  # a list: one time per round
        return super().__call__(fn, x, probe)


def _rewritten(r):
    return [s for s in r.stages if any(b != "S" for b in s.blocks)]


def test_cache_round_trips(tmp_path):
    path = tmp_path / "lat.json"
    whole = {"latency": 1e-3, "macs": 2e-3, "original": 3e-3}
    first = ModelTimer({"S": 1.0, "DW+PW": 0.6}, dict(whole))
    lm = LatencyModel("cpu", batch=4, mode="eager", cache=path, timer=first)
    r1 = fxrf.decompose(_model(), SHAPE, objective="latency", latency=lm)
    assert lm.calls == len(first.probes) > 0
    keys = json.loads(path.read_text())
    blocks = {p.key() for p in first.probes if p.recipe != "model"}
    compared = len(r1.summary["verified"]["models"])  # the whole-model check: each model once per round, 5 rounds
    assert len(blocks) == len(first.probes) - 5 * compared  # each block timed once
    assert len(keys) == len(blocks) + 1  # one figure per block, and the whole-model comparison as one entry

    second = ModelTimer({"S": 1.0, "DW+PW": 0.6}, dict(whole))
    lm2 = LatencyModel("cpu", batch=4, mode="eager", cache=path, timer=second)
    r2 = fxrf.decompose(_model(), SHAPE, objective="latency", latency=lm2)
    assert lm2.calls == 0 and second.probes == []  # the second run costs nothing
    assert r1.changes and [c.recipe for c in r1.changes] == [c.recipe for c in r2.changes]
    assert r2.summary["latency"]["saved_ms"] == pytest.approx(r1.summary["latency"]["saved_ms"])


def test_cache_keys_separate_batch_mode_and_device(tmp_path):
    path = tmp_path / "lat.json"
    conv = nn.Conv2d(16, 16, 3, padding=1)
    keys = set()
    for batch, mode in ((1, "eager"), (2, "eager"), (1, "compile")):
        t = FakeTimer({"S": 1.0})
        lm = LatencyModel("cpu", batch=batch, mode=mode, cache=path, timer=t)
        lm.time("S", conv, (1, 16, 8, 8))
        assert lm.calls == 1
        keys.add(t.probes[0].key())
    assert len(keys) == 3 and len(json.loads(path.read_text())) == 3
    p = t.probes[0]
    assert Probe(p.recipe, p.shift, p.conv, p.in_shape, p.pattern, p.mode, "cuda:other:sm90").key() != p.key()
    assert p.key("0.0") != p.key()  # the torch version is part of the key


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FXRF_CACHE_DIR", str(tmp_path / "a"))
    assert cache_path().parent == tmp_path / "a"
    monkeypatch.delenv("FXRF_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_path().parent == tmp_path / "x" / "fxrf"


def test_latency_objective_avoids_a_slow_block():
    # MACs-aware auto picks DW+GPW-g8 in these stages (cheapest compact block meeting quality, checked below);
    # make it 10x slower than the conv and every other block twice as fast as the conv.
    macs = fxrf.decompose(_model(), SHAPE)
    assert any(c.recipe == "DW+GPW-g8" for c in macs.changes)
    timer = FakeTimer({"S": 1.0, "DW+GPW-g8": 10.0})
    lm = LatencyModel("cpu", batch=2, mode="eager", cache=None, timer=timer)
    r = fxrf.decompose(_model(), SHAPE, objective="latency", latency=lm, verify=0)  # the per-block choice
    assert r.changes and all(c.recipe != "DW+GPW-g8" for c in r.changes)
    assert r.summary["objective"] == "latency"
    for s in _rewritten(r):
        assert s.quality and s.compact  # the paper's two rules still hold in every rewritten stage
    assert r.summary["quality"] and r.summary["compact"]
    x = torch.rand(2, 3, 16, 16)
    assert r.graph_module(x).shape == _model()(x).shape


def test_latency_objective_never_keeps_a_block_slower_than_the_conv():
    # blocks by recipe: some faster, some slower than the conv (1.0); whatever auto picks must be faster
    table = {"S": 1.0, "DW+PW": 1.5, "DW+GPW-g2": 0.9, "DW+GPW-g4": 1.2, "DW+GPW-g8": 2.0, "DW+RPW-g2-o33": 0.7}
    timer = FakeTimer(table, other=3.0)
    lm = LatencyModel("cpu", batch=1, mode="eager", cache=None, timer=timer)
    r = fxrf.decompose(_model(), SHAPE, objective="latency", latency=lm, verify=0)  # the per-block choice
    assert r.changes
    for c in r.changes:
        assert table.get(c.recipe, 3.0) < table["S"], c
    for row in r.summary["latency"]["sites"]:
        assert row["block_ms"] < row["conv_ms"]
    assert all(s.quality for s in _rewritten(r))


def test_all_blocks_slower_keeps_the_model():
    lm = LatencyModel("cpu", batch=1, mode="eager", cache=None, timer=FakeTimer({"S": 1.0}, other=2.0))
    r = fxrf.decompose(_model(), SHAPE, objective="latency", latency=lm)
    assert r.changes == [] and r.summary["macs_after"] == r.summary["macs_before"]


def test_macs_objective_prices_what_it_chose():
    lm = LatencyModel("cpu", batch=1, mode="eager", cache=None, timer=FakeTimer({"S": 1.0}))
    r = fxrf.decompose(_model(), SHAPE, latency=lm)
    assert r.summary["objective"] == "macs"
    assert [row["recipe"] for row in r.summary["latency"]["sites"]] == [c.recipe for c in r.changes]


def test_errors_name_the_fix():
    with pytest.raises(InputError, match="objective 'speed' is unknown"):
        fxrf.decompose(_model(), SHAPE, objective="speed")
    with pytest.raises(InputError, match="recipe='auto'"):
        fxrf.decompose(_model(), SHAPE, recipe="DW+PW", objective="latency")
    with pytest.raises(InputError, match="mode"):
        LatencyModel(mode="fast")
    bad = LatencyModel("cpu", cache=None, mode="eager", timer=lambda fn, x, p: float("nan"))
    with pytest.raises(InputError, match="timer returned nan"):
        bad.time("S", nn.Conv2d(4, 4, 3), (1, 4, 8, 8))


def test_site_module_is_the_block_then_the_models_norm_and_act():
    from fxrf.passes.blocks import Pattern
    conv = nn.Conv2d(8, 16, 3, padding=1)
    gm = site_module("DW+RPW-g4-o50", conv, Pattern(nn.BatchNorm2d(8), nn.ReLU()), shift=1)
    names = [n.name for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    assert names == ["block_dw", "block_dw_bn", "block_dw_act", "block_shift", "block_pw", "norm", "act"]
    assert gm(torch.rand(2, 8, 5, 5)).shape == (2, 16, 5, 5)


def test_roofline_counts_by_hand():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    s = roofline("S", conv, (2, 8, 4, 4), flops_per_s=1e9, bytes_per_s=1e9)
    # S: 2 images x 16 out x 4x4 px x 8 in x 9 taps = 36864 MACs; floats: in 2*8*16 = 256, out 2*16*16 = 512,
    # weights 16*8*9 + bias 16 = 1168 -> (256 + 512 + 1168) * 4 bytes = 7744
    assert (s.macs, s.bytes) == (36864, 7744)
    d = roofline("DW+PW", conv, (2, 8, 4, 4), flops_per_s=1e9, bytes_per_s=1e9)
    # dw: 2*8*16*9 = 2304 MACs, floats 256 in + 256 out + 72 weights (no bias); pw: 2*16*16*8 = 4096 MACs,
    # floats 256 in + 512 out + 128 weights + 16 bias -> 6400 MACs, (584 + 912) * 4 = 5984 bytes
    assert (d.macs, d.bytes) == (6400, 5984)
    assert d.intensity == pytest.approx(2 * 6400 / 5984)
    assert d.memory_s == pytest.approx(5984 / 1e9) and d.compute_s == pytest.approx(12800 / 1e9)
    assert d.bound == "compute"


def test_the_whole_model_check_keeps_the_macs_choice_when_it_is_faster():
    # blocks alone say the latency choice saves the most; the whole models, timed, say the MACs choice is faster
    timer = ModelTimer({"S": 1.0, "DW+GPW-g8": 0.9, "DW+PW": 0.2}, {"latency": 3e-3, "macs": 2e-3, "original": 5e-3})
    lm = LatencyModel("cpu", batch=1, mode="eager", cache=None, timer=timer)
    r = fxrf.decompose(_model(), SHAPE, objective="latency", latency=lm)
    macs = fxrf.decompose(_model(), SHAPE)
    v = r.summary["verified"]
    assert v["chosen"] == "macs" and set(v["models"]) == {"latency", "macs", "original"}
    assert [c.recipe for c in r.changes] == [c.recipe for c in macs.changes]
    assert v["speedup"] == pytest.approx(5e-3 / 2e-3)
    assert v["models"]["macs"]["ms"] == pytest.approx(2.0)
    # the comparison alternates: round by round, every model once, in turn
    labels = [p.label for p in timer.probes if p.recipe == "model"]
    assert labels == ["latency", "macs", "original"] * 5
    assert r.summary["quality"] and r.summary["compact"]


def test_the_whole_model_check_keeps_the_model_when_every_rewrite_is_slower():
    timer = ModelTimer({"S": 1.0, "DW+PW": 0.2}, {"latency": 3e-3, "macs": 4e-3, "original": 1e-3})
    lm = LatencyModel("cpu", batch=1, mode="eager", cache=None, timer=timer)
    r = fxrf.decompose(_model(), SHAPE, objective="latency", latency=lm)
    assert r.summary["verified"]["chosen"] == "original"
    assert r.changes == [] and r.summary["macs_after"] == r.summary["macs_before"]
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(r.graph_module(x), _model()(x))  # the unchanged model, same weights


def test_the_prediction_errors_are_reported_against_the_measured_models():
    # hand count: FakeTimer gives a site of recipe R at (1, C, H, W) table[R] * H * W * 1e-6 s. _model's five
    # eligible sites (the first conv is skipped): two at 16x16, three at 8x8. All convs: 1.0 -> sites_ms =
    # (2 * 256 + 3 * 64) * 1e-3 = 0.704 ms. DW+PW everywhere at 0.2: saved = 0.8 * 0.704 = 0.5632 ms.
    timer = ModelTimer({"S": 1.0, "DW+PW": 0.2}, {"latency": 1e-3, "macs": 1e-3, "original": 2e-3}, other=5.0)
    lm = LatencyModel("cpu", batch=1, mode="eager", cache=None, timer=timer)
    r = fxrf.decompose(_model(), SHAPE, objective="latency", latency=lm, candidates=["DW+PW"])
    v = r.summary["verified"]
    assert [c.recipe for c in r.changes] == ["DW+PW"] * 5
    assert v["sites_ms"] == pytest.approx(0.704)
    row = v["models"]["latency"]
    assert row["additive_ms"] == pytest.approx(2.0 - 0.5632)  # measured(original) - saved
    assert row["scaled_ms"] == pytest.approx(2.0 * (1 - 0.8))  # measured(original) * (1 - saved / sites_ms)
    assert row["scaled_error"] == pytest.approx(0.4 / 1.0 - 1)
    assert "macs" not in v["models"]  # with one candidate both objectives choose the same: compared once


def test_verify_0_times_no_whole_model_and_bad_values_are_refused():
    timer = ModelTimer({"S": 1.0, "DW+PW": 0.2}, {})
    lm = LatencyModel("cpu", batch=1, mode="eager", cache=None, timer=timer)
    r = fxrf.decompose(_model(), SHAPE, objective="latency", latency=lm, verify=0)
    assert "verified" not in r.summary and all(p.recipe != "model" for p in timer.probes)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(InputError, match="verify="):
            fxrf.decompose(_model(), SHAPE, objective="latency", latency=lm, verify=bad)


def test_the_comparison_is_cached(tmp_path):
    path = tmp_path / "lat.json"
    models = {"latency": 3e-3, "macs": 2e-3, "original": 5e-3}
    first = ModelTimer({"S": 1.0, "DW+PW": 0.2}, models)
    fxrf.decompose(_model(), SHAPE, objective="latency", latency=LatencyModel(
        "cpu", batch=1, mode="eager", cache=path, timer=first))
    second = ModelTimer({}, {})  # would raise KeyError on any whole-model timing
    lm = LatencyModel("cpu", batch=1, mode="eager", cache=path, timer=second)
    r = fxrf.decompose(_model(), SHAPE, objective="latency", latency=lm)
    assert second.probes == [] and lm.calls == 0 and r.summary["verified"]["chosen"] == "macs"


FACTORY = """
import torch.nn as nn
def make():
    def cbr(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
    return nn.Sequential(*cbr(3, 16), *cbr(16, 16), *cbr(16, 16), nn.MaxPool2d(2), *cbr(16, 32), *cbr(32, 32))
"""


def test_cli_objective_latency_verifies_and_prints_the_times(tmp_path, capsys, monkeypatch):
    from fxrf.cli import main
    timer = ModelTimer({"S": 1.0, "DW+PW": 0.2}, {"latency": 3e-3, "macs": 2e-3, "original": 5e-3})
    monkeypatch.setattr("fxrf.passes.latency.default_timer", lambda *a, **k: timer)
    monkeypatch.setenv("FXRF_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "net.py").write_text(FACTORY)
    argv = ["optimize", f"{tmp_path / 'net.py'}:make", "--input", "1,3,16,16", "--kernels", "auto", "--objective",
            "latency", "--verify", "2", "--batch", "4", "--goal", "paper", "--dry-run"]
    assert main(argv + ["--json"]) == 0
    v = json.loads(capsys.readouterr().out)["kernels"]["summary"]["verified"]
    assert v["rounds"] == 2 and v["chosen"] in ("macs", "latency")
    assert [p.label for p in timer.probes if p.recipe == "model"] == list(v["models"]) * 2
    assert {p.in_shape[0] for p in timer.probes} == {4}  # timed at --batch
    assert main(argv) == 0  # the cache answers now
    out = capsys.readouterr().out
    assert "whole model on cpu:" in out and "at batch 4, compiled, in alternation:" in out and "kept: " in out
    for bad in ("-1", "x", "1.5"):
        argv[argv.index("--verify") + 1] = bad
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--verify" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("latency_s, kept", [(0.98e-3, "macs"), (0.90e-3, "latency")])
def test_the_latency_choice_must_beat_the_macs_choice_by_the_margin(latency_s, kept):
    # 2% faster is within what two timings of one model differ by: the MACs choice (deterministic) stays
    timer = ModelTimer({"S": 1.0, "DW+GPW-g8": 0.9, "DW+PW": 0.2}, {"latency": latency_s, "macs": 1e-3,
                                                                    "original": 5e-3})
    lm = LatencyModel("cpu", batch=1, mode="eager", cache=None, timer=timer)
    v = fxrf.decompose(_model(), SHAPE, objective="latency", latency=lm).summary["verified"]
    assert v["chosen"] == kept and v["latency_vs_macs"] == pytest.approx(latency_s / 1e-3)


def test_the_comparison_is_by_rounds_so_a_drift_in_load_cancels():
    # the machine gets 3x slower after round 2. Best rounds: latency 1.0 ms (round 1), macs 1.5 ms (round 2);
    # a ratio of minima would keep latency (0.67). Per round, latency / macs = 1.0/0.9, 3.3/1.5, 3.3/3, 3.3/3,
    # 3.3/3 -> median 1.1: the MACs choice is faster, and is kept.
    timer = ModelTimer({"S": 1.0, "DW+GPW-g8": 0.9, "DW+PW": 0.2},
                       {"latency": [1.0, 3.3, 3.3, 3.3, 3.3], "macs": [0.9, 1.5, 3.0, 3.0, 3.0],
                        "original": [5.0, 15.0, 15.0, 15.0, 15.0]})
    lm = LatencyModel("cpu", batch=1, mode="eager", cache=None, timer=timer)
    v = fxrf.decompose(_model(), SHAPE, objective="latency", latency=lm).summary["verified"]
    assert v["chosen"] == "macs" and v["latency_vs_macs"] == pytest.approx(1.1)
    assert v["models"]["latency"]["ms"] == pytest.approx(1000.0) and v["models"]["macs"]["rounds_ms"][1] == 1500.0
    assert v["speedup"] == pytest.approx(5.0)  # original / macs: 5/0.9, 15/1.5 = 10, 15/3 = 5 (x3) -> median 5


def test_nothing_to_replace_times_no_whole_model():
    # depthwise and pointwise convs only: no eligible site, so both objectives keep the model and nothing is timed
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                        nn.Conv2d(8, 8, 1)).eval()
    timer = ModelTimer({}, {})  # any whole-model timing would raise KeyError
    r = fxrf.decompose(net, SHAPE, objective="latency", latency=LatencyModel("cpu", cache=None, timer=timer))
    assert r.changes == [] and "verified" not in r.summary and timer.probes == []
