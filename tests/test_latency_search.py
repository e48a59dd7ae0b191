"""The latency search's cost (passes/latency.py, passes/decomposer/plan.py): each distinct block timed once across
the model, a rotation at shift 0 sharing its unpermuted block's timing, blocks with a channel permutation (a roll,
a shuffle) timed only when their lower bound puts them in front, the timer's stopping rule, and the progress line. Fake timers throughout: no real
timing is asserted here (benchmarks/bench_models.py --search measures the search)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxrf
from fxrf.passes.blocks import parse
from fxrf.passes.latency import LatencyModel, settled, unpermuted
from fxrf.progress import show

SHAPE = (1, 3, 16, 16)


def _net(repeat: int = 3) -> nn.Module:
    """A stem, then `repeat` identical 16 -> 16 convs at 16 px, a pool, and 16 -> 32 then 32 -> 32 at 8 px."""
    def cbr(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
    layers = cbr(3, 16)
    for _ in range(repeat):
        layers += cbr(16, 16)
    return nn.Sequential(*layers, nn.MaxPool2d(2), *cbr(16, 32), *cbr(32, 32)).eval()


class Table:
    """Seconds by recipe (`other` for the rest), plus `rotation` for a permutation (a roll at shift > 0, a shuffle):
    a block "R without shuffle" takes R's time without it, as a real block would. Records the probes."""

    def __init__(self, table: dict, other: float = 0.5, rotation: float = 0.05):
        self.table, self.other, self.rotation, self.probes = table, other, rotation, []

    def __call__(self, fn, x, probe) -> float:
        self.probes.append(probe)
        if probe.recipe == "model":
            return 1e-3
        name, _, dropped = probe.recipe.partition(" without ")
        permutes = not dropped and (probe.shift or "shuffle" in name)
        base = self.table.get(name, self.other) + (self.rotation if permutes else 0.0)
        return base * probe.in_shape[2] * probe.in_shape[3] * 1e-6


def test_unpermuted_is_the_block_without_its_roll_or_shuffle():
    assert unpermuted("DW+RPW-g8-o50").name == "DW+GPW-g8"  # a catalog kind where one matches
    assert unpermuted("DW+GPW-g2") == parse("DW+GPW-g2") and unpermuted("S").name == "S"
    gc = unpermuted("GC+shuffle-g4")  # else a kind made for it: the grouped conv alone
    assert gc.name == "GC+shuffle-g4 without shuffle" and gc.groups == 4
    assert [s.op for s in gc.kind.steps] == ["conv"]
    from fxrf.passes.latency import site_module
    gm = site_module(gc, nn.Conv2d(8, 16, 3, padding=1))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["block.gc"]
    assert gm.get_submodule("block.gc").groups == 4 and gm(torch.rand(1, 8, 5, 5)).shape == (1, 16, 5, 5)


def test_each_distinct_block_is_timed_once_across_the_model():
    # five identical 16 -> 16 sites: every block at that site is timed once, not five times
    timer = Table({"S": 1.0, "DW+PW": 0.3})
    lm = LatencyModel("cpu", batch=1, mode="eager", cache=None, timer=timer)
    fxrf.decompose(_net(repeat=5), SHAPE, objective="latency", latency=lm, verify=0)
    keys = [p.key() for p in timer.probes]
    assert len(keys) == len(set(keys)) == lm.calls
    same_site = [p for p in timer.probes if p.in_shape == (1, 16, 16, 16) and p.conv[:2] == (16, 16)]
    assert len({(p.recipe, p.shift) for p in same_site}) == len(same_site)


def test_a_rotation_at_shift_0_shares_the_unpermuted_blocks_timing():
    timer = Table({"S": 1.0})
    lm = LatencyModel("cpu", batch=1, mode="eager", cache=None, timer=timer)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    t_gpw = lm.time("DW+GPW-g4", conv, (1, 16, 8, 8))
    assert lm.time("DW+RPW-g4-o50", conv, (1, 16, 8, 8)) == t_gpw  # shift 0: the same module, no new timing
    assert lm.time("DW+RPW-g4-o33", conv, (1, 16, 8, 8), shift=0) == t_gpw
    assert lm.calls == 1 and [p.recipe for p in timer.probes] == ["DW+GPW-g4"]
    lm.time("DW+RPW-g4-o50", conv, (1, 16, 8, 8), shift=2)  # rotated: a copy more, timed on its own
    assert lm.calls == 2 and (timer.probes[-1].recipe, timer.probes[-1].shift) == ("DW+RPW-g4-o50", 2)


def test_bound_is_the_unpermuted_time_until_the_block_is_timed():
    timer = Table({"DW+GPW-g4": 0.4}, rotation=0.1)
    lm = LatencyModel("cpu", batch=1, mode="eager", cache=None, timer=timer)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    t, exact = lm.bound("DW+RPW-g4-o50", conv, (1, 16, 8, 8), shift=2)
    assert (t, exact) == (pytest.approx(0.4 * 64e-6), False) and lm.calls == 1  # only the unpermuted block timed
    lm.time("DW+RPW-g4-o50", conv, (1, 16, 8, 8), shift=2)
    assert lm.bound("DW+RPW-g4-o50", conv, (1, 16, 8, 8), shift=2) == (pytest.approx(0.6 * 64e-6), True)  # `other` + rotation
    assert lm.known("DW+PW", conv, (1, 16, 8, 8)) is None and lm.calls == 2  # `known` times nothing
    t, exact = lm.bound("GC+shuffle-g4", conv, (1, 16, 8, 8))  # a shuffle: bounded by the grouped conv alone
    assert (t, exact) == (pytest.approx(0.5 * 64e-6), False) and timer.probes[-1].recipe.endswith("without shuffle")




@pytest.mark.parametrize("table", [
    {"S": 1.0, "DW+PW": 0.9, "DW+GPW-g8": 0.2, "DW+GPW-g4": 0.3},   # grouped blocks fast: rotated ones contend
    {"S": 1.0, "DW+PW": 0.2},                                       # DW+PW far ahead: no rotation needs timing
    {"S": 1.0, "DW+GPW-g2": 0.25, "GC+shuffle-g4": 0.6},
    {"S": 1.0, "DW+PW": 0.5, "GC+shuffle-g8": 0.2, "GC+shuffle-g4": 0.22},  # shuffles contend
])
def test_lazy_rotated_timings_choose_what_timing_everything_chooses(table):
    # the same figures, all timed first (a cache filled by timing every block the search could ask for) or timed
    # as the search goes: the same plan, and the lazy search times no more blocks
    lazy_timer = Table(table)
    lazy = LatencyModel("cpu", batch=1, mode="eager", cache=None, timer=lazy_timer)
    r_lazy = fxrf.decompose(_net(), SHAPE, objective="latency", latency=lazy, verify=0)

    full_timer = Table(table)
    full = LatencyModel("cpu", batch=1, mode="eager", cache=None, timer=full_timer)
    _time_everything(full)
    r_full = fxrf.decompose(_net(), SHAPE, objective="latency", latency=full, verify=0)
    assert [(c.conv, c.recipe, c.shift) for c in r_lazy.changes] == [(c.conv, c.recipe, c.shift)
                                                                     for c in r_full.changes]
    assert [s.blocks for s in r_lazy.stages] == [s.blocks for s in r_full.stages]
    assert lazy.calls <= full.calls


def _time_everything(lm: LatencyModel) -> None:
    """Every candidate at every eligible site of _net, at shift 0 and at the shift `_apply` gives a rotated block."""
    from fxrf.passes.blocks import model_pattern
    from fxrf.passes.decomposer import check_options, eligible_sites
    from fxrf.trace import trace
    gm = trace(_net(), SHAPE)
    a = fxrf.analyze(gm, SHAPE)
    pattern = model_pattern(gm)
    for site in eligible_sites(gm, a):
        conv = gm.get_submodule(site.target)
        lm.time("S", conv, site.in_shape, pattern)
        for r in check_options().candidates:
            if r.inapplicable(conv):
                continue
            lm.time(r, conv, site.in_shape, pattern)
            if r.kind.rotates:
                lm.time(r, conv, site.in_shape, pattern, r.shift(conv))


def test_the_lazy_search_skips_permutations_that_cannot_win():
    # DW+PW far faster than anything grouped: no rotated or shuffled block can come first, so none is timed
    timer = Table({"S": 1.0, "DW+PW": 0.1}, other=0.8)
    lm = LatencyModel("cpu", batch=1, mode="eager", cache=None, timer=timer)
    r = fxrf.decompose(_net(), SHAPE, objective="latency", latency=lm, verify=0)
    assert {c.recipe for c in r.changes} == {"DW+PW"}
    assert not any(p.shift for p in timer.probes)
    assert not any(p.recipe.startswith("GC+shuffle") and "without" not in p.recipe for p in timer.probes)


@pytest.mark.parametrize("times, stat, expected", [
    ([1.0, 1.01, 1.015], "min", True),            # the three lowest within 2%
    ([1.0, 1.5, 1.03], "min", False),              # the third lowest 3% above the minimum
    ([1.0, 2.0, 1.02, 3.0, 1.005], "min", True),   # slow calls do not matter to the minimum
    ([1.0, 1.01], "min", False),                   # three calls at least
    ([1.0, 1.0, 1.0, 1.0], "median", False),       # five calls at least
    ([1.0, 1.01, 0.99, 1.0, 1.015], "median", True),   # n = 5: the interval is the range, within 2%
    ([1.0, 1.01, 0.99, 1.0, 1.1], "median", False),   # one call 10% up: the range is not tight
    # n = 8: the interval is [x(2), x(7)] (P(binomial(8, 1/2) < 2) = 9/256 <= 4%): an outlier each side left out
    ([0.5, 1.0, 1.01, 0.99, 1.0, 1.0, 1.01, 2.0], "median", True),
])
def test_the_timers_stopping_rule(times, stat, expected):
    assert settled(times, stat) is expected


def test_the_default_timer_stops_once_settled(monkeypatch):
    # a module whose calls all take the same (fake) time: the timer stops at the third timed call, not at 20
    import fxrf.passes.latency as L
    clock = {"t": 0.0}
    monkeypatch.setattr(L.time, "perf_counter", lambda: clock["t"])
    calls = []

    def fn(x):
        calls.append(1)
        clock["t"] += 1e-3
    t = L.default_timer(iters=20, warmup=2, budget_s=10.0)(fn, torch.zeros(1), None)
    assert t == pytest.approx(1e-3) and len(calls) == 2 + 3


def test_the_search_shows_progress_on_stderr(capsys, monkeypatch):
    monkeypatch.delenv("FXRF_PROGRESS", raising=False)
    monkeypatch.setattr("fxrf.progress.AFTER", 0.0)
    lm = LatencyModel("cpu", batch=1, mode="eager", cache=None, timer=Table({"S": 1.0, "DW+PW": 0.3}))
    with show():
        fxrf.decompose(_net(), SHAPE, objective="latency", latency=lm, verify=0)
    err = capsys.readouterr().err
    assert "fxrf: latency search (eager, cpu, batch 1): 2 stages in" in err and f"({lm.calls} timed)" in err
    monkeypatch.setenv("FXRF_PROGRESS", "0")  # the usual switch silences it
    fxrf.decompose(_net(), SHAPE, objective="latency", latency=lm, verify=0)
    assert capsys.readouterr().err == ""


def test_every_block_the_search_times_was_compiled_ahead_once(monkeypatch):
    # the prefetch lists (`_needed`, the contenders' pending blocks) against what the search then times: a timed
    # block missing from them would be compiled alone, when timed; a fake timer with compiling ahead forced on,
    # and the compiles themselves recorded instead of run
    from fxrf.passes import prefetch
    sent = []
    monkeypatch.setattr(LatencyModel, "compiles_ahead", property(lambda self: True))
    monkeypatch.setattr(prefetch.Prefetcher, "run", lambda self, jobs: sent.extend(w for w, _, _ in jobs))
    for table in ({"S": 1.0, "DW+PW": 0.9, "DW+GPW-g8": 0.2, "DW+GPW-g4": 0.3},  # rotated blocks contend
                  {"S": 1.0, "DW+PW": 0.5, "GC+shuffle-g8": 0.2, "GC+shuffle-g4": 0.22}):  # shuffles contend
        sent.clear()
        timer = Table(table)
        lm = LatencyModel("cpu", batch=1, mode="compile", cache=None, timer=timer, workers=1)
        fxrf.decompose(_net(), SHAPE, objective="latency", latency=lm, verify=0)
        timed = [f"{p.recipe} at {p.in_shape}" for p in timer.probes]
        assert any(p.shift for p in timer.probes) or any("shuffle" in p.recipe for p in timer.probes)
        assert set(timed) <= set(sent), set(timed) - set(sent)
        assert len(sent) == len(set(sent))  # nothing sent twice


def test_a_prefetched_site_is_a_cache_hit_when_timed(tmp_path):
    # two sites compiled ahead (one in a worker process, one here: whichever takes which), then timed for real:
    # inductor's own counters say the timing compiled nothing new. Shapes drawn per run, so the graphs are
    # unlikely to be in the cache from an earlier run.
    import random
    from torch._dynamo.utils import counters
    rng = random.Random()
    c, h, w = rng.randrange(8, 64), rng.randrange(9, 64), rng.randrange(9, 64)
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
    shape = (1, c, h, w)
    lm = LatencyModel("cpu", batch=1, mode="compile", cache=tmp_path / "lat.json", workers=1,
                      timer=None)
    with lm.ahead():
        assert lm.prefetch([("S", conv, shape, 0), ("DW+PW", conv, shape, 0)]) == 2
        assert lm._ahead.failed == [] and len(lm._ahead._procs) == 1
        hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
        for recipe in ("S", "DW+PW"):
            assert lm.time(recipe, conv, shape) > 0
        assert counters["inductor"]["fxgraph_cache_hit"] - hits == 2
        assert counters["inductor"]["fxgraph_cache_miss"] == misses
        procs = list(lm._ahead._procs)
    assert lm._ahead is None and all(p.poll() is not None for p in procs)  # the workers are gone with the block
    assert lm.prefetch([("S", conv, shape, 0), ("DW+PW", conv, shape, 0)]) == 0  # measured: nothing to compile


def test_compiling_ahead_is_off_where_it_cannot_help(monkeypatch):
    from fxrf.errors import InputError
    from fxrf.passes import prefetch
    conv = nn.Conv2d(8, 8, 3, padding=1)
    items = [("S", conv, (1, 8, 9, 9), 0), ("DW+PW", conv, (1, 8, 9, 9), 0)]
    fake = lambda fn, x, probe: 1e-3  # noqa: E731
    assert LatencyModel("cpu", cache=None, timer=fake, workers=2).prefetch(items) == 0  # a fake timer
    assert LatencyModel("cpu", mode="eager", cache=None, workers=2).prefetch(items) == 0  # nothing compiles
    assert LatencyModel("cpu", cache=None, workers=0).prefetch(items) == 0  # turned off
    monkeypatch.setenv(prefetch.ENV, "0")
    assert LatencyModel("cpu", cache=None).workers == 0
    monkeypatch.setenv(prefetch.ENV, "3")
    assert LatencyModel("cpu", cache=None).workers == 3
    monkeypatch.setenv(prefetch.ENV, "many")
    with pytest.raises(InputError, match="FXRF_COMPILE_WORKERS"):
        LatencyModel("cpu", cache=None)


@pytest.mark.parametrize("cpus, load, expected", [
    (8, 2.5, 5),    # 8 - 2.5 = 5.5 CPUs idle: 5 workers
    (8, 0.0, 7),    # all idle: one less than the CPUs (this process compiles too)
    (16, 0.0, 7),   # at most 7
    (2, 0.3, 1),    # a quiet 2-CPU machine: one worker beside this process
    (2, 1.8, 0),    # another process keeps a CPU busy: none
    (4, 9.0, 0),    # overloaded: none
])
def test_the_default_worker_count_is_the_idle_cpus(monkeypatch, cpus, load, expected):
    import os
    from fxrf.passes import prefetch
    monkeypatch.delenv(prefetch.ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert prefetch.default_workers() == expected
