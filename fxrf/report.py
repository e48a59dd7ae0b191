"""Reports of an Analysis: the JSON document (docs/schema.md), a table for the terminal, and the per-stage summary
that the table, the plot (fxrf.plot), the graph export (fxrf.graph) and benchmarks/paper_tables.py share.

>>> import torch.nn as nn, fxrf
>>> a = fxrf.analyze(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)), (1, 3, 8, 8))
>>> s = stage_summaries(a)[0]
>>> (rf_text(s.rf), s.rf.volume, s.v0, s.saturated, s.params, s.macs)
('5x5x3', 75, 192, False, 808, 50688)
>>> max(len(line) for line in table(a).splitlines()) <= 80
True
"""
from __future__ import annotations

import shutil
import textwrap
from dataclasses import dataclass

from .cost import uncounted
from .naming import module_path

# --------------------------------------------------------------------------------------------- shared helpers


@dataclass(frozen=True)
class StageSummary:
    """What one stage amounts to: its convs in graph order, its widest conv 3DRF and what it costs."""

    stage: object  # fxrf.analysis.Stage
    convs: tuple  # NodeRecords of the convs (kernel is not None), graph order
    rf: object  # the RF of largest volume among the convs (the stage's 3DRF), None without convs
    params: int  # over every node of the stage (convs, norms, the head attached to it, ...)
    macs: int
    extra_macs: int

    @property
    def v0(self) -> int:
        return self.stage.volume

    @property
    def saturated(self) -> bool:
        """The stage's 3DRF covers its whole input (3DRF = V_0): convs after that point add no gain."""
        return self.rf is not None and self.rf.volume >= self.v0

    @property
    def zero_gain(self) -> tuple:
        """Convs whose gain is exactly 0: they add nothing to the 3DRF (saturated, or a 1x1 on a full channel field)."""
        return tuple(r for r in self.convs if r.gain == 0)


def stage_summaries(a) -> list:
    """One StageSummary per stage of `a`, in stage order."""
    costs = a.costs
    convs: dict = {}
    sums: dict = {}
    for r in a.records:
        if r.kernel is not None:
            convs.setdefault(r.stage, []).append(r)
        c = costs.get(r.name)
        if c is not None:
            p, m, e = sums.get(r.stage, (0, 0, 0))
            sums[r.stage] = (p + c.params, m + c.macs, e + c.extra_macs)
    out = []
    for s in a.stages:
        cs = tuple(convs.get(s.index, ()))
        rfs = [r.rf for r in cs if r.rf is not None]
        out.append(StageSummary(s, cs, max(rfs, key=lambda rf: rf.volume) if rfs else None,
                                *sums.get(s.index, (0, 0, 0))))
    return out


def rf_text(rf) -> str:
    """'HxWxC' (spatial extents then channels): the 3DRF as the paper writes it, '-' for None."""
    if rf is None:
        return "-"
    return "x".join(str(s) for s in rf.spatial) + f"x{rf.channel}"


def si(n: float) -> str:
    """A count in 3 significant digits with K/M/G/T: 14728266 -> '14.7M', 864 -> '864'.

    >>> [si(n) for n in (0, 864, 1728, 39040, 999999, 313201664, 15470264320)]
    ['0', '864', '1.73K', '39.0K', '1.00M', '313M', '15.5G']
    """
    n = float(n)
    if abs(n) < 999.5:
        return f"{n:.0f}"
    for unit in ("K", "M", "G", "T"):
        n /= 1000
        if abs(n) < 999.5 or unit == "T":
            break
    decimals = 2 if abs(n) < 9.995 else 1 if abs(n) < 99.95 else 0
    return f"{n:.{decimals}f}{unit}"


def gain_text(g) -> str:
    """A gain in at most 7 characters, 'start' for a conv that starts its stage (no previous field)."""
    if g is None:
        return "start"
    if g == 0:
        return "0"
    if g >= 1e4:
        return f"{g:.2e}"
    return f"{g:.1f}" if g >= 100 else f"{g:.2f}" if g >= 10 else f"{g:.3f}"


# ------------------------------------------------------------------------------------------------ JSON


def _rf(rf, with_mean=True):
    if rf is None:
        return None
    d = {"height": rf.height, "width": rf.width, "channel": rf.channel}
    if len(rf.spatial) != 2:
        d["spatial"] = list(rf.spatial)
    if with_mean:
        d["channel_mean"] = round(rf.channel_mean, 4)
        d["volume"] = rf.volume
    return d


SCHEMA_VERSION = 2  # docs/schema.md says what changed between versions

COST_CONVENTION = ("macs: multiply-accumulates of conv, linear and matmul (what fvcore calls 'flops' and ptflops "
                   "'MACs'; torch's FlopCounterMode reports FLOPs = 2 x MACs); extra_macs: norms, activations, pooling "
                   "and elementwise ops as ptflops counts them; ops without a cost rule: FlopCounterMode on meta "
                   "tensors, flops / 2 (cost_source 'flop_counter'), or not counted (listed in 'uncounted')")


def _cost_sum(costs) -> dict:
    return {"params": sum(c.params for c in costs), "macs": sum(c.macs for c in costs),
            "extra_macs": sum(c.extra_macs for c in costs)}


def to_dict(a) -> dict:
    """The JSON document (docs/schema.md): model, input, alpha, stages, one entry per tensor node, cost, and the
    ops analysed conservatively.

    Per stage, besides w_0/c_0/V_0 and its cost: `rf`, the largest conv 3DRF of the stage (null without convs),
    and `saturated`, whether it reaches V_0. Per node: params, macs and extra_macs of that node."""
    costs = a.costs
    per_stage: dict = {}
    for r in a.records:
        if r.name in costs:
            per_stage.setdefault(r.stage, []).append(costs[r.name])
    nodes = []
    by_name = {r.name: r for r in a.records}
    for node in a.graph_module.graph.nodes:
        r, c = by_name.get(node.name), costs.get(node.name)
        if r is None and c is None:
            continue
        cost = {"params": c.params if c else 0, "macs": c.macs if c else 0, "extra_macs": c.extra_macs if c else 0,
                "cost_source": c.source if c else None}
        if r is None:  # an op with a cost and no record (its output is a tuple: nn.MultiheadAttention)
            nodes.append({"name": node.name, "path": _module_path(node), "op": _op(node), "target": _target(node),
                          "shape": None, "stage": None, "kernel": None, "rf": None, "gain": None, "local_rf": None,
                          "local_gain": None, "input_rf": None, **cost})
            continue
        nodes.append({"name": r.name, "path": r.path, "op": r.op, "target": r.target, "shape": list(r.shape),
                      "stage": r.stage,
                      "kernel": r.kernel, "rf": _rf(r.rf), "gain": None if r.gain is None else round(r.gain, 6),
                      "local_rf": _rf(getattr(r, "local_rf", None)),
                      "local_gain": None if getattr(r, "local_gain", None) is None else round(r.local_gain, 6),
                      "input_rf": _rf(r.input_rf, with_mean=False), **cost})
    summaries = {s.stage.index: s for s in stage_summaries(a)}
    return {
        "schema_version": SCHEMA_VERSION,
        "model": a.model,
        "input_shape": list(a.input_shape),
        "alpha": a.alpha,
        "stages": [{"index": s.index, "resolution": list(s.resolution), "channels": s.channels, "volume": s.volume,
                    "input": s.inputs[0], "inputs": list(s.inputs), **_cost_sum(per_stage.get(s.index, [])),
                    "rf": _rf(summaries[s.index].rf), "saturated": summaries[s.index].saturated}
                   for s in a.stages],
        "nodes": nodes,
        "cost": {"convention": COST_CONVENTION, "total": _cost_sum(costs.values())},
        "unsupported": [{"name": n, "path": by_name[n].path if n in by_name else None, "target": t, "reason": why}
                        for n, t, why in a.unsupported],
        "uncounted": [{"name": n, "path": by_name[n].path if n in by_name else None,
                       "target": by_name[n].target if n in by_name else None} for n in uncounted(costs)],
        "spatial_cap": a.spatial_cap,
        "capture": a.capture,
        "warnings": list(getattr(a, "warnings", [])),
    }


def _module_path(node):
    return module_path(node)


def _op(node) -> str:
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(node.target)).__name__.lower()
    return str(getattr(node.target, "__name__", node.target))


def _target(node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(node.graph.owning_module.get_submodule(node.target)).__name__})"
    return str(getattr(node.target, "__name__", node.target))


def _unrecorded(a) -> list:
    """Costs of nodes the analysis keeps no record of (tuple outputs): they belong to no stage."""
    names = {r.name for r in a.records}
    return [c for n, c in a.costs.items() if n not in names]


# ----------------------------------------------------------------------------------------------- table

_COLUMNS = ("layer", "kernel", "output", "3DRF HxWxC", "volume", "gain", "params", "MACs")
_RIGHT = (False, False, True, True, True, True, True, True)
_DROP_ORDER = (2, 1, 4)  # output, kernel, volume: what a narrow terminal loses first
_MIN_NODE = 13  # "stage N total" still fits


@dataclass(frozen=True)
class _Columns:
    """Where each column of the table goes: the columns kept, their widths and the space between them."""

    keep: tuple  # indices into _COLUMNS, in order
    widths: tuple  # per column of _COLUMNS (the layer column already clipped to the width)
    gap: int

    @property
    def line_w(self) -> int:
        return sum(self.widths[i] for i in self.keep) + self.gap * (len(self.keep) - 1)

    def fmt(self, cells) -> str:
        out = []
        for i in self.keep:
            cell = _clip(cells[i], self.widths[i])
            out.append(cell.rjust(self.widths[i]) if _RIGHT[i] else cell.ljust(self.widths[i]))
        return (" " * self.gap).join(out).rstrip()


def _layout(rows, width: int) -> _Columns:
    """Columns for `rows` (lists of cells, the header among them) within `width` characters: two spaces between
    columns where they fit, else one; the least needed columns dropped when even that does not fit; layer names
    clipped to what is left (at least _MIN_NODE)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    gap = 2 if sum(widths) + 2 * (len(widths) - 1) <= width else 1  # air between columns where it fits
    keep = list(range(len(_COLUMNS)))
    for drop in _DROP_ORDER:  # a very narrow width: give up the least needed columns, never the line limit
        if sum(widths[i] for i in keep[1:]) + gap * (len(keep) - 1) + _MIN_NODE <= width:
            break
        keep.remove(drop)
    rest = sum(widths[i] for i in keep[1:]) + gap * (len(keep) - 1)
    widths[0] = max(min(widths[0], width - rest), _MIN_NODE)
    return _Columns(tuple(keep), tuple(widths), gap)


def _volume_cell(rf, saturated: bool) -> str:
    return f"{rf.volume:,}" + ("*" if saturated else " ")


def label(a, r) -> str:
    """What the table calls a record: its module path where that path names this record (`a.record(path) is r`),
    else its fx node name; either is a key `Analysis.record` accepts."""
    return r.path if r.path is not None and a.get(r.path) is r else r.name


def shape_text(shape) -> str:
    """An output shape without its batch dim, 'CxHxW' ('-' for a scalar)."""
    return "x".join(map(str, shape[1:])) if len(shape) > 1 else "-"


def _is_layer(r, c) -> bool:
    return r.kernel is not None or (c is not None and c.kind == "linear")


def _layer_rows(a) -> dict:
    """{stage index (None: outside any stage): the rows of its convs and linear layers, graph order}."""
    costs = a.costs
    rows: dict = {}
    for r in a.records:
        c = costs.get(r.name)
        if not _is_layer(r, c):
            continue
        sat = r.rf is not None and r.stage is not None and r.rf.volume >= a.stages[r.stage].volume
        rows.setdefault(r.stage, []).append(
            [label(a, r), r.kernel or "linear", shape_text(r.shape),
             rf_text(r.rf) if r.kernel else "-",
             _volume_cell(r.rf, sat) if r.kernel and r.rf else "- ",
             gain_text(r.gain) if r.kernel else "", si(c.params) if c else "0", si(c.macs) if c else "0"])
    return rows


def _prefix(path, depth: int):
    return ".".join(path.split(".")[:depth]) if path is not None else None


def _tree_rows(a, depth: int) -> dict:
    """Like _layer_rows, with the layers grouped by the first `depth` parts of their module path (torchinfo's
    depth): one row per module at that depth and stage, first appearance order, summing the params and MACs of
    every node under it in the stage; its output, 3DRF and volume are those of its last node in the stage (the
    module's output, as the stage sees it). Gain is shown for a row of one conv only."""
    costs = a.costs
    groups: dict = {}  # (stage, key) -> [records]
    for r in a.records:
        key = _prefix(r.path, depth) or r.name
        groups.setdefault((r.stage, key), []).append(r)
    rows: dict = {}
    for (stage, key), members in groups.items():
        layers = [r for r in members if _is_layer(r, costs.get(r.name))]
        if not layers:
            continue
        convs = [r for r in layers if r.kernel is not None]
        last = next((r for r in reversed(members) if r.rf is not None), members[-1])
        cs = [costs[r.name] for r in members if r.name in costs]
        one = layers[0] if len(layers) == 1 else None
        kind = (one.kernel or "linear") if one else f"{len(convs)} convs" if len(convs) == len(layers) \
            else f"{len(layers)} layers"
        sat = last.rf is not None and stage is not None and last.rf.volume >= a.stages[stage].volume
        rows.setdefault(stage, []).append(
            [label(a, one) if one and one.path == key else key, kind, shape_text(last.shape),
             rf_text(last.rf) if convs else "-", _volume_cell(last.rf, sat) if convs and last.rf else "- ",
             gain_text(one.gain) if one and one.kernel else "", si(sum(c.params for c in cs)),
             si(sum(c.macs for c in cs))])
    return rows


def _stage_total_row(s) -> list:
    """A stage's total row: its widest 3DRF, its params and MACs."""
    return [f"stage {s.stage.index} total", "", "", rf_text(s.rf), _volume_cell(s.rf, s.saturated) if s.rf else "- ",
            "", si(s.params), si(s.macs)]


def _sum_row(text: str, cost: dict) -> list:
    return [text, "", "", "", "", "", si(cost["params"]), si(cost["macs"])]


def _legend(a, summaries, width: int, prose: int) -> list:
    """The title line, then one line per thing a reader may stumble on, only where the table shows it."""
    shape = "x".join(map(str, a.input_shape))
    lines = textwrap.wrap(f"{a.model}  input {shape}  alpha {a.alpha:g}", prose)
    convs = [r for s in summaries for r in s.convs]
    notes = ["3DRF: the field of a conv's output over its stage input, HxWxC"]
    if any(s.saturated for s in summaries):
        notes.append("*: saturated, the 3DRF is the whole stage input (volume = V0)")
    if any(r.gain is None for r in convs):
        notes.append("gain 'start': the conv starts its stage (strided or first): its output is the stage input, "
                     "so its 3DRF is one element, 1x1x1, by definition")
    if any(r.gain == 0 for r in convs):
        notes.append("gain 0: the conv adds nothing to the 3DRF (its input already sees the whole stage input)")
    return lines + [line for t in notes for line in _wrap_note(t, width, prose)]


def _wrap_note(text: str, width: int, prose: int) -> list:
    """A legend note on one line where it fits the prose width, else wrapped with a hanging indent."""
    if len(text) <= prose:
        return [text]
    return [_clip_right(t, width) for t in textwrap.wrap(text, prose, subsequent_indent="  ")]


def _stage_lines(a, s, rows: list, cols: _Columns, line_w: int) -> list:
    """A stage's separator (w_0, c_0, V_0, its input), its rows and its total."""
    st = s.stage
    res = "x".join(map(str, st.resolution))
    more = f" (+{len(st.inputs) - 1})" if len(st.inputs) > 1 else ""
    first = a.get(st.inputs[0])
    head = (f"-- stage {st.index}: w0 {res}, c0 {st.channels}, V0 {st.volume:,}, "
            f"input {label(a, first) if first is not None else st.inputs[0]}{more}")
    lines = [(_clip_right(head, line_w - 3) + " ").ljust(line_w, "-")]
    lines += [cols.fmt(row) for row in rows] if rows else ["(no convs)"]
    if rows or s.params or s.macs:
        lines.append(cols.fmt(_stage_total_row(s)))
    return lines


def _exact_counts(grand: dict, width: int) -> list:
    n = max(len(f"{grand[k]:,}") for k in ("params", "macs", "extra_macs"))
    return [_clip_right(t, width) for t in (
        f"params  {grand['params']:>{n},}",
        f"MACs    {grand['macs']:>{n},}  in conv, linear, matmul (FLOPs = 2 x MACs)",
        f"      + {grand['extra_macs']:>{n},}  MACs in norm, activation, pooling, elementwise ops")]


def _cost_notes(a, width: int, prose: int) -> list:
    """Which nodes were counted by FlopCounterMode (no cost rule) and which could not be counted at all."""
    costs = a.costs
    by_name = {r.name: r for r in a.records}
    lines = []
    for source, text in (("flop_counter", "MACs counted by torch's FlopCounterMode (no cost rule)"),
                         ("none", "MACs NOT counted (no cost rule, FlopCounterMode could not run them)")):
        names = [n for n, c in costs.items() if c.source == source]
        if names:
            shown = ", ".join(label(a, by_name[n]) if n in by_name else n for n in names[:8])
            lines += textwrap.wrap(f"{len(names)} node(s) with {text}: {shown}" + (", ..." if len(names) > 8 else ""),
                                   prose)
    return lines


def terminal_width() -> int:
    """The terminal's width in columns (the COLUMNS variable first; 80 when the output is not a terminal)."""
    return shutil.get_terminal_size((80, 24)).columns


def table(a, width: int | None = 80, depth: int | None = None) -> str:
    """The analysis for a terminal, every line at most `width` characters (None: the terminal's width; layer names
    are clipped from the left).

    One row per conv and linear layer in graph order, grouped by stage (a separator line with w_0, c_0 and V_0
    opens each stage), named by module path (the fx node name where no module path names it) with its output
    shape; each stage ends with a total row (its widest 3DRF, its params and MACs); the model total and the exact
    counts close the table. '*' marks a 3DRF that covers the whole stage input (saturated). depth: group the rows
    by the first `depth` parts of their module path, as torchinfo's depth does (`depth=1`: `layer1`, `layer2`...).
    """
    width = terminal_width() if width is None else width
    summaries = stage_summaries(a)
    rows_by_stage = _layer_rows(a) if depth is None else _tree_rows(a, depth)
    grand = _cost_sum(a.costs.values())
    every = [list(_COLUMNS), _sum_row("total", grand)] + [_stage_total_row(s) for s in summaries]
    cols = _layout(every + [row for rs in rows_by_stage.values() for row in rs], width)
    line_w = min(width, cols.line_w)
    prose = min(width, max(line_w, 60))  # text wraps to the table's width
    lines = _legend(a, summaries, width, prose) + ["", cols.fmt(_COLUMNS)]
    for s in summaries:
        lines += _stage_lines(a, s, rows_by_stage.get(s.stage.index, []), cols, line_w)
    outside = [c for r in a.records if r.stage is None and (c := a.costs.get(r.name)) is not None] + _unrecorded(a)
    if None in rows_by_stage or outside:
        lines.append(_clip_right("-- outside any stage ", line_w).ljust(line_w, "-"))
        lines += [cols.fmt(row) for row in rows_by_stage.get(None, [])]
        lines.append(cols.fmt(_sum_row("outside total", _cost_sum(outside))))
    lines += ["=" * line_w, cols.fmt(_sum_row("total", grand))] + _exact_counts(grand, width)
    lines += _cost_notes(a, width, prose)
    if a.unsupported:
        lines.append("")
        lines += textwrap.wrap(f"{len(a.unsupported)} node(s) without an exact rule, analysed conservatively:",
                               prose)
        lines += [_clip_right(f"  {n}: {t} ({why})", width) for n, t, why in a.unsupported]
    for w in getattr(a, "warnings", []):  # e.g. a gain 0 that rests on a gate's global context (local_gain says more)
        lines += [""] + textwrap.wrap(f"warning: {w}", prose)
    return "\n".join(lines)


def _clip(s: str, n: int) -> str:
    """Keep the end of a layer name (its most specific part)."""
    return s if len(s) <= n else "…" + s[-(n - 1):]


def _clip_right(s: str, n: int) -> str:
    return s if len(s) <= n else s[:n - 1] + "…"
