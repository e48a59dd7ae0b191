"""The paper's Table 6 (kernel-level design on CIFAR-10 VGG16-opt), recomputed, and how many DW+RPW layers a
stage needs before its channel field is full.

    python benchmarks/table6.py

Every number comes from `decompose` on `fxrf.models.vgg_cifar((4, 3, 2, 3, 1))` (built on the meta device: no
weights are needed to count) and from fresh analyses; the paper's figures sit beside them for comparison.
"""
from __future__ import annotations

import torch

from fxrf.analysis import analyze
from fxrf.models import vgg_cifar

from fxrf.passes.decomposer import decompose

LAYOUT = (4, 3, 2, 3, 1)
INPUT = (1, 3, 32, 32)

# (recipe, MACs in millions, params in millions) as printed in the paper's Table 6 ("MFLOPs" are MACs).
PAPER = (
    ("S", 370, 9.64), ("DW+PW", 50, 1.11),
    ("DW+GPW-g2", 30, 0.67), ("DW+GPW-g4", 20, 0.36), ("DW+GPW-g8", 10, 0.20),
    ("DW+RPW-g2-o33", 30, 0.66), ("DW+RPW-g2-o50", 30, 0.66),
    ("DW+RPW-g4-o33", 20, 0.36), ("DW+RPW-g4-o50", 20, 0.36),
    ("DW+RPW-g8-o33", 10, 0.20), ("DW+RPW-g8-o50", 10, 0.20),
)


def _model():
    with torch.device("meta"):
        return vgg_cifar(LAYOUT)


def table6_rows() -> list[dict]:
    """One dict per row of Table 6: recipe, params, macs (main ops: conv + linear), extra_macs (norms,
    activations, pools), paper_params, paper_macs, and per stage (0..4) the quality and compact verdicts and the
    channel field reached at the stage's end (of c_0), plus the channel permutations left at run time."""
    rows = []
    for recipe, paper_macs, paper_params in PAPER:
        r = decompose(_model(), INPUT, recipe=recipe, transfer_weights=False)
        s = r.summary
        rows.append({
            "recipe": "Baseline" if recipe == "S" else recipe, "params": s["params_after"], "macs": s["macs_after"],
            "extra_macs": _extra(r.graph_module), "paper_params": int(paper_params * 1e6),
            "paper_macs": int(paper_macs * 1e6),
            "quality": [st.quality for st in r.stages], "compact": [st.compact for st in r.stages],
            "channel_field": [(st.rf_after[-1][1], st.rf_after[-1][3]) for st in r.stages],
            "permutations": s["permutations_remaining"], "permutations_folded": s["permutations_folded"],
        })
    return rows


def _extra(gm) -> int:
    from fxrf.cost import total
    return total(analyze(gm, INPUT).costs).extra_macs


def growth(recipe: str, channels: int = 64, layers: int = 10, size: int = 8) -> list[int]:
    """Channel field (of `channels`) after each of `layers` blocks of `recipe` in one stage, read from the analysis
    of a decomposed chain: a stem conv (kept), a pool that starts the stage, then `layers` standard 3x3 convs."""
    with torch.device("meta"):
        model = _chain(channels, layers)
    shape = (1, 3, 2 * size, 2 * size)
    r = decompose(model, shape, recipe=recipe, transfer_weights=False)
    a = analyze(r.graph_module, shape)
    return [a.record(c.output).rf.channel for c in r.changes]  # BlockChanges (folds are in r.folds)


def _chain(channels: int, layers: int):
    convs = [torch.nn.Conv2d(channels, channels, 3, padding=1) for _ in range(layers)]
    return torch.nn.Sequential(torch.nn.Conv2d(3, channels, 3, padding=1), torch.nn.MaxPool2d(2), *convs)


def rpw_layers(groups: int, overlap: int, channels: int = 64, max_layers: int = 12) -> int | None:
    """How many DW+RPW layers a stage needs before every channel sees all `channels` stage-input channels."""
    fields = growth(f"DW+RPW-g{groups}-o{overlap}", channels, max_layers)
    return next((i + 1 for i, c in enumerate(fields) if c == channels), None)


def format_table6(rows: list[dict] | None = None) -> str:
    rows = table6_rows() if rows is None else rows
    lines = [
        "Table 6: kernel-level design on CIFAR-10 VGG16-opt (stage convs 4,3,2,3,1; every conv but the first replaced)",
        "MACs: conv + linear multiply-accumulates; +extra: with norms, activations and pools (1 per element); the",
        "paper's MFLOPs are MACs rounded to 10M. Q / C: quality / compact verdict per stage 0-4 (+ holds, - fails;",
        "a stage without blocks holds both); field: channels its last map sees, of c_0; perms: runtime",
        "permutations left",
        "",
        f"{'recipe':<15} {'MACs':>7} {'+extra':>7} {'paper':>5} {'params':>7} {'paper':>5}  {'Q':<5} {'C':<5}  "
        f"{'field per stage':<30} {'perms':>5}",
    ]
    for r in rows:
        q = "".join("+" if v else "-" for v in r["quality"])
        c = "".join("+" if v else "-" for v in r["compact"])
        field = " ".join(f"{n}/{c0}" for n, c0 in r["channel_field"])
        lines.append(f"{r['recipe']:<15} {r['macs'] / 1e6:>6.1f}M {(r['macs'] + r['extra_macs']) / 1e6:>6.1f}M "
                     f"{r['paper_macs'] / 1e6:>4.0f}M "
                     f"{r['params'] / 1e6:>6.3f}M {r['paper_params'] / 1e6:>4.2f}M  {q:<5} {c:<5}  {field:<30} "
                     f"{r['permutations']:>5}")
    return "\n".join(lines)


def format_rpw(groups=(2, 4, 8), overlaps=(33, 50), widths=(64, 512)) -> str:
    """Layers of DW+RPW a stage needs for the full channel field, and the field after each layer."""
    lines = ["DW+RPW: layers in one stage until every channel sees all c_0 stage-input channels",
             f"{'G':>3} {'o':>4} " + " ".join(f"{'c0=' + str(w):>7}" for w in widths)
             + "   field after each layer (c0=64)"]
    for g in groups:
        for o in overlaps:
            counts = [rpw_layers(g, o, w) for w in widths]
            fields = growth(f"DW+RPW-g{g}-o{o}", 64, g + 1)
            lines.append(f"{g:>3} {o:>3}% " + " ".join(f"{c if c else 'never':>7}" for c in counts) + "   "
                         + " ".join(str(x) for x in fields))
    for g in groups:  # plain grouped pointwise: stuck at c0 / G however many layers
        counts = [next((i + 1 for i, c in enumerate(growth(f"DW+GPW-g{g}", w, 12)) if c == w), None) for w in widths]
        lines.append(f"{g:>3} GPW  " + " ".join(f"{c if c else 'never':>7}" for c in counts) + "   "
                     + " ".join(str(x) for x in growth(f"DW+GPW-g{g}", 64, g + 1)))
    return "\n".join(lines)


def main() -> None:
    print(format_table6())
    print()
    print(format_rpw())


if __name__ == "__main__":
    main()
