"""The latency budget's clock: the input model timed whole, then each conv added or removed timed alone
(passes/latency.py, `LatencyModel.time_conv`), summed into one running prediction."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from fxrf.analysis import Analysis
from fxrf.errors import InputError

from ..util import copy_graph_module

__all__ = ["Clock", "start_clock", "ms", "round_ms"]


class Clock:
    """The latency budget's running prediction: the input model timed whole, plus each conv inserted, minus each
    conv removed, those timed alone (`LatencyModel.time_conv`: the conv, then the model's norm and activation).
    `now` is the one figure both the check and the update use: an accepted change never leaves it over `limit`
    (beyond float rounding)."""

    def __init__(self, lm, pattern, original: float, budget: float):
        self.lm, self.pattern, self.original, self.budget = lm, pattern, original, budget
        self.limit = original * budget
        self.now, self.added, self.removed = original, 0.0, 0.0
        self.untimed: list = []  # removed convs the latency model cannot time (grouped, functional): no saving

    def site(self, site) -> float:
        """Seconds of the conv `site` (a sites.Site) would insert."""
        return self.lm.time_conv(site.conv(torch.device("meta")), site.shape, self.pattern)

    def conv(self, gm, node: fx.Node, in_shape) -> float | None:
        """Seconds of a conv of the graph, or None where the latency model cannot time it: it times a standard
        nn.Conv2d (its signature has no groups, so a grouped conv would be priced as a dense one)."""
        m = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(m, nn.Conv2d) or m.groups != 1:
            return None
        return self.lm.time_conv(m, tuple(in_shape), self.pattern)

    def over(self, t: float, base: float | None = None) -> str | None:
        """Why `base` (default: the prediction now) + `t` seconds breaks the budget, naming the figures; or None.
        A relative 1e-9 is rounding (a swap of two equal times, 0.01 - 0.001 + 0.001 > 0.01), not a breach."""
        new = (self.now if base is None else base) + t
        if new <= self.limit * (1 + 1e-9):
            return None
        return (f"predicted {ms(new)} > {ms(self.limit)}, {self.budget:.2f}x the input model's "
                f"{ms(self.original)}")

    def add(self, t: float) -> None:
        self.now += t
        self.added += t

    def remove(self, t: float | None, name: str) -> None:
        if t is None:
            self.untimed.append(name)
            return
        self.now -= t
        self.removed += t

    def summary(self) -> dict:
        lm = self.lm
        return {"model": repr(lm), "device": lm.key, "batch": lm.batch, "mode": lm.mode,
                "original_ms": round_ms(self.original), "added_ms": round_ms(self.added),
                "removed_ms": round_ms(self.removed), "predicted_ms": round_ms(self.now),
                "limit_ms": round_ms(self.limit), "untimed_removed": list(self.untimed)}


def start_clock(work: fx.GraphModule, a: Analysis, budget: float, *, lm=None, device: str = "cpu",
                batch: int = 1) -> Clock:
    """The input model timed whole (an eval-mode copy, compiled; cached by its structure) and the model's norm
    and activation, which every conv is timed with (`lm`: the LatencyModel, None: LatencyModel(device, batch))."""
    from ..latency import LatencyModel, conv_pattern, input_shape

    flat = [s.index for s in a.stages if len(s.resolution) != 2]
    if flat:
        raise InputError(f"latency_budget: the latency model times 2-d convs only, and stage {flat[0]} is "
                         f"{len(a.stages[flat[0]].resolution)}-d: pass latency_budget=None")
    shape = input_shape(work, "latency_budget", "pass latency_budget=None")
    lm = LatencyModel(device, batch) if lm is None else lm
    whole = copy_graph_module(work, params="copy").eval()  # inference latency; `work`'s modules keep their mode
    return Clock(lm, conv_pattern(work), lm.time_model(whole, shape, "original"), budget)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def round_ms(seconds: float) -> float:
    return round(seconds * 1e3, 6)
