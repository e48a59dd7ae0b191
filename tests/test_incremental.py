"""Incremental analysis: `fxrf.analysis.extend` (the records of nodes inserted after one node, from that node's
fields) against a whole `fxrf.analyze` of the same graph, and the organizer with it against the organizer that
analyses every graph whole. Both must agree exactly: records, fields, the changes chosen and the output graph."""
import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import HealthCheck, event, given, settings
from torch.fx._lazy_graph_module import _LazyGraphModule

import fxrf
from fxrf.analysis import extend, reanalyze
from fxrf.passes.organizer import context
from fxrf.passes.organizer.sites import sites as stage_sites
from fxrf.passes.organizer.units import insert_unit
from fxrf.passes.surgery import add_modules, insert_after
from random_cnn import assume_runnable, random_cnns
import tv_models

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _field(f):
    """A Field's whole content (None stays None): reaches, per-channel index, grid, taps."""
    if f is None:
        return None
    return (f.bits.tolist(), f.spans.tolist(), np.asarray(f.idx).tolist(), f.jump, f.sp, f.size,
            None if f.taps is None else [t.tolist() for t in f.taps])


def _same_record(got, want):
    assert got == want  # every compared field of the NodeRecord: rf, gain, input_rf, local_rf, local_gain, ...
    assert _field(got.field) == _field(want.field)
    assert _field(got.input_field) == _field(want.input_field)


def _trial(gm):
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}), type_expr=None)
    return _LazyGraphModule(gm, graph)


def _check_every_site(model, shape, **kw):
    """extend's records of the organizer's unit at every site of every stage == a whole analysis' records.
    Returns how many sites were checked."""
    a = fxrf.analyze(model, shape, **kw)
    checked = 0
    for stage in a.stages:
        for place, site in stage_sites(a, stage, 3).items():
            if isinstance(site, str):
                continue
            trial = _trial(a.graph_module)
            nodes = insert_unit(trial, site, meta=True)
            got = extend(a, trial, nodes)
            assert got is not None, f"extend declined the organizer's unit at {site.point} ({place})"
            whole = fxrf.analyze(trial, shape, **kw)
            for n in nodes:
                _same_record(got[n.name], whole.record(n.name))
            checked += 1
    return checked


@FAST
@given(random_cnns())
def test_extend_equals_a_whole_analysis_random_cnns(case):
    model, shape = case
    assume_runnable(model, shape)
    n = _check_every_site(model, shape)
    event(f"sites checked: {min(n, 3)}{'+' if n >= 3 else ''}")
    _check_every_site(model, shape, spatial_cap=False)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0", "densenet121", "convnext_tiny",
                                  "vit_b_16", "swin_t"])
def test_extend_equals_a_whole_analysis_torchvision(name):
    model = tv_models.build(name)
    size = tv_models.input_size(name, model)
    assert _check_every_site(model, (1, 3, size, size)) >= 1


def _same_analysis(got, want):
    assert got is not None
    assert (got.stages, got.unsupported, got.warnings, got.model, got.input_shape) == \
        (want.stages, want.unsupported, want.warnings, want.model, want.input_shape)
    assert [r.name for r in got.records] == [r.name for r in want.records]
    for r, q in zip(got.records, want.records):
        _same_record(r, q)


def _check_reanalyze(model, shape, **kw):
    """reanalyze after the organizer's unit at every site == a whole analysis of the graph with the unit."""
    a = fxrf.analyze(model, shape, **kw)
    checked = 0
    for stage in a.stages:
        for place, site in stage_sites(a, stage, 3).items():
            if isinstance(site, str):
                continue
            gm = fxrf.trace(model, shape)
            base = fxrf.analyze(gm, shape, **kw)
            nodes = insert_unit(gm, site, meta=True)
            got = reanalyze(base, gm, nodes)
            _same_analysis(got, fxrf.analyze(gm, shape, **kw))
            checked += 1
    return checked


@FAST
@given(random_cnns())
def test_reanalyze_equals_a_whole_analysis_random_cnns(case):
    model, shape = case
    assume_runnable(model, shape)
    n = _check_reanalyze(model, shape)
    event(f"sites checked: {min(n, 3)}{'+' if n >= 3 else ''}")
    _check_reanalyze(model, shape, spatial_cap=False)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
                                  "convnext_tiny", "vit_b_16", "swin_t", "inception_v3"])
def test_reanalyze_equals_a_whole_analysis_torchvision(name):
    model = tv_models.build(name)
    size = tv_models.input_size(name, model)
    assert _check_reanalyze(model, (1, 3, size, size)) >= 1


def _chain(gm, point, modules, calls=()):
    """Insert modules ({name: module}, in order) and then functional `calls` after the node named `point`."""
    add_modules(gm, "extra", modules, training=False)
    node = next(n for n in gm.graph.nodes if n.name == point)
    return insert_after(gm, node, [("call_module", f"extra.{k}", (), {}) for k in modules] + list(calls))


@pytest.mark.parametrize("make, ok", [
    (lambda c: {"conv": nn.Conv2d(c, c, 3, padding=2, dilation=2)}, True),  # holes in the taps
    (lambda c: {"conv": nn.Conv2d(c, c, 5, padding=2, groups=c), "act": nn.GELU()}, True),  # depthwise
    (lambda c: {"conv": nn.Conv2d(c, c, 1), "norm": nn.BatchNorm2d(c), "act": nn.ReLU(inplace=True)}, True),
    (lambda c: {"act": nn.ReLU(inplace=True)}, False),  # writes into the point itself
    (lambda c: {"conv": nn.Conv2d(c, c, 3, stride=2, padding=1)}, False),  # another grid: stages change
    (lambda c: {"conv": nn.Conv2d(c, 2 * c, 3, padding=1)}, False),  # another shape
    (lambda c: {"pool": nn.MaxPool2d(3, 1, 1)}, True),
])
def test_extend_on_other_chains(make, ok):
    """Chains other than the organizer's unit: extend gives the whole analysis' records, or declines (None)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    shape = (1, 3, 16, 16)
    a = fxrf.analyze(net, shape)
    for point in ("_1", "_4"):  # in stage 0 and in stage 1
        trial = _trial(a.graph_module)
        nodes = _chain(trial, point, make(8))
        got = extend(a, trial, nodes)
        assert (got is not None) == ok
        if got is not None:
            whole = fxrf.analyze(trial, shape)
            for n in nodes:
                _same_record(got[n.name], whole.record(n.name))


def _result(r):
    """Everything organize_stages returns, comparable."""
    a = r.analysis
    return (r.changes, r.declined, r.summary, r.graph_module.code, type(r.graph_module).__name__, a.model,
            a.stages, a.unsupported, a.warnings, [(x, _field(x.field), _field(x.input_field)) for x in a.records],
            a.costs)


def _both(monkeypatch, model, shape, **kw):
    monkeypatch.setattr(context, "INCREMENTAL", True)
    fast = fxrf.organize_stages(model, shape, **kw)
    monkeypatch.setattr(context, "INCREMENTAL", False)
    whole = fxrf.organize_stages(model, shape, **kw)
    return _result(fast), _result(whole)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(random_cnns())
def test_organizer_equals_whole_analyses_random_cnns(monkeypatch, case):
    model, shape = case
    assume_runnable(model, shape)
    for kw in ({}, {"threshold": 0.0, "macs_budget": None, "max_insertions": 4}, {"strategy": "paper"}):
        fast, whole = _both(monkeypatch, model, shape, **kw)
        assert fast == whole
        event(f"changes: {min(len(fast[0]), 3)}{'+' if len(fast[0]) >= 3 else ''}")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0", "vit_b_16"])
def test_organizer_equals_whole_analyses_torchvision(monkeypatch, name):
    model = tv_models.build(name)
    size = tv_models.input_size(name, model)
    fast, whole = _both(monkeypatch, model, (1, 3, size, size))
    assert fast == whole
    assert fast[0], "the organizer changed nothing: the comparison would be empty"
