"""What the organizer returns: the changes it made, the ones it declined, and the result that holds both."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from fxrf.analysis import Analysis, path_of

from .. import PassResult

__all__ = ["Change", "Declined", "OrganizerResult"]


@dataclass(frozen=True)
class Change:
    """One conv inserted into or removed from the graph, and the gain that justified it."""

    kind: str  # "insert" | "remove"
    stage: int
    node: str  # the conv: its node name in the result (insert) or in the input graph (remove)
    gain: float  # insert: the new conv's gain in the candidate graph; remove: the conv's own gain
    reason: str
    nodes: tuple  # every node added or removed (conv, norm, activation)
    after: str  # insert: the node the new conv reads; remove: the node its consumers read instead
    params: int  # parameters added (> 0) or removed (< 0)
    macs: int  # conv MACs added (> 0) or removed (< 0)
    place: str = ""  # insert: "end" (after the stage's last block) or "branch" (inside it, before its last conv)
    time_ms: float | None = None  # latency_budget: the conv's time alone (+ norm, act), ms; None: not timed

    def describe(self, before: Analysis, after: Analysis) -> str:
        """One line, the conv named by its module path (`before`: the pass's input, `after`: its output)."""
        gain = f", gain {self.gain:.4g}" if self.gain is not None else ""
        if self.kind == "remove":
            return f"remove {path_of(before, self.node)} (stage {self.stage}{gain}): {self.reason}"
        return f"insert {path_of(after, self.node)} (stage {self.stage}{gain}): {self.reason}"


@dataclass(frozen=True)
class Declined:
    """A change the organizer considered and did not make (one per stage for insertion), and why."""

    kind: str  # "insert" | "remove"
    stage: int | None
    node: str | None  # remove: the conv kept; insert: where the conv would have gone (None: no place)
    gain: float | None  # the gain it would have had / has
    reason: str


@dataclass
class OrganizerResult(PassResult):
    """declined: Declined records; analysis: fxrf.analyze of graph_module."""

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["declined"] = [asdict(x) for x in self.declined]
        return d
