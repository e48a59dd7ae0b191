"""A picture of an Analysis: per stage, the spatial and channel 3DRF and the gain of every conv, in graph order.

matplotlib is an optional extra (``pip install 'fxrf[plot]'``); it is imported only when a plot is drawn, and the
figure is rendered by the Agg canvas without pyplot: it works on a headless machine, opens no window and leaves the
caller's matplotlib backend (a notebook's, say) alone.

>>> import os, tempfile, torch.nn as nn, fxrf
>>> from fxrf.plot import plot_analysis
>>> a = fxrf.analyze(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)), (1, 3, 8, 8))
>>> path = os.path.join(tempfile.mkdtemp(), "rf.png")
>>> plot_analysis(a, path) == path and open(path, "rb").read(8) == b"\\x89PNG\\r\\n\\x1a\\n"
True
"""
from __future__ import annotations

import os

from .errors import FxrfError
from .report import gain_text, stage_summaries

# One colour per stage: matplotlib's tab10 without its red, spelled out so that fxrf.graph can use it without
# matplotlib. Red is kept for what is saturated (gain 0, a field that covers the whole stage input).
STAGE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
                "#7f7f7f")
SATURATED_COLOR = "#d62728"


def stage_color(index) -> str:
    return "#bbbbbb" if index is None else STAGE_COLORS[index % len(STAGE_COLORS)]


def _agg_figure(**kwargs):
    """A Figure drawn by the Agg canvas, without pyplot: no window, and the caller's backend is left alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise FxrfError("plotting needs matplotlib, an optional extra: pip install 'fxrf[plot]'") from e
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def plot_analysis(a, path) -> str:
    """Draw `a` (an fxrf Analysis) to `path` (the format follows the extension: .png, .svg, .pdf) and return path.

    Three panels share one x axis, the convs in graph order grouped by stage (shaded bands):
    the spatial 3DRF (pixels per side) against the stage's w_0, the channel 3DRF against c_0 (both on log2 axes,
    the caps dashed; a square marker means the field reached the cap), and the gain of each conv (symlog axis;
    a red X = gain 0, the conv adds nothing to the 3DRF; 'start' = the conv starts its stage, no gain). A stage
    whose 3DRF reaches V_0 is labelled 'saturated'.
    """
    fig = _agg_figure(figsize=(8.0, 9.0))
    summaries = [s for s in stage_summaries(a) if s.convs]
    convs = [r for s in summaries for r in s.convs]
    if not convs:
        raise FxrfError(f"nothing to plot: {a.model} has no convolutions in any stage")
    n = len(convs)
    dense = n > 40  # many convs: smaller labels, no value annotations on the 3DRF panels
    fig.set_size_inches(min(max(8.0, 0.42 * n + 2.5), 40.0), 9.0)
    ax_w, ax_c, ax_g = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [1, 1, 1.15]})
    fs = 7 if dense else 8
    spans = _spans(summaries)
    _spatial_panel(ax_w, spans, dense, fs)
    _channel_panel(ax_c, spans, dense, fs)
    _gain_panel(ax_g, spans, a.alpha, dense, fs)
    _conv_axis(ax_g, convs, fs)  # the shared x axis, labelled under the bottom panel
    _title_and_legend(fig, a)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _spans(summaries) -> list:
    """(stage summary, first x, last x) per stage: its convs' positions on the shared x axis."""
    x, spans = 0, []
    for s in summaries:
        spans.append((s, x, x + len(s.convs) - 1))
        x += len(s.convs)
    return spans


def _band(ax, st, x0, x1) -> None:
    """Every other stage shaded, so that the stages can be told apart."""
    if st.index % 2 == 0:
        ax.axvspan(x0 - 0.5, x1 + 0.5, color="#f2f2f2", zorder=0, lw=0)


def _spatial_panel(ax, spans, dense, fs) -> None:
    """The spatial 3DRF (pixels per side) of each conv, one line per stage, its cap w_0 dashed; the stage labels
    (and 'saturated') above the panel."""
    for s, x0, x1 in spans:
        st = s.stage
        color = stage_color(st.index)
        _band(ax, st, x0, x1)
        sp = [max(r.rf.spatial) if r.rf and r.rf.spatial else 1 for r in s.convs]
        full = [r.rf is not None and tuple(r.rf.spatial) == tuple(st.resolution) for r in s.convs]
        _series(ax, list(range(x0, x1 + 1)), sp, full, color, max(st.resolution), annotate=not dense, fs=fs)
        res = "x".join(map(str, st.resolution))
        label = f"stage {st.index}\n{res} px, c0 {st.channels}"
        ax.annotate(label, ((x0 + x1) / 2, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 14),
                    textcoords="offset points", ha="center", va="bottom", fontsize=fs, color=color,
                    fontweight="bold", annotation_clip=False)
        if s.saturated:
            ax.annotate("saturated", ((x0 + x1) / 2, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=fs,
                        color=SATURATED_COLOR, fontweight="bold", annotation_clip=False)
    _log2_axis(ax, max(max(s.stage.resolution) for s, _, _ in spans), "spatial 3DRF (px per side)")


def _channel_panel(ax, spans, dense, fs) -> None:
    """The channel 3DRF of each conv, one line per stage, its cap c_0 dashed."""
    for s, x0, x1 in spans:
        st = s.stage
        _band(ax, st, x0, x1)
        ch = [r.rf.channel if r.rf else 1 for r in s.convs]
        full = [r.rf is not None and r.rf.channel >= st.channels for r in s.convs]
        _series(ax, list(range(x0, x1 + 1)), ch, full, stage_color(st.index), st.channels, annotate=not dense,
                fs=fs)
    _log2_axis(ax, max(s.stage.channels for s, _, _ in spans), "channel 3DRF")


def _log2_axis(ax, top, what: str) -> None:
    ax.set_yscale("log", base=2)
    ax.set_ylim(0.45, top * 2.2)
    ax.set_ylabel(what)
    ax.yaxis.set_major_locator(_pow2_locator(top))
    ax.yaxis.set_major_formatter(_pow2_formatter())
    ax.grid(axis="y", which="major", color="#dddddd", lw=0.6, zorder=0)


def _gain_panel(ax, spans, alpha, dense, fs) -> None:
    """The gain of each conv: a bar, a red X for gain 0, 'start' for a conv that starts its stage (symlog axis)."""
    for s, x0, x1 in spans:
        color = stage_color(s.stage.index)
        _band(ax, s.stage, x0, x1)
        for xi, r in zip(range(x0, x1 + 1), s.convs):
            g = r.gain
            if g is None:
                ax.bar(xi, 0, color="none")
                ax.annotate("start", (xi, 0), xytext=(0, 3), textcoords="offset points", ha="center",
                            va="bottom", fontsize=fs - 1, color="#777777", rotation=90)
            elif g == 0:
                ax.plot([xi], [0], marker="X", ms=9, color=SATURATED_COLOR, zorder=4, ls="none")
                ax.annotate("0", (xi, 0), xytext=(0, 7), textcoords="offset points", ha="center",
                            va="bottom", fontsize=fs, color=SATURATED_COLOR, fontweight="bold")
            else:
                ax.bar(xi, g, width=0.7, color=color, alpha=0.85, zorder=3)
                ax.annotate(gain_text(g), (xi, g), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=fs, rotation=90 if dense else 0)
    ax.set_yscale("symlog", linthresh=1.0, linscale=1.0)
    gains = [r.gain for s, _, _ in spans for r in s.convs if r.gain]
    ax.set_ylim(-0.05, max(gains + [2.0]) * 8)
    ax.set_ylabel(f"gain (alpha = {alpha:g}, symlog)")
    ax.yaxis.set_major_formatter(_pow2_formatter())
    ax.grid(axis="y", which="major", color="#dddddd", lw=0.6, zorder=0)
    ax.axhline(0, color="#999999", lw=0.8, zorder=1)


def _conv_axis(ax, convs, fs) -> None:
    """One tick per conv: its name and kernel type."""
    n = len(convs)
    ax.set_xticks(range(n))
    ax.set_xticklabels([f"{r.path or r.name} ({_short_kernel(r.kernel)})" for r in convs], rotation=60, ha="right",
                       rotation_mode="anchor", fontsize=fs)
    ax.set_xlim(-0.6, n - 0.4)


def _title_and_legend(fig, a) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], color="#555555", marker="o", ms=5, ls="-", label="3DRF of the conv's output"),
               Line2D([], [], color="#555555", ls="--", label="cap: stage width w0 / stage input channels c0"),
               Line2D([], [], color="#555555", marker="s", ms=8, mec="black", ls="none",
                      label="field at the cap"),
               Patch(color="#888888", label="gain > 0 (log scale above 1)"),
               Line2D([], [], color=SATURATED_COLOR, marker="X", ls="none", ms=8,
                      label="gain 0: the conv adds nothing")]
    shape = "x".join(map(str, a.input_shape))
    fig.suptitle(f"{a.model}, input {shape}: 3DRF and gain of every conv, by stage", fontsize=12, y=0.995)
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.06, 1, 1.0))
    fig.subplots_adjust(hspace=0.12)


def _series(ax, xs, ys, full, color, cap, annotate, fs):
    ax.plot(xs, ys, color=color, marker="o", ms=5, lw=1.6, zorder=3)
    hit = [(x, y) for x, y, f in zip(xs, ys, full) if f]
    if hit:
        ax.plot(*zip(*hit), ls="none", marker="s", ms=8, mfc=color, mec="black", zorder=4)
    ax.hlines(cap, xs[0] - 0.4, xs[-1] + 0.4, colors=color, linestyles="--", lw=1.2, zorder=2)
    if ys[-1] != cap:  # else the last point's own label already says it
        ax.annotate(f"{cap}", (xs[-1] + 0.4, cap), xytext=(2, 0), textcoords="offset points", va="center",
                    ha="left", fontsize=fs - 1, color=color)
    if annotate:
        for x, y in zip(xs, ys):
            ax.annotate(str(y), (x, y), xytext=(0, -11), textcoords="offset points", ha="center", va="center",
                        fontsize=fs)


def _pow2_locator(top):
    """Every power of 2 up to `top` while that stays readable (at most 8 ticks), else every other one."""
    from matplotlib.ticker import FixedLocator
    k = max(int(top).bit_length(), 1)
    step = 1 if k <= 8 else 2
    return FixedLocator([2.0 ** i for i in range(0, k + 1, step)])


def _pow2_formatter():
    from matplotlib.ticker import FuncFormatter
    return FuncFormatter(lambda v, _: f"{v:g}")


def _short_kernel(kind) -> str:
    return {"standard": "std", "pointwise": "pw", "depthwise": "dw", "grouped": "grp"}.get(kind, kind or "?")
