"""The pieces of benchmarks/evidence.py whose mistakes would bend its verdicts: the Holm correction, the percentile
rank, the layouts counted, the inserted conv and the Tucker-2 control. The figures themselves are a benchmark."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import evidence  # benchmarks/ is on sys.path (conftest.py)

pytestmark = pytest.mark.threads(1)


def test_holm_matches_a_hand_computation():
    # p sorted: 0.01, 0.02, 0.04, 0.5 with m = 4: 4*0.01 = 0.04; 3*0.02 = 0.06; 2*0.04 = 0.08; 1*0.5 = 0.5
    got = evidence.holm({"a": 0.04, "b": 0.01, "c": 0.5, "d": 0.02})
    assert got == pytest.approx({"b": 0.04, "d": 0.06, "a": 0.08, "c": 0.5})
    # monotone: a later raw p smaller after scaling still gets at least the earlier adjusted value
    got = evidence.holm({"x": 0.01, "y": 0.012})  # 2*0.01 = 0.02, 1*0.012 = 0.012 -> 0.02
    assert got["y"] == pytest.approx(0.02)
    assert evidence.holm({"z": float("nan")}) == {"z": 1.0}


def test_percentile_rank_counts_ties_half():
    accs = np.array([[80.0, 82.0], [70.0, 70.0], [81.0, 81.0], [90.0, 90.0]])  # means 81, 70, 81, 90
    # layout 0 (81): one other below (70), one tie (81), one above (90): (1 + 0.5) / 3
    assert evidence.percentile(accs, 0) == pytest.approx(50.0)
    assert evidence.percentile(accs, 3) == pytest.approx(100.0)
    assert evidence.percentile(accs, 1) == pytest.approx(0.0)


def test_equal_count_layouts_are_all_compositions():
    # 6 convs over 4 stages, at least one each: C(5, 3) = 10 (stars and bars); none has a part above 3
    got = evidence.compositions(6)
    assert len(got) == 10 == len(set(got)) and all(sum(c) == 6 and min(c) >= 1 for c in got)
    # 8 convs, 1-4 per stage: C(7, 3) = 35 compositions minus the 4 with a 5 (5, 1, 1, 1 in any order) = 31
    assert len(evidence.compositions(8)) == 31


def test_inserted_conv_keeps_the_shape_and_dilation_keeps_the_params():
    plain = evidence.vgg("digits", (1, 1, 2, 2), insert=(1, 3, 1))
    dilated = evidence.vgg("digits", (1, 1, 2, 2), insert=(1, 3, 2))
    x = torch.randn(2, 1, 16, 16)
    assert plain(x).shape == dilated(x).shape == (2, 10)
    assert evidence.count_params(plain) == evidence.count_params(dilated)
    assert dilated.inserted.dilation == (2, 2) and dilated.inserted.padding == (2, 2)


def test_tucker2_at_full_rank_computes_the_conv():
    """At rho = 1 the HOSVD is exact: the three-conv block must compute the original conv's output (the oracle is
    the original layer itself, run on the same input)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=2, dilation=2))
    x = torch.randn(2, 1, 9, 9)
    full = evidence.tucker2(net, 1.0)
    assert isinstance(full[2], nn.Sequential) and isinstance(full[0], nn.Conv2d)  # the first conv (1 input) kept
    torch.testing.assert_close(full(x), net(x), rtol=1e-4, atol=1e-5)
    low = evidence.tucker2(net, 0.5)  # ranks ceil(3) and ceil(2.5): fewer MACs, a different function
    assert low[2][0].out_channels == 3 and low[2][1].out_channels == 3
    assert not torch.allclose(low(x), net(x))


def test_paired_difference_statistics():
    t = evidence.paired([3.0, 5.0, 4.0], [1.0, 2.0, 3.0])  # differences 2, 3, 1: mean 2, sd 1
    assert t["mean"] == pytest.approx(2.0) and t["sd"] == pytest.approx(1.0)
    assert t["ci"] == pytest.approx(4.302652729911275 / math.sqrt(3))  # t(0.975, 2) = 4.3027
    assert (t["wins"], t["losses"]) == (3, 0)


def test_the_reports_evidence_lines_match_the_committed_verdicts():
    """fxrf optimize prints one evidence line under the organizer's and the decomposer's changes
    (fxrf.optimize_report.EVIDENCE); what those lines claim must be what docs/evidence.json measured."""
    import json
    import os

    import evidence_report
    from fxrf.optimize_report import EVIDENCE
    with open(os.path.join(evidence_report.ROOT, "docs", "evidence.json")) as f:
        doc = json.load(f)
    assert doc["mode"] == "full" and doc["seeds"] >= 10
    rows = {(claim, task): verdict for claim, task, _, _, verdict in evidence_report.verdicts(doc)}
    org = doc["sections"]["organizer"]
    adjusted = doc["adjusted"]["primary"]
    # "on three small tasks this organizer's layouts were not resolved better than a random layout with as many
    # convs (best case ... Holm p 0.06), and its insertions added nothing resolved over its removals"
    assert "three small tasks" in EVIDENCE["stages"] and len(org) == 3
    for task in org:
        assert not rows[("the organizer places convs better than a random layout with as many convs",
                         evidence_report.TASK_NAMES[task])].startswith("supported")
        assert adjusted[f"organizer|{task}|organizer - random layout"] >= 0.05
        t = org[task]["tests"]["organizer - remove-only"]
        assert t["mean"] <= 0 or adjusted[f"organizer|{task}|organizer - remove-only"] >= 0.05
    best = max(org.values(), key=lambda o: o["tests"]["organizer - random layout"]["mean"])
    t = best["tests"]["organizer - random layout"]
    assert f"+{t['mean']:.1f} +- {t['ci']:.1f} points" in EVIDENCE["stages"]
    # "fxrf.prune ... as accurate or more (same-distance task: +3.1 points) and a thinner standard net ... as
    # accurate or more (digits: +2.4)": the decomposition never resolved better than either
    dec = doc["sections"]["decomposer"]
    for task, d in dec.items():
        for arm in ("thinner net", "fxrf.prune"):
            t = d["tests"][f"decompose (LS) - {arm}"]
            assert t["mean"] <= 0 or t["p"] >= 0.05, (task, arm, t)
    assert f"+{-dec['same_distance']['tests']['decompose (LS) - fxrf.prune']['mean']:.1f} points" in EVIDENCE["kernels"]
    assert f"+{-dec['digits']['tests']['decompose (LS) - thinner net']['mean']:.1f}" in EVIDENCE["kernels"]
