"""organize_stages(latency_budget=...): the predicted latency (input model timed whole, each conv added or removed
timed alone) limits the changes. Fake timers only: nothing is compiled or timed for real here."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

import fxrf
from fxrf.cli import main
from fxrf.errors import InputError
from fxrf.passes.latency import LatencyModel, Probe

SHAPE = (1, 3, 16, 16)


def _cbr(i, o, groups=1):
    return [nn.Conv2d(i, o, 3, padding=1, groups=groups), nn.BatchNorm2d(o), nn.ReLU()]


def _two_stages() -> nn.Module:
    """16 px: 3->8, 8->8; 8 px: 8->16. Greedy, no MACs budget: stage 1 gets a conv (gain 1.1659), then stage 0
    two (0.7162, 0.3678); the next ones (0.2974 at 8 px, 0.1911 at 16 px) are <= 0.3."""
    torch.manual_seed(0)
    return nn.Sequential(*_cbr(3, 8), *_cbr(8, 8), nn.MaxPool2d(2), *_cbr(8, 16)).eval()


def _paper_model() -> nn.Module:
    """16 px: 2 convs; 8 px: 4 convs. The paper strategy (no budget) swaps two 8 px convs (gains 0.0657, 0.2974)
    for two 16 px ones (0.7162, 0.3678): 2,4 -> 4,2."""
    torch.manual_seed(0)
    return nn.Sequential(*_cbr(3, 8), *_cbr(8, 8), nn.MaxPool2d(2), *_cbr(8, 16), *_cbr(16, 16), *_cbr(16, 16),
                         *_cbr(16, 16)).eval()


class Timer:
    """Seconds by what is timed: the whole model `model`; a conv by its input's width in px (`by_px`); records
    each probe."""

    def __init__(self, model: float, by_px: dict):
        self.model, self.by_px, self.probes = model, by_px, []

    def __call__(self, fn, x, probe: Probe) -> float:
        self.probes.append(probe)
        return self.model if probe.recipe == "model" else self.by_px[probe.in_shape[2]]


def _never(fn, x, probe):
    raise AssertionError(f"timed {probe.recipe} without a latency budget")


def _lm(timer) -> LatencyModel:
    return LatencyModel("cpu", batch=1, cache=None, timer=timer)


def _same(r1, r2) -> None:
    assert r1.graph_module.code == r2.graph_module.code
    assert r1.changes == r2.changes and r1.declined == r2.declined
    assert r1.summary == r2.summary


# -- (a) no budget: nothing timed, today's result ----------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["greedy", "paper"])
def test_without_a_budget_nothing_is_timed(strategy):
    lm = _lm(_never)
    plain = fxrf.organize_stages(_paper_model(), SHAPE, strategy=strategy, macs_budget=None)
    given = fxrf.organize_stages(_paper_model(), SHAPE, strategy=strategy, macs_budget=None, latency=lm,
                                 latency_budget=None, device="cpu", batch=8)
    assert lm.calls == 0
    _same(plain, given)
    assert given.summary["latency_budget"] is None and "latency" not in given.summary
    assert all(c.time_ms is None for c in given.changes)


def test_without_a_budget_the_documented_result_stands():
    # organize_stages' docstring example: 5x5x3 -> 7x7x3 -> 9x9x3, gains 0.7162 and 0.3678
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    r = fxrf.organize_stages(net, SHAPE, macs_budget=None, latency=_lm(_never))
    assert r.summary["stage_convs"] == [4] and r.summary["delta_3drf"] == 1.084


# -- (b) a stage made expensive ----------------------------------------------------------------------------------


def test_an_expensive_stage_is_skipped_and_the_reason_names_the_budget():
    timer = Timer(10e-3, {16: 5e-3, 8: 1e-3})  # the model 10 ms; a conv at 16 px 5 ms, at 8 px 1 ms
    r = fxrf.organize_stages(_two_stages(), SHAPE, macs_budget=None, latency_budget=1.25, latency=_lm(timer))
    # limit 10 * 1.25 = 12.5 ms. By gain: 8 px (1.1659): 10 + 1 = 11 <= 12.5, inserted; 16 px (0.7162):
    # 11 + 5 = 16 > 12.5, declined (and the stage closed); 8 px next (0.2974) <= threshold 0.3: stop.
    assert [(c.kind, c.stage, round(c.gain, 4), c.time_ms) for c in r.changes] == [("insert", 1, 1.1659, 1.0)]
    assert r.summary["stage_convs"] == [2, 2]
    late = [d for d in r.declined if "latency budget" in d.reason]
    assert [(d.stage, round(d.gain, 4)) for d in late] == [(0, 0.7162)]
    assert "(gain 0.7162, 5.000 ms)" in late[0].reason
    assert "predicted 16.000 ms > 12.500 ms, 1.25x the input model's 10.000 ms" in late[0].reason
    t = r.summary["latency"]
    assert (t["original_ms"], t["added_ms"], t["removed_ms"], t["predicted_ms"], t["limit_ms"]) == (
        10.0, 1.0, 0.0, 11.0, 12.5)
    assert t["batch"] == 1 and t["mode"] == "compile" and t["device"].startswith("cpu:")
    assert r.summary["latency_budget"] == 1.25
    # what was timed: the input model once, and each candidate conv at its input (width to width, 3x3)
    kinds = [(p.recipe, p.conv[:3], p.in_shape) for p in timer.probes]
    assert kinds[0] == ("model", kinds[0][1], (1, 3, 16, 16)) and timer.probes[0].label == "original"
    assert ("S", (16, 16, (3, 3)), (1, 16, 8, 8)) in kinds and ("S", (8, 8, (3, 3)), (1, 8, 16, 16)) in kinds
    # without the budget both stages get their convs (the ranking is the same, only the budget limits)
    free = fxrf.organize_stages(_two_stages(), SHAPE, macs_budget=None)
    assert free.summary["stage_convs"] == [4, 2]


def test_when_every_conv_is_too_slow_nothing_is_inserted():
    timer = Timer(10e-3, {16: 5e-3, 8: 3e-3})
    r = fxrf.organize_stages(_two_stages(), SHAPE, macs_budget=None, latency_budget=1.25, latency=_lm(timer))
    # 10 + 3 = 13 > 12.5 (8 px) and 10 + 5 = 15 > 12.5 (16 px): both declined for the budget
    assert r.changes == [] and r.summary["stage_convs"] == [2, 1]
    reasons = {d.stage: d.reason for d in r.declined if "latency budget" in d.reason}
    assert "predicted 13.000 ms > 12.500 ms" in reasons[1] and "predicted 15.000 ms > 12.500 ms" in reasons[0]
    assert r.summary["latency"]["predicted_ms"] == 10.0


def test_a_removed_conv_is_credited():
    torch.manual_seed(0)  # 16 px: 3->8; 2 px: 8->16, 16->16 (gain 0: its field is already the whole 2x2x16)
    net = nn.Sequential(*_cbr(3, 8), nn.MaxPool2d(8), *_cbr(8, 16), *_cbr(16, 16)).eval()
    timer = Timer(10e-3, {16: 3e-3, 2: 2e-3})
    r = fxrf.organize_stages(net, SHAPE, macs_budget=None, latency_budget=1.1, latency=_lm(timer))
    # limit 11 ms; the 2 px conv removed: 10 - 2 = 8; a 16 px conv: 8 + 3 = 11 <= 11, inserted; the next:
    # 11 + 3 = 14 > 11, declined. Without the credit the first would have been declined (13 > 11).
    assert [(c.kind, c.stage, c.time_ms) for c in r.changes] == [("remove", 1, 2.0), ("insert", 0, 3.0)]
    t = r.summary["latency"]
    assert (t["removed_ms"], t["added_ms"], t["predicted_ms"]) == (2.0, 3.0, 11.0)
    assert any("predicted 14.000 ms > 11.000 ms" in d.reason for d in r.declined)


def test_a_grouped_conv_removed_is_not_credited():
    torch.manual_seed(0)  # the removed 2 px conv is depthwise: the latency model times dense convs only
    net = nn.Sequential(*_cbr(3, 8), nn.MaxPool2d(8), *_cbr(8, 16), *_cbr(16, 16, groups=16)).eval()
    r = fxrf.organize_stages(net, SHAPE, macs_budget=None, latency_budget=1.1,
                             latency=_lm(Timer(10e-3, {16: 3e-3, 2: 2e-3})))
    removed = [c for c in r.changes if c.kind == "remove"]
    assert len(removed) == 1 and removed[0].time_ms is None
    assert r.summary["latency"]["untimed_removed"] == [removed[0].node]
    assert r.summary["latency"]["removed_ms"] == 0.0
    assert not any(c.kind == "insert" for c in r.changes)  # 10 + 3 = 13 > 11


# -- (c) the paper strategy at budget 1.0 ------------------------------------------------------------------------


@pytest.mark.parametrize("by_px, convs", [
    ({16: 5e-3, 8: 1e-3}, [2, 4]),  # a swap would add 5 - 1 = 4 ms: none is made
    ({16: 1e-3, 8: 1e-3}, [4, 2]),  # 10 - 1 + 1 = 10 <= 10: latency-neutral swaps are made
    ({16: 1e-3, 8: 2e-3}, [4, 2]),  # each swap saves 1 ms: 10 -> 9 -> 8
])
def test_paper_at_budget_one_never_predicts_above_the_original(by_px, convs):
    r = fxrf.organize_stages(_paper_model(), SHAPE, strategy="paper", macs_budget=None, latency_budget=1.0,
                             latency=_lm(Timer(10e-3, by_px)))
    assert r.summary["stage_convs"] == convs
    t = r.summary["latency"]
    assert t["original_ms"] == 10.0 and t["limit_ms"] == 10.0
    assert t["predicted_ms"] <= t["original_ms"]
    assert t["predicted_ms"] == pytest.approx(10.0 + t["added_ms"] - t["removed_ms"])
    assert t["added_ms"] == pytest.approx(sum(c.time_ms for c in r.changes if c.kind == "insert"))
    assert t["removed_ms"] == pytest.approx(sum(c.time_ms for c in r.changes if c.kind == "remove"))
    running = 10.0  # the prediction after each swap (remove, insert) stays within the budget
    for c in r.changes:
        running += c.time_ms if c.kind == "insert" else -c.time_ms
        if c.kind == "insert":
            assert running <= 10.0 + 1e-9


def test_paper_declines_name_the_latency_budget():
    r = fxrf.organize_stages(_paper_model(), SHAPE, strategy="paper", macs_budget=None, latency_budget=1.0,
                             latency=_lm(Timer(10e-3, {16: 5e-3, 8: 1e-3})))
    late = [d for d in r.declined if "latency budget" in d.reason]
    # the lowest removable conv is at 8 px (1 ms out); the best candidate at 16 px (5 ms in): 10 - 1 + 5 = 14
    assert late and late[0].stage == 0 and round(late[0].gain, 4) == 0.7162
    assert "the swap (5.000 ms in, 1.000 ms out)" in late[0].reason
    assert "predicted 14.000 ms > 10.000 ms, 1.00x the input model's 10.000 ms" in late[0].reason


# -- (d) bad budgets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, -1, math.nan, math.inf, "x", True])
def test_bad_budgets_are_one_line(budget):
    with pytest.raises(InputError, match=r"latency_budget is a ratio of predicted latency after/before, a finite "
                                         r"number > 0 such as 1.0 \(or None for no limit\), got ") as e:
        fxrf.organize_stages(_two_stages(), SHAPE, latency_budget=budget, latency=_lm(_never))
    assert "\n" not in str(e.value)


def test_a_1d_model_is_refused_with_the_fix():
    net = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1), nn.ReLU())
    with pytest.raises(InputError, match=r"times 2-d convs only, and stage 0 is 1-d: pass latency_budget=None"):
        fxrf.organize_stages(net, (1, 3, 32), latency_budget=1.1, latency=_lm(_never))


# -- (e) the command line ----------------------------------------------------------------------------------------


FACTORY = '''import torch.nn as nn


def make():
    def cbr(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
    return nn.Sequential(*cbr(3, 8), *cbr(8, 8), nn.MaxPool2d(2), *cbr(8, 16))
'''


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_latency_budget_with_a_fake_timer(tmp_path, capsys, monkeypatch):
    """The CLI builds LatencyModel(--device, --batch); its default timer is replaced by a fake one."""
    timer = Timer(10e-3, {16: 5e-3, 8: 1e-3})
    monkeypatch.setattr("fxrf.passes.latency.default_timer", lambda *a, **k: timer)
    monkeypatch.setenv("FXRF_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "net.py").write_text(FACTORY)
    argv = ["optimize", f"{tmp_path / 'net.py'}:make", "--input", "1,3,16,16", "--stages", "--macs-budget", "10",
            "--latency-budget", "1.25", "--batch", "4", "--dry-run"]
    code, out, err = _run(argv + ["--json"], capsys)
    assert code == 0, err
    s = json.loads(out)["stages"]["summary"]  # stdout is the JSON alone (the dry-run line goes to stderr)
    assert s["latency_budget"] == 1.25 and s["stage_convs"] == [2, 2]  # as in the test of organize_stages above
    assert s["latency"]["batch"] == 4 and s["latency"]["predicted_ms"] == 11.0
    assert {p.in_shape[0] for p in timer.probes} == {4}  # timed at --batch
    code, out, err = _run(argv, capsys)  # the cache answers now: the table says what was predicted
    assert code == 0, err
    assert "predicted latency on cpu:" in out and "at batch 4: 10.000 -> 11.000 ms (budget 1.25x" in out


@pytest.mark.parametrize("extra, message", [
    (["--stages", "--latency-budget", "0"], "argument --latency-budget: must be a ratio after/before, a finite "
                                            "number > 0 such as 1.0, got '0'"),
    (["--stages", "--latency-budget", "-1"], "argument --latency-budget: must be a ratio"),
    (["--stages", "--latency-budget", "nan"], "argument --latency-budget: must be a ratio"),
    (["--stages", "--latency-budget", "x"], "argument --latency-budget: must be a ratio"),
    (["--kernels", "DW+PW", "--latency-budget", "1.1"], "--latency-budget limits the stage organizer: use it with "
                                                        "--stages"),
])
def test_cli_latency_budget_usage_errors(extra, message, capsys):
    code, out, err = _run(["optimize", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--dry-run", *extra], capsys)
    assert code == 2 and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_cuda_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "net.py").write_text(FACTORY)
    code, out, err = _run(["optimize", f"{tmp_path / 'net.py'}:make", "--input", "1,3,16,16", "--stages",
                           "--latency-budget", "1.1", "--device", "cuda", "--dry-run"], capsys)
    assert code == 2 and "no CUDA device is visible; use --device cpu" in err and err.count("\n") == 1


def test_a_conv_is_timed_as_the_decomposer_times_a_kept_conv():
    """LatencyModel.time_conv (the organizer's clock) times the decomposer's site for a kept conv (recipe "S"), with
    the model's norm and activation: one cache entry for both passes, so a second pass times nothing again."""
    from fxrf.passes.latency import conv_pattern
    timer = Timer(1e-3, {16: 1e-4, 8: 5e-5})
    lm = _lm(timer)
    gm = fxrf.trace(_two_stages(), SHAPE)
    conv, pattern = gm.get_submodule("3"), conv_pattern(gm)  # 8 -> 8 at 16 px, then BatchNorm2d and ReLU
    assert (type(pattern.norm), type(pattern.act)) == (nn.BatchNorm2d, nn.ReLU)
    assert lm.time_conv(conv, (1, 8, 16, 16), pattern) == 1e-4 and lm.calls == 1
    assert lm.time("S", conv, (1, 8, 16, 16), pattern) == 1e-4 and lm.calls == 1  # read back, not timed
    assert [(p.recipe, p.pattern) for p in timer.probes] == [("S", ("BatchNorm2d", True, "ReLU"))]
    fxrf.organize_stages(_two_stages(), SHAPE, macs_budget=None, latency=lm, latency_budget=10.0)
    assert {p.recipe for p in timer.probes} == {"S", "model"}
