"""The analysis' shortcuts give what the general path gives.

The walk skips work where it can tell the result beforehand: a per-element op or a running-statistics batch norm
hands its input's field on (`_Walker._passes_on`), the usual conv is mixed and slid in one step (`rules.conv.
_one_reach`), an operand already in the output's layout is not broadcast (`rules.elementwise._align`), one-reach
operands in that layout are united directly (`rules.elementwise._one_reach_union`), and fields
remember facts about their reaches (`_union`, `_counts`, `_per_reach`) that let a residual add and the summaries
skip passes over thousands of rows. Each test here takes its expected values from the general path (shortcuts
switched off) or from the facts' definitions, never from the shortcut itself.
"""
from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fxrf
from fxrf import field as F
from fxrf import walk
from fxrf.ops import OpTable
from fxrf.records import NodeRecord
from fxrf.rules import conv as conv_rules
from fxrf.rules import elementwise
from random_cnn import assume_runnable, random_cnns
from test_field import programs

PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _forgetful(f):
    """The same field without anything remembered about its reaches (what the general path starts from)."""
    return None if f is None else F.Field(f.bits, f.spans, f.idx, f.jump, f.sp, f.taps, f.size)


@contextlib.contextmanager
def general_path():
    """Every shortcut off: rules called for every node, mix then slide, operands broadcast, merges that know
    nothing of their operands' reaches."""
    merge = F.merge
    with mock.patch.object(walk._Walker, "_passes_on", lambda self, node, mod, op: None), \
            mock.patch.object(conv_rules, "_one_reach", lambda *a: None), \
            mock.patch.object(elementwise, "_align", elementwise._broadcast_field), \
            mock.patch.object(elementwise, "_one_reach_union", lambda *a: None), \
            mock.patch.object(F, "merge", lambda fields, shape, sp: merge([_forgetful(f) for f in fields], shape, sp)):
        yield


def _arrays(f):
    if f is None:
        return None
    return (f.bits.tolist(), f.bits.dtype, f.spans.tolist(), f.spans.dtype, np.asarray(f.idx).tolist(),
            np.shape(f.idx), f.jump, f.sp, f.size, None if f.taps is None else [t.tolist() for t in f.taps])


def _same_analysis(a, b):
    assert [s for s in a.stages] == [s for s in b.stages]
    assert a.unsupported == b.unsupported and a.warnings == b.warnings
    assert len(a.records) == len(b.records)
    for r, g in zip(a.records, b.records):
        assert isinstance(r, NodeRecord) and r == g, (r, g)  # every field but the Field objects
        assert _arrays(r.field) == _arrays(g.field), r.name
        assert _arrays(r.input_field) == _arrays(g.input_field), r.name


def _facts_hold(a):
    """Every fact a field remembers equals its definition over the field's arrays."""
    for r in a.records:
        for f in (r.field, r.input_field):
            if f is None:
                continue
            known = f.__dict__
            if "_union" in known:
                assert known["_union"].tolist() == np.bitwise_or.reduce(f.bits, axis=0).tolist(), r.name
            if "_counts" in known:
                assert known["_counts"].tolist() == np.bitwise_count(f.bits).sum(axis=1).tolist(), r.name
            if "_bounds" in known:
                assert known["_bounds"].tolist() == F._hull(f.spans).tolist(), r.name
            if "_full" in known:
                assert known["_full"] == (not (f.spans[:, 0::2] > f.spans[:, 1::2]).any()), r.name
            if known.get("_one_row"):
                assert (f.bits == f.bits[0]).all() and (f.spans == f.spans[0]).all() and f.taps is None, r.name
            if "_per_reach" in known:
                assert known["_per_reach"].tolist() == np.bincount(np.asarray(f.idx).ravel(),
                                                                   minlength=len(f.bits)).tolist(), r.name


@PROPERTY
@given(random_cnns(max_ops=8))
def test_random_cnn_analysis_equals_the_general_path(case):
    model, shape = case
    assume_runnable(model, shape)
    for cap in (True, False):
        fast = fxrf.analyze(model, shape, spatial_cap=cap)
        with general_path():
            slow = fxrf.analyze(model, shape, spatial_cap=cap)
        _same_analysis(fast, slow)
        _facts_hold(fast)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_analysis_equals_the_general_path(name):
    """Residual stages (a stage field of one reach per channel plus a one-reach branch), squeeze-excite gates."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    fast = fxrf.analyze(model, (1, 3, 64, 64))
    with general_path():
        slow = fxrf.analyze(model, (1, 3, 64, 64))
    _same_analysis(fast, slow)
    _facts_hold(fast)


@st.composite
def one_reach_convs(draw):
    """A one-reach field of a 2-d map (a model field, or a stage field with its map size), the input's shape and a
    conv over it."""
    c0, h, w = draw(st.integers(1, 4)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    stage = draw(st.booleans())
    f = F.identity((c0,), 2, map_size=(h, w) if stage else None)
    cin = draw(st.sampled_from([1, 2, 4, 6]))
    f = F.mix(f, cin)  # one reach
    k0, s0 = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2]))
    f = F.window(f, (k0, k0), (s0, s0), (k0 // 2, k0 // 2), (1, 1))  # moved bounds, maybe a coarser grid
    kernel = tuple(draw(st.sampled_from([1, 2, 3, 5])) for _ in range(2))
    groups = draw(st.sampled_from([g for g in (1, 2, cin) if cin % g == 0]))
    out = groups * draw(st.integers(1, 2))
    spec = conv_rules.ConvSpec(cin, out, groups, kernel, tuple(draw(st.sampled_from([1, 2, 3])) for _ in range(2)),
                               tuple(draw(st.integers(0, 3)) for _ in range(2)),
                               tuple(draw(st.sampled_from([1, 2])) for _ in range(2)))
    return f, (1, cin, draw(st.integers(1, 9)), draw(st.integers(1, 9))), spec


@settings(max_examples=200, deadline=None, derandomize=True)
@given(one_reach_convs())
def test_one_reach_conv_equals_mix_then_slide(case):
    f, shape, spec = case
    got = conv_rules._one_reach(f, shape, spec)
    if got is None:  # declined (a window with holes on a stage field): the general path handles it
        assert f.size is not None
        return
    sizes = [n + 2 * p - d * (k - 1) - 1 for n, k, p, d in zip(shape[2:], spec.kernel, spec.padding, spec.dilation)]
    assume(all(x >= 0 for x in sizes))  # else no output pixel: not a conv torch would run
    out_shape = (1, spec.out_channels) + tuple(x // s + 1 for x, s in zip(sizes, spec.stride))
    g = F.mix(f, spec.out_channels, spec.groups, axis=f.idx_axis(-len(spec.kernel) - 1))
    want = conv_rules._slide(g, shape, spec.kernel, spec.stride, spec.padding, spec.dilation, out_shape)
    assert _arrays(got) == _arrays(want)


spans_rows = st.integers(1, 6).flatmap(lambda d: st.tuples(
    hnp.arrays(np.float64, st.tuples(st.integers(1, 8), st.just(2 * d)), elements=st.integers(-4, 4).map(float)),
    hnp.arrays(np.float64, st.just(2 * d), elements=st.integers(-4, 4).map(float))))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(spans_rows)
def test_union_row_equals_union_spans_broadcast(case):
    a, row = case
    want = F._union_spans(a, np.broadcast_to(row, a.shape))
    got = F._union_row(a, row)
    assert got.dtype == want.dtype and got.tolist() == want.tolist()
    assert F._empty_rows(a).tolist() == (a[:, 0::2] > a[:, 1::2]).any(axis=1).tolist()


@settings(max_examples=150, deadline=None, derandomize=True)
@given(programs(dilations=(1, 2, 3)), st.booleans())
def test_summary_extent_and_counts_equal_their_per_reach_definitions(prog, capped):
    f, _, n = prog
    for g in (f, _forgetful(f)):
        (ext,), cmin, cmean = g.summary((n,), (n,), capped)
        assert ext == int(g._reach_extents((n,), (n,), capped).max(axis=0)[0])
        counts = np.bitwise_count(g.bits).sum(axis=1)
        per_channel = counts[np.asarray(g.idx).ravel()]
        assert cmin == int(per_channel.min()) and cmean == pytest.approx(float(per_channel.mean()), abs=1e-12)


def test_op_table_truth_is_whether_it_has_ops():
    empty = OpTable()
    assert not empty and len(empty) == 0
    empty.op(torch.nn.Hardshrink)(lambda call: call.args[0].field)
    assert empty and len(empty) == 1
    assert fxrf.ops.DEFAULT and len(fxrf.ops.DEFAULT) > 0
