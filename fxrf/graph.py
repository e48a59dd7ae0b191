"""The analysed graph as a networkx DiGraph, and its export to Graphviz DOT or GraphML.

Every fx node becomes a networkx node (same name), every use an edge from the producer to the user. Nodes carry
their module path (``path``), stage, 3DRF, gain and cost as plain str/int/float/bool attributes (absent where they do not apply), a
multi-line ``label`` and a ``color`` per stage; convs whose gain is 0 (they add nothing to the 3DRF) are marked
``saturated`` and drawn with a thick red border. DOT is written as text here (no pydot or pygraphviz needed);
GraphML by networkx.

>>> import torch.nn as nn, fxrf
>>> from fxrf.graph import to_networkx
>>> a = fxrf.analyze(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), (1, 3, 8, 8))
>>> g = to_networkx(a)
>>> list(g.edges)
[('input_1', '_0'), ('_0', '_1'), ('_1', 'output')]
>>> {k: g.nodes["_0"][k] for k in ("path", "stage", "rf", "rf_volume", "params", "macs")}
{'path': '0', 'stage': 0, 'rf': '3x3x3', 'rf_volume': 27, 'params': 224, 'macs': 13824}
"""
from __future__ import annotations

import os

import networkx as nx

from .errors import FxrfError
from .plot import SATURATED_COLOR, stage_color
from .report import gain_text, rf_text, si, stage_summaries


def to_networkx(a) -> nx.DiGraph:
    """The fx graph of `a` (an fxrf Analysis) as an nx.DiGraph whose nodes carry the analysis (see the module doc)."""
    gm = a.graph_module
    costs = a.costs
    g = nx.DiGraph()
    shape = "x".join(map(str, a.input_shape))
    total_params = sum(c.params for c in costs.values())
    total_macs = sum(c.macs for c in costs.values())
    g.graph.update(name=str(a.model), input_shape=shape, alpha=float(a.alpha), params=total_params,
                   macs=total_macs, stages=len(a.stages))
    for node in gm.graph.nodes:
        attrs = {"op": node.op, "target": _target(node)}
        r = a.get(node.name)
        c = costs.get(node.name)
        if r is not None:
            attrs.update(kind=r.op, shape="x".join(map(str, r.shape)), supported=bool(r.supported))
            if r.path is not None:  # the module path (state_dict keys' spelling); absent for the model's own ops
                attrs["path"] = r.path
            if r.stage is not None:
                attrs["stage"] = int(r.stage)
            if r.kernel is not None:
                attrs["kernel"] = r.kernel
                attrs["saturated"] = r.gain == 0
            if r.rf is not None:
                attrs.update(rf=rf_text(r.rf), rf_height=int(r.rf.height), rf_width=int(r.rf.width),
                             rf_channel=int(r.rf.channel), rf_volume=int(r.rf.volume))
            if r.gain is not None:
                attrs["gain"] = float(r.gain)
        if c is not None:
            attrs.update(params=int(c.params), macs=int(c.macs), extra_macs=int(c.extra_macs))
        stage = attrs.get("stage")
        attrs["color"] = stage_color(stage)
        attrs["fillcolor"] = _tint(stage_color(stage), 0.25 if r is not None and r.kernel else 0.12)
        attrs["label"] = _label(node.name, attrs)
        g.add_node(node.name, **attrs)
    for node in gm.graph.nodes:
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    return g


def export_graph(a, path) -> str:
    """Write the analysed graph to `path`: Graphviz DOT for .dot/.gv, GraphML for .graphml; returns path.

    Render a DOT file with Graphviz, e.g. ``dot -Tsvg model.dot -o model.svg``; open GraphML in yEd, Gephi or
    ``networkx.read_graphml``.
    """
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in (".dot", ".gv", ".graphml"):
        raise FxrfError(f"cannot export the graph to {path!r}: use a .dot (Graphviz) or .graphml file name")
    g = to_networkx(a)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if ext == ".graphml":
        nx.write_graphml(g, path)
    else:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(to_dot(g, a))
    return path


def to_dot(g: nx.DiGraph, a=None) -> str:
    """DOT text of a graph built by to_networkx: one cluster per stage (if `a` is given), nodes filled by stage."""
    lines = [f"digraph {_q(g.graph.get('name', 'fxrf'))} {{"]
    title = (f"{g.graph.get('name', '')}  input {g.graph.get('input_shape', '')}  alpha {g.graph.get('alpha', 0):g}"
             f"\n{si(g.graph.get('params', 0))} params, {si(g.graph.get('macs', 0))} MACs"
             "; red border: gain 0 (the conv adds nothing to the 3DRF)")
    lines.append(f'  graph [rankdir=TB, labelloc=t, fontname="Helvetica", label={_q(title)}];')
    lines.append('  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];')
    lines.append('  edge [color="#666666", arrowsize=0.6];')
    members: dict = {}
    for name, d in g.nodes(data=True):
        members.setdefault(d.get("stage"), []).append(name)
    summaries = {s.stage.index: s for s in stage_summaries(a)} if a is not None else {}
    for stage in sorted(k for k in members if k is not None):
        s = summaries.get(stage)
        if s is not None:
            st = s.stage
            label = (f"stage {stage}: {'x'.join(map(str, st.resolution))} px, c0 {st.channels}, V0 {st.volume:,}"
                     + (f"; 3DRF {rf_text(s.rf)}" if s.rf else "") + (" (saturated)" if s.saturated else ""))
        else:
            label = f"stage {stage}"
        lines.append(f"  subgraph cluster_stage{stage} {{")
        lines.append(f'    label={_q(label)}; style="rounded"; color={_q(stage_color(stage))}; penwidth=1.5;')
        lines += [f"    {_node_stmt(n, g.nodes[n])}" for n in members[stage]]
        lines.append("  }")
    lines += [f"  {_node_stmt(n, g.nodes[n])}" for n in members.get(None, [])]
    lines += [f"  {_q(u)} -> {_q(v)};" for u, v in g.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _node_stmt(name: str, d: dict) -> str:
    attrs = {"label": d["label"], "fillcolor": d["fillcolor"], "color": d["color"]}
    if d.get("saturated"):
        attrs.update(color=SATURATED_COLOR, penwidth="3")
    if d.get("op") in ("placeholder", "output"):
        attrs["shape"] = "ellipse"
    body = ", ".join(f"{k}={_q(v)}" for k, v in attrs.items())
    return f"{_q(name)} [{body}];"


def _label(name: str, d: dict) -> str:
    lines = [name, f"{d.get('kind', d['op'])}" + (f" ({d['kernel']})" if "kernel" in d else "")
             + (f"  {d['shape']}" if "shape" in d else "")]
    if "stage" in d:
        lines.append(f"stage {d['stage']}" + (f"  3DRF {d['rf']} = {d['rf_volume']:,}" if "rf" in d else ""))
    if "kernel" in d:
        lines.append("gain 0 (saturated)" if d.get("saturated") else f"gain {gain_text(d.get('gain'))}")
    if d.get("params") or d.get("macs"):
        lines.append(f"{si(d['params'])} params, {si(d['macs'])} MACs")
    return "\n".join(lines)


def _target(node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return f"{getattr(t, '__module__', None) or ''}.{getattr(t, '__name__', repr(t))}".lstrip(".")


def _q(s) -> str:
    """A DOT double-quoted string; a newline becomes DOT's '\\n' (a centred line break in a label)."""
    s = str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + s + '"'


def _tint(hex_color: str, amount: float) -> str:
    """`hex_color` mixed with white: amount 1 is the colour itself, 0 is white."""
    rgb = [int(hex_color[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(255 - (255 - v) * amount):02x}" for v in rgb)
