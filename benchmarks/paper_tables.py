"""The paper's tables, recomputed by fxrf and printed beside the paper's figures.

    python benchmarks/paper_tables.py                              # print
    python benchmarks/paper_tables.py --out docs/reproduction.md   # also write the Markdown page

Sections: Table 2 (the 3DRF gain of the conv inserted into VGG-11), Tables 3-5 (params and MACs of every baseline
row; then every -opt row as `fxrf.organize_stages(strategy="paper")` finds it: layout, params, MACs and
Delta-3DRF), the 3DRF of every stage of every baseline (which stages are saturated), and Table 6
(benchmarks/table6.py). The paper's "MFLOPs" are MACs (multiply-accumulates of conv and linear layers) rounded to 10M
(docs/paper.md). Nothing is trained and nothing is downloaded: the ImageNet VGG16/VGG19/ResNet50 rows are
torchvision's models built on the meta device (shapes only) at 224x224. The -opt rows take a few minutes.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import warnings

import torch

import fxrf
from fxrf.cost import total
from fxrf.models import (mobilenet_v1_cifar, mobilenet_v1_imagenet, resnet50_cifar, vgg11_variant, vgg16_cifar,
                         vgg16_cifar100, vgg19_cifar, vgg19_cifar100, vgg_cifar)
from fxrf.report import rf_text, stage_summaries

ALPHA = 3.0
MACS_TOLERANCE = 0.02  # relative; a figure that rounds to the paper's 10M step passes too

# ------------------------------------------------------------------------------------------------- data

# Table 2: gain of the conv inserted before the i-th max pool of VGG-11 (CIFAR-10, 32x32).
TABLE2_PAPER = {1: "1.73", 2: "1.60", 3: "0.29", 4: "0.0", 5: "0.0"}
# The closed forms of docs/paper.md, an independent check of the analysis (alpha = 3).
TABLE2_CLOSED = {1: 16 / 9 * math.exp(-9 * ALPHA / 1024), 2: 16 / 9 * math.exp(-9 * ALPHA / 256),
                 3: 24 / 25 * math.exp(-25 * ALPHA / 64), 4: 0.0, 5: 0.0}


def _tv(name):
    def build():
        import torchvision.models as tvm
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return tvm.get_model(name, weights=None)
    build.__name__ = f"torchvision:{name}"
    return build


# (dataset, network, how fxrf builds it, factory, kwargs, input side, paper MFLOPs, paper params) of Tables 3-5.
BASELINES = [
    ("CIFAR-10", "VGG16", "fxrf:vgg16_cifar", vgg16_cifar, {}, 32, 310, "14.73"),
    ("CIFAR-10", "VGG19", "fxrf:vgg19_cifar", vgg19_cifar, {}, 32, 400, "20.04"),
    ("CIFAR-10", "MobileNet", "fxrf:mobilenet_v1_cifar", mobilenet_v1_cifar, {}, 32, 50, "3.22"),
    ("CIFAR-10", "ResNet50", "fxrf:resnet50_cifar", resnet50_cifar, {}, 32, 1300, "23.52"),
    ("CIFAR-100", "VGG16", "fxrf:vgg16_cifar100", vgg16_cifar100, {}, 32, 330, "34.02"),
    ("CIFAR-100", "VGG19", "fxrf:vgg19_cifar100", vgg19_cifar100, {}, 32, 420, "39.33"),
    ("CIFAR-100", "MobileNet", "mobilenet_v1_cifar(100)", mobilenet_v1_cifar, {"num_classes": 100}, 32, 50, "3.32"),
    ("CIFAR-100", "ResNet50", "resnet50_cifar(100)", resnet50_cifar, {"num_classes": 100}, 32, 1310, "23.71"),
    ("ImageNet", "VGG16", "torchvision:vgg16", _tv("vgg16"), {}, 224, 15500, "138.36"),
    ("ImageNet", "VGG19", "torchvision:vgg19", _tv("vgg19"), {}, 224, 19670, "143.67"),
    ("ImageNet", "MobileNet", "fxrf:mobilenet_v1_imagenet", mobilenet_v1_imagenet, {}, 224, 580, "4.23"),
    ("ImageNet", "ResNet50", "torchvision:resnet50", _tv("resnet50"), {}, 224, 4120, "25.56"),
]

# Known, explained departures from the paper (printed as footnotes, never hidden).
DEPARTURES = {
    ("CIFAR-100", "MobileNet", "params"): (
        "Table 4's 3.32M cannot be reached with the CIFAR MobileNet that gives Table 3's 3.22M (docs/paper.md): a "
        "100-class head Linear(1024, 100) adds 90 x 1025 = 92,250 parameters, 3,217,226 -> 3,309,476 = 3.31M. "
        "Printing 3.32M takes at least 3,315,000 (5,524 more); left as a mismatch (see tests/test_models.py)."),
    ("ImageNet", "MobileNet", "macs"): (
        "568.7M MACs round to 570, not the paper's 580 (1.9% low, inside the 2% tolerance); 569M is also what "
        "the MobileNet v1 paper (Howard et al. 2017, Table 8) gives for this layout."),
    ("CIFAR-10", "MobileNet", "macs"): (
        "46.4M MACs are 7% under 50 but round to 50 at the paper's precision (10M)."),
    ("CIFAR-100", "MobileNet", "macs"): (
        "as for CIFAR-10: 46.4M MACs round to the paper's 50."),
}


# ------------------------------------------------------------------------------------------------- helpers


def _fmt_table(header, rows, right=None) -> list:
    """Plain-text columns: left-aligned text, right-aligned numbers (columns flagged in `right`)."""
    right = right or [False] * len(header)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).rjust(w) if ra else str(c).ljust(w)
                         for c, w, ra in zip(cells, widths, right)).rstrip()

    return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def _analyze(factory, kwargs, side):
    model = factory(**kwargs)
    return fxrf.analyze(model, (1, 3, side, side), alpha=ALPHA)


def _ratio(ours, paper) -> str:
    return f"{ours / paper:.3f}" if paper else "-"


# ------------------------------------------------------------------------------------------------- sections


def table2() -> list:
    out = ["Table 2: 3DRF gain of the conv inserted into VGG-11 (CIFAR-10, 1x3x32x32, alpha = 3)",
           "  gain of the inserted conv = the gain of the last conv of the stage at 32/2^(i-1) px", ""]
    rows, notes = [], []
    for i in range(1, 6):
        a = _analyze(vgg11_variant, {"i": i}, 32)
        side = 32 // 2 ** (i - 1)
        stage = next(s for s in stage_summaries(a) if tuple(s.stage.resolution) == (side, side))
        last = stage.convs[-1]
        g = last.gain
        paper = float(TABLE2_PAPER[i])
        ok = (g == 0) if paper == 0 else abs(g - paper) < 0.01
        rows.append([f"Variant-{i}", f"{side}x{side}", last.name, f"{rf_text(last.rf)}", f"{g:.4f}",
                     f"{TABLE2_CLOSED[i]:.4f}", TABLE2_PAPER[i], _ratio(g, paper), "ok" if ok else "MISMATCH"])
        if paper and ok and f"{g:.2f}" != TABLE2_PAPER[i]:
            notes.append(f"  Variant-{i}: {g:.4f} rounds to {g:.2f}; the paper prints {TABLE2_PAPER[i]} "
                         f"(within its last digit: |diff| = {abs(g - paper):.4f} < 0.01).")
    out += ["  " + s for s in _fmt_table(
        ["network", "stage", "inserted conv", "3DRF", "gain", "closed form", "paper", "ratio", "check"], rows,
        [False, False, False, True, True, True, True, True, False])]
    out += [""] + (["  notes:"] + notes if notes else [])
    return out


def tables345(analyses) -> list:
    out = ["Tables 3-5: params and MACs of the baselines (batch 1)",
           "  params: every parameter of the model; check = equal to the paper's printed digits.",
           "  MACs: multiply-accumulates of conv and linear layers, in millions (the paper's \"MFLOPs\", rounded",
           f"  to 10M); check = within {MACS_TOLERANCE:.0%} of the paper or equal to it once rounded to 10M.",
           ""]
    footnotes = []
    for dataset, table in (("CIFAR-10", "Table 3"), ("CIFAR-100", "Table 4"), ("ImageNet", "Table 5")):
        rows = []
        for (ds, net, spec, *_rest, paper_macs, paper_params) in BASELINES:
            if ds != dataset:
                continue
            c = total(analyses[(ds, net)].costs)
            params_m = f"{c.params / 1e6:.2f}"
            p_ok = params_m == paper_params
            macs_m = c.macs / 1e6
            rounded = int(round(macs_m / 10)) * 10
            m_ok = abs(macs_m - paper_macs) <= MACS_TOLERANCE * paper_macs or rounded == paper_macs
            marks = ""
            for what in ("params", "macs"):
                if (ds, net, what) in DEPARTURES:
                    footnotes.append((ds, net, what))
                    marks += f"[{len(footnotes)}]"
            rows.append([net, spec, f"{c.params:,}", params_m + "M", paper_params + "M",
                         _ratio(c.params / 1e6, float(paper_params)), "ok" if p_ok else "MISMATCH",
                         f"{macs_m:,.1f}", f"{rounded:,}", f"{paper_macs:,}", _ratio(macs_m, paper_macs),
                         "ok" if m_ok else "MISMATCH", marks])
        out.append(f"  {table} ({dataset})")
        out += ["  " + s for s in _fmt_table(
            ["network", "built as", "params", "ours", "paper", "ratio", "check", "MACs (M)", "~10M", "paper",
             "ratio", "check", "note"], rows,
            [False, False, True, True, True, True, False, True, True, True, True, False, False])]
        out.append("")
    out.append("  notes:")
    for k, key in enumerate(footnotes, 1):
        ds, net, what = key
        out += _wrap(f"[{k}] {ds} {net} {'params' if what == 'params' else 'MACs'}: {DEPARTURES[key]}", "  ", 100)
    return out


# The -opt rows of Tables 3-5: (paper MFLOPs, paper params, paper Delta-3DRF), keyed like BASELINES.
OPT = {
    ("CIFAR-10", "VGG16"): (370, "5.10", "2.30"), ("CIFAR-10", "VGG19"): (490, "8.09", "3.13"),
    ("CIFAR-10", "MobileNet"): (50, "1.13", "3.94"), ("CIFAR-10", "ResNet50"): (1310, "17.24", "0.76"),
    ("CIFAR-100", "VGG16"): (390, "24.39", "2.30"), ("CIFAR-100", "VGG19"): (500, "27.38", "3.13"),
    ("CIFAR-100", "MobileNet"): (50, "1.23", "3.94"), ("CIFAR-100", "ResNet50"): (1380, "21.89", "0.76"),
    ("ImageNet", "VGG16"): (16900, "133.82", "0.39"), ("ImageNet", "VGG19"): (21060, "141.34", "1.09"),
    ("ImageNet", "MobileNet"): (570, "3.52", "2.59"), ("ImageNet", "ResNet50"): (4130, "23.67", "0.47"),
}
DELTA_TOLERANCE = 0.01  # the paper prints two decimals


def _tv_vgg(stage_convs):
    """torchvision's ImageNet VGG (no BN) with the given conv count per stage, on the meta device."""
    from torchvision.models.vgg import VGG, make_layers
    cfg = [v for n, w in zip(stage_convs, (64, 128, 256, 512, 512)) for v in [w] * n + ["M"]]
    with torch.device("meta"):
        return VGG(make_layers(cfg), num_classes=1000, init_weights=False)


# How to build a VGG of any layout, for the rows where the paper's params fit another layout than its Delta-3DRF.
VGG_BUILDERS = {
    ("CIFAR-10", "VGG16"): lambda L: vgg_cifar(L), ("CIFAR-10", "VGG19"): lambda L: vgg_cifar(L),
    ("CIFAR-100", "VGG16"): lambda L: vgg_cifar(L, num_classes=100, classifier="mlp"),
    ("CIFAR-100", "VGG19"): lambda L: vgg_cifar(L, num_classes=100, classifier="mlp"),
    ("ImageNet", "VGG16"): _tv_vgg, ("ImageNet", "VGG19"): _tv_vgg,
}


def _organize(factory, kwargs, side, **kw):
    return fxrf.organize_stages(factory(**kwargs), (1, 3, side, side), strategy="paper", alpha=ALPHA, **kw)


def _layout(convs) -> str:
    return ",".join(str(n) for n in convs if n) or "-"


def _checks(params, macs, delta, paper):
    """(params text, params ok, MACs text, MACs ok, Delta text, Delta ok) against one OPT entry."""
    p_macs, p_params, p_delta = paper
    macs_m = macs / 1e6
    m_ok = abs(macs_m - p_macs) <= MACS_TOLERANCE * p_macs or int(round(macs_m / 10)) * 10 == p_macs
    return (f"{params / 1e6:.2f}", f"{params / 1e6:.2f}" == p_params, macs_m, m_ok, delta,
            delta is not None and abs(delta - float(p_delta)) <= DELTA_TOLERANCE)


def _position_gains(build, stage_count, side, depth=12) -> list:
    """Per stage, the uncapped gain of its k-th conv for k = 1..depth (index k-1), from the analysis of a VGG of
    that depth: the position gains the paper's Delta-3DRF sums."""
    a = fxrf.analyze(build((depth,) * stage_count), (1, 3, side, side), alpha=ALPHA, spatial_cap=False)
    out = [[] for _ in range(stage_count)]
    for r in a.convs():
        out[r.stage].append(r.gain)
    return out


def _cost(build, layout, side):
    model = build(tuple(layout))
    return sum(p.numel() for p in model.parameters()), total(fxrf.analyze(model, (1, 3, side, side)).costs).macs


def _params_layouts(key, before, side, paper):
    """Every layout with the baseline's conv count (>= 1 per stage) whose params print as the paper's, with its
    MACs and Delta-3DRF (a VGG's cost is linear in the conv counts: one extra conv per stage costs the same)."""
    build = VGG_BUILDERS[key]
    n = len(before)
    base_params, base_macs = _cost(build, before, side)
    unit = []
    for s in range(n):
        layout = list(before)
        layout[s] += 1
        p, m = _cost(build, layout, side)
        unit.append((p - base_params, m - base_macs))
    gains = _position_gains(build, n, side)
    total_convs, found = sum(before), []
    for cut in itertools.combinations(range(1, total_convs), n - 1):  # compositions of the conv count
        layout = [b - a for a, b in zip((0,) + cut, cut + (total_convs,))]
        params = base_params + sum((x - y) * u[0] for x, y, u in zip(layout, before, unit))
        if f"{params / 1e6:.2f}" != paper[1] or max(layout) > len(gains[0]):
            continue
        macs = base_macs + sum((x - y) * u[1] for x, y, u in zip(layout, before, unit))
        delta = sum(sum(g[y:x]) if x > y else -sum(g[x:y]) for x, y, g in zip(layout, before, gains))
        assert (params, macs) == _cost(build, layout, side)  # the linear shortcut, checked on the real model
        found.append((layout, params, macs, delta))
    return found


def opt_rows() -> list:
    out = ["Tables 3-5, the -opt rows: fxrf.organize_stages(model, x, strategy=\"paper\") (alpha = 3)",
           "  the paper's rule (docs/paper.md): keep the baseline's number of convs, at least one per stage, and",
           "  put them where the 3DRF gain is highest; gains with the uncapped spatial field (spatial_cap=False).",
           "  Delta-3DRF = sum of the gains of the convs added - sum of the gains of the convs removed, each at its",
           "  position. layout = convs per stage (stages without convs left out). checks: params = the paper's",
           f"  printed digits; MACs as for the baselines; Delta-3DRF within {DELTA_TOLERANCE} of the paper.", ""]
    results = {}
    for dataset, table in (("CIFAR-10", "Table 3"), ("CIFAR-100", "Table 4"), ("ImageNet", "Table 5")):
        rows = []
        for (ds, net, spec, factory, kwargs, side, *_rest) in BASELINES:
            if ds != dataset:
                continue
            r = _organize(factory, kwargs, side)
            s = r.summary
            results[ds, net] = (r, side)
            paper = OPT[ds, net]
            params_m, p_ok, macs_m, m_ok, delta, d_ok = _checks(s["params_after"], s["macs_after"],
                                                                  s["delta_3drf"], paper)
            rows.append([f"{net}-opt", f"{_layout(s['convs_per_stage_before'])} -> {_layout(s['stage_convs'])}",
                         f"{s['params_after']:,}", params_m + "M", paper[1] + "M",
                         _ratio(s["params_after"] / 1e6, float(paper[1])), "ok" if p_ok else "MISMATCH",
                         f"{macs_m:,.1f}", f"{paper[0]:,}", _ratio(macs_m, paper[0]), "ok" if m_ok else "MISMATCH",
                         f"{delta:.3f}", paper[2], "ok" if d_ok else "MISMATCH"])
        out.append(f"  {table} ({dataset})")
        out += ["  " + x for x in _fmt_table(
            ["network", "layout (convs per stage)", "params", "ours", "paper", "ratio", "check", "MACs (M)",
             "paper", "ratio", "check", "Delta", "paper", "check"], rows,
            [False, False, True, True, True, True, False, True, True, True, False, True, True, False])]
        out.append("")
    out += _contradictions(results) + _no_cap(results) + _branchy(results)
    return out


def _contradictions(results) -> list:
    """Rows whose params fit one layout while Delta-3DRF (and MACs) fit the one the rule finds: show both."""
    out = []
    for key, (r, side) in results.items():
        s = r.summary
        paper = OPT[key]
        _, p_ok, _, _, _, d_ok = _checks(s["params_after"], s["macs_after"], s["delta_3drf"], paper)
        if p_ok or not d_ok or key not in VGG_BUILDERS:
            continue
        before = [n for n in s["convs_per_stage_before"] if n]
        found = _params_layouts(key, before, side, paper)
        out += _wrap(f"{key[0]} {key[1]}-opt: the paper contradicts itself. Its Delta-3DRF {paper[2]} and its "
                     f"{paper[0]:,} MFLOPs are the rule's layout {_layout(s['stage_convs'])} (Delta "
                     f"{s['delta_3drf']:.3f}, {s['macs_after'] / 1e6:,.1f}M MACs), whose params are "
                     f"{s['params_after'] / 1e6:.2f}M; its {paper[1]}M params fit only these layouts of "
                     f"{sum(before)} convs (one of which has the same MACs, none the Delta-3DRF):", "  ", 108, "")
        rows = []
        for layout, params, macs, delta in found:
            _, p_ok2, macs_m, m_ok2, _, d_ok2 = _checks(params, macs, delta, paper)
            rows.append([_layout(layout), f"{params:,}", f"{params / 1e6:.2f}M", "ok" if p_ok2 else "MISMATCH",
                         f"{macs_m:,.1f}", "ok" if m_ok2 else "MISMATCH", f"{delta:.3f}",
                         "ok" if d_ok2 else "MISMATCH"])
        out += ["    " + x for x in _fmt_table(
            ["layout", "params", "ours", "check", "MACs (M)", "check", "Delta", "check"], rows,
            [False, True, True, False, True, False, True, False])] if rows else ["    (none)"]
        out.append("")
    return out


def _no_cap(results) -> list:
    """Why the tables imply an uncapped spatial field: the same rule with the poster's cap, CIFAR-10 VGG16/19."""
    out = ["  Why the tables imply no cap on the spatial field: the same rule with the poster's min(., w_0)",
           "  (spatial_cap=True) gives"]
    rows = []
    for net, factory in (("VGG16", vgg16_cifar), ("VGG19", vgg19_cifar)):
        paper = OPT["CIFAR-10", net]
        for cap in (True, False):
            s = _organize(factory, {}, 32, spatial_cap=cap).summary
            _, p_ok, _, _, delta, d_ok = _checks(s["params_after"], s["macs_after"], s["delta_3drf"], paper)
            rows.append([f"{net}-opt", "capped" if cap else "uncapped", _layout(s["stage_convs"]),
                         f"{s['params_after'] / 1e6:.2f}M", paper[1] + "M", "ok" if p_ok else "MISMATCH",
                         f"{delta:.3f}", paper[2], "ok" if d_ok else "MISMATCH"])
    out += ["    " + x for x in _fmt_table(["network", "field", "layout", "params", "paper", "check", "Delta",
                                            "paper", "check"], rows,
                                           [False, False, False, True, True, False, True, True, False])]
    out += _wrap("With the cap, the 2nd conv of VGG16's 4x4 stage has gain (7/9) e^(-27/16) = 0.144 and every conv "
                 "after it 0, so the removed convs sum to less and Delta-3DRF comes out too high; without it that conv "
                 "has (16/9) e^(-27/16) = 0.329 and the sum is the paper's. Table 2 reads the same either way "
                 "(variants 4 and 5 become 0.0088 and 7e-9, printed 0.0).", "  ", 108, "")
    return out + [""]


def _branchy(results) -> list:
    """What the conv-level rule gives for MobileNet and ResNet50, and the same without the MACs budget."""
    out = _wrap("MobileNet and ResNet50: a position is a conv (the rule above); removable are convs that keep the "
                "width and are not the only conv of a residual branch (a bottleneck's 3x3 conv, a depthwise conv, a "
                "pointwise conv between equal widths), and a new conv is a standard 3x3 conv of the stage's width at "
                "the end of the stage or inside its last bottleneck. The default MACs budget (1.25x) holds for "
                "both strategies. These rows are not reproduced (printed as MISMATCH above). Without the budget:",
                "  ", 108, "")
    rows = []
    for (ds, net), (r, side) in results.items():
        if net not in ("MobileNet", "ResNet50"):
            continue
        spec = next(b for b in BASELINES if b[:2] == (ds, net))
        s = r.summary if r.summary["macs_budget"] is None else _organize(spec[3], spec[4], side,
                                                                         macs_budget=None).summary
        paper = OPT[ds, net]
        params_m, p_ok, macs_m, m_ok, delta, d_ok = _checks(s["params_after"], s["macs_after"], s["delta_3drf"], paper)
        rows.append([f"{ds} {net}-opt", _layout(s["stage_convs"]), params_m + "M", paper[1] + "M",
                     "ok" if p_ok else "MISMATCH", f"{macs_m:,.1f}", f"{paper[0]:,}", "ok" if m_ok else "MISMATCH",
                     f"{delta:.3f}", paper[2], "ok" if d_ok else "MISMATCH"])
    out += ["    " + x for x in _fmt_table(["row, macs_budget=None", "layout", "params", "paper", "check",
                                            "MACs (M)", "paper", "check", "Delta", "paper", "check"], rows,
                                           [False, False, True, True, False, True, True, False, True, True, False])]
    return out + [""]


def stage_fields(analyses) -> list:
    out = ["3DRF of every stage of the baselines (alpha = 3)",
           "  3DRF = the largest conv field of the stage, spatial x channel (HxWxC) over the stage input;",
           "  saturated = it covers the whole stage input (3DRF = V0 = w0 x w0 x c0); gain-0 convs add nothing.",
           ""]
    seen = {}
    for (ds, net, spec, *_rest) in BASELINES:
        a = analyses[(ds, net)]
        shape = "x".join(map(str, a.input_shape))
        rows = []
        for s in stage_summaries(a):
            st = s.stage
            share = 100 * s.rf.volume / s.v0 if s.rf else None
            pct = "-" if share is None else f"{share:.1f}%" if share >= 1 else f"{share:.2f}%"
            rows.append([str(st.index), "x".join(map(str, st.resolution)), f"{st.channels:,}", f"{s.v0:,}",
                         str(len(s.convs)), rf_text(s.rf), f"{s.rf.volume:,}" if s.rf else "-", pct,
                         str(len(s.zero_gain)), "yes" if s.saturated else "no"])
        key = tuple(map(tuple, rows))
        title = f"  {ds} {net} ({spec}, {shape})"
        if key in seen:
            out += [title + f": every stage as {seen[key]} (checked; only the classifier differs)", ""]
            continue
        seen[key] = f"{ds} {net}"
        n_sat = sum(r[-1] == "yes" for r in rows)
        out.append(title + f": {n_sat} of {len(rows)} stages saturated")
        out += ["    " + s for s in _fmt_table(
            ["stage", "w0", "c0", "V0", "convs", "3DRF", "volume", "of V0", "gain-0", "saturated"], rows,
            [True, True, True, True, True, True, True, True, True, False])]
        out.append("")
    return out


def table6() -> list:
    from table6 import format_table6  # benchmarks/table6.py, beside this script
    text = format_table6()
    return ["Table 6: kernel-level design (CIFAR-10) on VGG16-opt", ""] + str(text).rstrip("\n").splitlines()


def _wrap(text, indent, width, hang="    ") -> list:
    import textwrap
    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent + hang)


# ------------------------------------------------------------------------------------------------- main


def report() -> str:
    analyses = {(ds, net): _analyze(factory, kw, side) for ds, net, _, factory, kw, side, *_ in BASELINES}
    sections = [table2(), tables345(analyses), opt_rows(), stage_fields(analyses), table6()]
    head = [f"fxrf {fxrf.__version__}, torch {torch.__version__}; the paper's figures: docs/paper.md", ""]
    return "\n".join(head + [line for sec in sections for line in sec + [""]]).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="also write the output as a Markdown page (e.g. docs/reproduction.md)")
    args = p.parse_args(argv)
    text = report()
    sys.stdout.write(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write("# Reproducing the paper's tables\n\n"
                     "Generated by running, from the repository root:\n\n"
                     f"    python benchmarks/paper_tables.py --out {args.out}\n\n"
                     "Do not edit by hand; re-run the command after changing the analysis, the cost model or the "
                     "models. \"MFLOPs\" in the paper are MACs (multiply-accumulates), see docs/paper.md; ratio = "
                     "fxrf / paper.\n\n"
                     "```text\n" + text + "```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
