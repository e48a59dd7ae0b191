"""What the decomposer reports: one frozen record per eligible conv, replaced conv, declined conv, stage and tried
assignment, and the result that holds them (`Decomposition`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from .. import PassResult
from ..blocks import parse

KEEP, CLOSE = parse("S"), parse("DW+PW")  # the conv kept as it is; the block that closes a grouped stage


@dataclass(frozen=True)
class Site:
    """An eligible conv of the original graph."""

    node: str
    target: str
    stage: int
    in_shape: tuple
    starts_stage: bool  # a strided conv: its output starts the stage


@dataclass(frozen=True)
class BlockChange:
    """One conv replaced by a block."""

    conv: str  # node replaced
    target: str  # module path (now the Block container)
    stage: int
    recipe: str
    output: str  # the node that now stands for the conv's output
    shift: int  # DW+RPW: channels the groups are rotated by against the previous grouped layer (0: none)
    rf_conv: str  # 3DRF of the conv alone, its input as the reference (e.g. 3x3x64)
    rf_block: str  # the same for the block
    quality_block: bool  # the block alone reaches the conv's 3DRF (Figure 4)
    quality_layer: bool | None  # in the model, the block's output has the conv's 3DRF (None: starts a stage)
    compact: bool
    params_before: int  # the conv's own cost, and the block's (intermediate norms included)
    params_after: int
    macs_before: int
    macs_after: int
    transfer_error: float | None  # ||W - block's linear map||_F / ||W||_F, None without transfer

    def describe(self, before=None, after=None) -> str:
        return f"replace {self.target} by {self.recipe} (stage {self.stage}): 3DRF {self.rf_conv} -> {self.rf_block}"


@dataclass(frozen=True)
class Declined:
    """A planned conv the recipe cannot replace (kept as it is)."""

    conv: str
    recipe: str
    reason: str


class RFRow(NamedTuple):
    """A 3DRF as the stage verdicts compare it, referenced to its stage's input of c0 channels."""

    spatial: tuple
    channel: int
    channel_mean: float
    c0: int


class Trial(NamedTuple):
    """One assignment recipe="auto" tried for a stage, in the order tried."""

    assignment: str  # e.g. "DW+GPW-g8", "DW+GPW-g8 + DW+PW" (closed by one DW+PW block)
    macs: int
    params: int
    quality: bool | None  # None: not checked (not compact)
    compact: bool
    time_ms: float | None = None  # objective="latency": the stage's measured time with it (latency.py)


@dataclass(frozen=True)
class StageReport:
    stage: int
    resolution: tuple
    channels: int  # c_0 of the original stage
    convs: tuple  # the eligible convs, graph order
    blocks: tuple  # what each became ("S": kept)
    quality: bool  # the stage's 3DRF equals the original's
    compact: bool  # every block of the stage is compact
    ends: tuple  # ((end node before, its node after), ...)
    rf_before: tuple  # per end node an RFRow (spatial, channel, channel_mean, c_0), stage input as the reference
    rf_after: tuple
    params_before: int  # over every node of the stage
    params_after: int
    macs_before: int
    macs_after: int
    moved_start: bool = False  # a strided block starts the stage earlier: compared "at least", see the package doc
    tried: tuple = ()  # auto: a Trial (assignment, macs, params, quality, compact) per assignment, in the order tried


@dataclass
class Decomposition(PassResult):
    """What `decompose` did. graph_module: the new model; changes: a BlockChange per replaced conv (graph order);
    folds: a fold.FoldChange per inserted permutation folded into a conv; declined: a Declined per conv its recipe
    could not replace; stages: a StageReport per stage of the original graph; summary: totals (params and MACs
    before and after, counts, verdicts, the stage reports as dicts)."""

    folds: list = field(default_factory=list)
    stages: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = super().to_dict()  # changes, summary (which holds the stages and the declined convs as dicts)
        d["folds"] = [asdict(f) for f in self.folds]
        return d
