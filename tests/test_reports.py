"""Reports of an Analysis: the terminal table, the JSON document, the plot, the DOT/GraphML export and the CLI flags.

Oracles: fxrf.cost.total for the cost figures, the analysis records for every exported attribute, the PNG/GraphML
readers (matplotlib, networkx) and a small DOT reader written here (no pydot needed) for the files.
"""
from __future__ import annotations

import json
import re

import networkx as nx
import pytest
import torch

import fxrf
import fxrf.cli
from fxrf.cost import total
from fxrf.errors import FxrfError
from fxrf.graph import export_graph, to_networkx
from fxrf.models import vgg11_cifar, vgg16_cifar
from fxrf.report import rf_text, si, stage_summaries, table
from tv_models import build

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def resnet50():
    a = fxrf.analyze(build("resnet50"), (1, 3, 224, 224))  # torchvision, meta device: shapes only
    a.model = "torchvision:resnet50"
    return a


@pytest.fixture(scope="module")
def vgg16():
    with torch.device("meta"):  # shapes only
        model = vgg16_cifar()
    a = fxrf.analyze(model, (1, 3, 32, 32))
    a.model = "fxrf:vgg16_cifar"
    return a


# ------------------------------------------------------------------------------------------------ table


@pytest.mark.parametrize("render", [lambda a: table(a), lambda a: a.table(80), lambda a: table(a, width=80)])
def test_table_fits_80_columns_for_resnet50(resnet50, render):
    text = render(resnet50)
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert not too_long, too_long


def test_table_has_stage_separators_rows_and_totals(resnet50):
    a = resnet50
    lines = table(a, width=160).splitlines()  # wide enough that no layer name is clipped
    separators = [line for line in lines if line.startswith("-- stage ")]
    assert len(separators) == len(a.stages)
    for s, line in zip(a.stages, separators):  # each names w0, c0 and V0 of its stage, in order
        assert line.startswith(f"-- stage {s.index}: w0 {'x'.join(map(str, s.resolution))}, c0 {s.channels}, "
                               f"V0 {s.volume:,}")
    # one row per conv (and the linear head), each with its 3DRF
    for r in a.convs():
        row = next(line for line in lines if line.split()[:1] == [r.path])  # convs are named by module path
        assert rf_text(r.rf) in row.split()
        assert "x".join(map(str, r.shape[1:])) in row.split()  # and show their output shape
    assert any(line.split()[:2] == ["fc", "linear"] for line in lines)
    # per-stage totals and the model total, labelled MACs
    for s in stage_summaries(a):
        if s.convs:
            row = next(line for line in lines if line.startswith(f"stage {s.stage.index} total"))
            assert row.split()[-2:] == [si(s.params), si(s.macs)]
    t = total(a.costs)
    assert next(line for line in lines if line.startswith("total")).split()[-2:] == [si(t.params), si(t.macs)]
    assert re.search(rf"^params +{t.params:,}$", "\n".join(lines), re.M)
    assert re.search(rf"^MACs +{t.macs:,}  in conv, linear, matmul", "\n".join(lines), re.M)
    assert re.search(rf"^ +\+ +{t.extra_macs:,}  MACs in norm", "\n".join(lines), re.M)
    assert next(line for line in lines if line.startswith("layer ")).split()[-1] == "MACs"
    text = " ".join(lines)
    assert all(m.group(0) == "FLOPs = 2 x MACs" for m in re.finditer(r"FLOPs( = 2 x MACs)?", text))


def test_table_marks_saturated_stages(vgg16):
    lines = table(vgg16).splitlines()
    stage_totals = [line for line in lines if re.match(r"stage \d total", line)]
    # VGG16 on 32x32: the 4x4 and 2x2 stages are saturated (3DRF = V0), the others are not (docs/paper.md Table 2)
    assert ["*" in line for line in stage_totals] == [False, False, False, True, True]


def test_table_clips_long_names_to_the_width(resnet50):
    text = table(resnet50, width=60)
    assert max(len(line) for line in text.splitlines()) <= 60
    assert "…" in text  # layer1_0_downsample_0 no longer fits


class ConvPlusBias(torch.nn.Module):
    """A conv plus a bias computed from a parameter alone: that linear layer belongs to no stage."""

    def __init__(self):
        super().__init__()
        self.c = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.p = torch.nn.Parameter(torch.zeros(1, 4))
        self.fc = torch.nn.Linear(4, 8)

    def forward(self, x):
        return self.c(x) + self.fc(self.p).view(1, 8, 1, 1)


# The table at 80 columns and at 45 (columns dropped, names and prose clipped). The figures check by hand:
# c: 8 x 3 x 3 x 3 + 8 = 224 params, output 8 channels x 8 x 8 (padding 1), 8 x 8 x 8 outputs x 27 taps = 13,824
#    MACs, 3DRF 3x3x3 = 27, gain from the input pixel's field of volume 1: (27 - 1) / 1 x exp(-3 x 1 / 192) =
#    25.597, V0 = 8 x 8 x 3 = 192;
# fc: 4 x 8 + 8 = 40 params + p's 4 = 44, output 8, 32 MACs; total 268 params, 13,856 MACs; the add: 8 x 8 x 8 =
# 512 extra MACs. No conv starts its stage, none is saturated or has gain 0: the legend has only the 3DRF line.
TABLE_80 = """\
ConvPlusBias  input 1x3x8x8  alpha 3
3DRF: the field of a conv's output over its stage input, HxWxC

layer          kernel    output  3DRF HxWxC  volume   gain  params   MACs
-- stage 0: w0 8x8, c0 3, V0 192, input x -------------------------------
c              standard   8x8x8       3x3x3     27   25.60     224  13.8K
stage 0 total                         3x3x3     27             224  13.8K
-- outside any stage ----------------------------------------------------
fc             linear         8           -      -              44     32
outside total                                                   44     32
=========================================================================
total                                                          268  13.9K
params     268
MACs    13,856  in conv, linear, matmul (FLOPs = 2 x MACs)
      +    512  MACs in norm, activation, pooling, elementwise ops"""

TABLE_45 = """\
ConvPlusBias  input 1x3x8x8  alpha 3
3DRF: the field of a conv's output over its
  stage input, HxWxC

layer         3DRF HxWxC  gain params  MACs
-- stage 0: w0 8x8, c0 3, V0 192, input… --
c                  3x3x3 25.60    224 13.8K
stage 0 total      3x3x3          224 13.8K
-- outside any stage ----------------------
fc                     -           44    32
outside total                      44    32
===========================================
total                             268 13.9K
params     268
MACs    13,856  in conv, linear, matmul (FLO…
      +    512  MACs in norm, activation, po…"""


@pytest.mark.parametrize("width,expected", [(80, TABLE_80), (45, TABLE_45)])
def test_table_text_is_unchanged(width, expected):
    a = fxrf.analyze(ConvPlusBias(), (1, 3, 8, 8))
    assert table(a, width=width) == expected


# ------------------------------------------------------------------------------------------------ JSON


@pytest.mark.parametrize("fixture", ["resnet50", "vgg16"])
def test_to_dict_is_json_and_totals_match_cost_total(request, fixture):
    a = request.getfixturevalue(fixture)
    doc = json.loads(json.dumps(a.to_dict()))
    t = total(a.costs)
    assert doc["cost"]["total"] == {"params": t.params, "macs": t.macs, "extra_macs": t.extra_macs}
    in_stages = sum(s["params"] for s in doc["stages"])
    outside = sum(n["params"] for n in doc["nodes"] if n["stage"] is None)
    assert in_stages + outside == t.params
    assert sum(n["macs"] for n in doc["nodes"]) == t.macs
    assert sum(n["extra_macs"] for n in doc["nodes"]) == t.extra_macs
    for key in ("model", "input_shape", "alpha", "stages", "nodes", "cost", "unsupported"):  # the documented keys
        assert key in doc
    for s in doc["stages"]:
        assert {"index", "resolution", "channels", "volume", "input", "inputs", "params", "macs", "rf",
                "saturated"} <= set(s)


def test_to_dict_stage_fields(vgg16):
    doc = vgg16.to_dict()
    assert [s["saturated"] for s in doc["stages"]] == [False, False, False, True, True]
    assert [(s["rf"]["height"], s["rf"]["channel"]) for s in doc["stages"]] == [(5, 3), (5, 64), (7, 128),
                                                                              (4, 256), (2, 512)]


def test_to_dict_is_versioned_and_names_module_paths(resnet50):
    doc = resnet50.to_dict()
    assert doc["schema_version"] == 2  # docs/schema.md: what version 2 added
    by_name = {r.name: r for r in resnet50.records}
    assert all(n["path"] == by_name[n["name"]].path for n in doc["nodes"])
    conv = next(n for n in doc["nodes"] if n["name"] == "layer1_0_conv1")
    assert conv["path"] == "layer1.0.conv1" and conv["cost_source"] == "rule"
    assert doc["uncounted"] == []


def test_ops_counted_by_flop_counter_are_marked_in_json_and_table():
    from test_cost import ConvAttention
    a = fxrf.analyze(ConvAttention().eval(), (1, 3, 8, 8))
    doc = json.loads(json.dumps(a.to_dict()))
    sources = {n["name"]: n["cost_source"] for n in doc["nodes"]}
    assert sources["attn"] == sources["scaled_dot_product_attention"] == "flop_counter"
    assert sources["stem"] == sources["head"] == "rule"
    # the hand count of tests/test_cost.py: 842,048 MACs, FlopCounterMode's within 1%
    assert doc["cost"]["total"]["macs"] == 842_048
    # attn returns a tuple: no record of its own, but its cost is in the document and in the table's totals
    attn = next(n for n in doc["nodes"] if n["name"] == "attn")
    assert attn["path"] == "attn" and attn["stage"] is None and attn["params"] == 4 * 32 * 32 + 4 * 32
    assert sum(n["macs"] for n in doc["nodes"]) == 842_048
    text = table(a, width=100)
    assert re.search(r"^outside total +4\.22K +524K$", text, re.M)  # attn: 4,224 params; 196,608 + 262,144 + 65,536
    assert "2 node(s) with MACs counted by torch's FlopCounterMode (no cost rule): attn, " \
           "scaled_dot_product_attention" in " ".join(text.split())  # wrapped to the table's width


# ------------------------------------------------------------------------------------------------ plot


def test_plot_writes_a_png(vgg16, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread
    from fxrf.plot import plot_analysis
    path = tmp_path / "sub" / "vgg16.png"
    assert plot_analysis(vgg16, str(path)) == str(path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    h, w, _ = imread(str(path)).shape
    assert w > 600 and h > 600


def test_plot_without_matplotlib_names_the_extra(vgg16, tmp_path, monkeypatch):
    import sys
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # any import of matplotlib -> ImportError
    from fxrf.plot import plot_analysis
    with pytest.raises(FxrfError, match=re.escape("pip install 'fxrf[plot]'")):
        plot_analysis(vgg16, str(tmp_path / "x.png"))


# ------------------------------------------------------------------------------------------------ graph


def _read_dot(text: str):
    """A reader for the DOT subset fxrf writes (digraph, attr statements, subgraphs, nodes, edges)."""
    token = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(->|[{}\[\];,=])|([A-Za-z0-9_.#]+))', re.S)
    toks, pos = [], 0
    while pos < len(text.rstrip()):
        m = token.match(text, pos)
        assert m, f"DOT syntax error at {text[pos:pos + 40]!r}"
        quoted, sym, word = m.groups()
        if quoted:
            toks.append(("id", re.sub(r'\\(.)', lambda e: "\n" if e.group(1) == "n" else e.group(1), quoted[1:-1])))
        else:
            toks.append(("sym", sym) if sym else ("id", word))
        pos = m.end()
    nodes, edges, i = {}, [], 0

    def attrs():
        nonlocal i
        out = {}
        while toks[i] == ("sym", "["):
            i += 1
            while toks[i] != ("sym", "]"):
                key, eq, val = toks[i], toks[i + 1], toks[i + 2]
                assert key[0] == "id" and eq == ("sym", "=") and val[0] == "id", toks[i:i + 3]
                out[key[1]] = val[1]
                i += 3
                if toks[i] == ("sym", ","):
                    i += 1
            i += 1
        return out

    def block():
        nonlocal i
        assert toks[i] == ("sym", "{")
        i += 1
        while toks[i] != ("sym", "}"):
            kind, val = toks[i]
            if kind == "id" and val in ("graph", "node", "edge"):
                i += 1
                attrs()
            elif kind == "id" and val == "subgraph":
                i += 2
                block()
            elif kind == "id" and toks[i + 1] == ("sym", "="):
                i += 3
            elif kind == "id" and toks[i + 1] == ("sym", "->"):
                edges.append((val, toks[i + 2][1]))
                i += 3
                attrs()
            else:
                assert kind == "id", toks[i]
                i += 1
                nodes.setdefault(val, {}).update(attrs())
            if toks[i] == ("sym", ";"):  # optional in DOT
                i += 1
        i += 1

    assert toks[0] == ("id", "digraph")
    i = 2 if toks[1][0] == "id" else 1
    block()
    assert i == len(toks)
    return nodes, edges


def test_dot_export_parses_back(vgg16, tmp_path):
    path = tmp_path / "vgg16.dot"
    assert export_graph(vgg16, str(path)) == str(path)
    nodes, edges = _read_dot(path.read_text())
    gm = vgg16.graph_module
    assert set(nodes) == {n.name for n in gm.graph.nodes}
    assert len(edges) == to_networkx(vgg16).number_of_edges()
    for r in vgg16.convs():
        label = nodes[r.name]["label"]
        assert f"stage {r.stage}" in label and f"3DRF {rf_text(r.rf)} = {r.rf.volume:,}" in label
        assert (nodes[r.name].get("penwidth") == "3") == (r.gain == 0)  # saturated convs stand out
    text = path.read_text()
    for s in stage_summaries(vgg16):
        assert f"subgraph cluster_stage{s.stage.index}" in text


def test_graphml_export_parses_back(resnet50, tmp_path):
    path = tmp_path / "resnet50.graphml"
    export_graph(resnet50, str(path))
    g = nx.read_graphml(str(path))
    gm = resnet50.graph_module
    assert g.number_of_nodes() == len(gm.graph.nodes)
    assert g.number_of_edges() == to_networkx(resnet50).number_of_edges()
    costs = resnet50.costs
    for r in resnet50.records:
        d = g.nodes[r.name]
        assert d.get("stage") == r.stage
        if r.rf is not None:
            assert (d["rf"], d["rf_volume"], d["rf_channel"]) == (rf_text(r.rf), r.rf.volume, r.rf.channel)
        if r.kernel is not None:
            assert d["kernel"] == r.kernel and d["saturated"] == (r.gain == 0)
            assert d.get("gain") == pytest.approx(r.gain) if r.gain is not None else "gain" not in d
        if r.name in costs:
            assert (d["params"], d["macs"]) == (costs[r.name].params, costs[r.name].macs)
    assert any(d.get("saturated") for _, d in g.nodes(data=True))
    assert g.graph["params"] == total(costs).params


def test_export_rejects_unknown_formats(vgg16, tmp_path):
    with pytest.raises(FxrfError, match=r"\.dot .*\.graphml"):
        export_graph(vgg16, str(tmp_path / "g.json"))


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("graph_ext", [".dot", ".graphml"])
def test_cli_plot_and_graph(tmp_path, capsys, graph_ext):
    plot, graph = tmp_path / "fig.png", tmp_path / f"g{graph_ext}"
    argv = ["analyze", "fxrf:vgg11_cifar", "--input", "1,3,32,32", "--graph", str(graph)]
    if graph_ext == ".dot":
        pytest.importorskip("matplotlib")
        argv += ["--plot", str(plot)]
    assert fxrf.cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"wrote {graph}" in out and "-- stage 4:" in out
    if graph_ext == ".dot":
        assert plot.read_bytes()[:8] == PNG_MAGIC and f"wrote {plot}" in out
        nodes, _ = _read_dot(graph.read_text())
    else:
        nodes = nx.read_graphml(str(graph)).nodes
    assert len(nodes) == len(fxrf.analyze(vgg11_cifar(), (1, 3, 32, 32)).graph_module.graph.nodes)


def test_gate_warnings_and_local_fields_reach_the_report():
    """A squeeze-excite net: gains that are 0 only because a gate sees the whole stage are warned about, and the
    JSON carries the local field (gates excluded) next to the exact one."""
    import torchvision
    a = fxrf.analyze(torchvision.models.efficientnet_b0(), (1, 3, 64, 64))
    assert a.warnings
    d = a.to_dict()
    assert d["warnings"] == a.warnings and d["capture"] == "fx" and d["spatial_cap"] is True
    convs = [n for n in d["nodes"] if n["kernel"] is not None]
    assert any(n["gain"] == 0 and n["local_gain"] for n in convs)  # saturated by the gate, not locally
    assert "warning: " + a.warnings[0][:30] in a.table(width=200).replace("\n", " ")
