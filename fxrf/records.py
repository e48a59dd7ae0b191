"""The analysis' records: a receptive field (`RF`), a `Stage`, one frozen `NodeRecord` per node (under
`node.meta[META_KEY]`) and the `Analysis` that holds them, with its lookups by node name and module path."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field as dc_field

import torch.fx as fx

from .cost import model_cost
from .field import Field
from .metric import volume as volume_of
from .report import table as _table, to_dict as _to_dict

META_KEY = "fxrf"  # node.meta[META_KEY] holds the NodeRecord


@dataclass(frozen=True)
class RF:
    """A receptive field: spatial extent per dim (capped at the reference size unless the analysis ran with
    spatial_cap=False) and channel counts."""

    spatial: tuple
    channel: int
    channel_mean: float

    @property
    def height(self) -> int:
        return self.spatial[-2] if len(self.spatial) >= 2 else 1

    @property
    def width(self) -> int:
        return self.spatial[-1] if self.spatial else 1

    @property
    def volume(self) -> int:
        return volume_of(self.spatial, self.channel)


@dataclass(frozen=True)
class Stage:
    index: int
    resolution: tuple  # w_0 per spatial dim
    channels: int  # c_0
    inputs: tuple  # names of the nodes whose outputs make up the stage input

    @property
    def volume(self) -> int:  # V_0
        return volume_of(self.resolution, self.channels)


@dataclass(frozen=True, init=False)
class NodeRecord:
    """Everything the analysis knows about one node; stored in node.meta["fxrf"]."""

    name: str
    op: str
    target: str
    shape: tuple
    stage: int | None
    kernel: str | None  # conv kind: standard | pointwise | depthwise | grouped
    rf: RF | None  # 3DRF referenced to the stage input
    gain: float | None
    input_rf: RF | None  # referenced to the model input
    supported: bool
    field: Field | None = dc_field(repr=False, compare=False, default=None)  # exact per-channel sets (stage)
    input_field: Field | None = dc_field(repr=False, compare=False, default=None)
    path: str | None = None  # the module path the node belongs to (`layer1.0.conv1`), as state_dict keys spell it
    # The 3DRF through the local path: squeeze-excite gates and other global context (1x1 maps and vectors
    # computed from the whole stage) see nothing. Equal to `rf` where no gate is upstream (docs/concepts.md).
    local_rf: RF | None = None
    local_gain: float | None = None  # the gain computed from local_rf

    def __init__(self, name, op, target, shape, stage, kernel, rf, gain, input_rf, supported, field=None,
                 input_field=None, path=None, local_rf=None, local_gain=None):
        # (the frozen dataclass's own __init__ sets each field through object.__setattr__: one record per node)
        self.__dict__.update(name=name, op=op, target=target, shape=shape, stage=stage, kernel=kernel, rf=rf,
                             gain=gain, input_rf=input_rf, supported=supported, field=field,
                             input_field=input_field, path=path, local_rf=local_rf, local_gain=local_gain)


@dataclass
class Analysis:
    graph_module: fx.GraphModule
    model: str
    input_shape: tuple
    alpha: float
    stages: list
    records: list  # NodeRecord in graph order, tensor-valued nodes only
    unsupported: list  # (node name, target, reason)
    spatial_cap: bool = True  # False: spatial extents (and so volumes and gains) are not capped at w_0
    warnings: list = dc_field(default_factory=list)  # one line each, e.g. a gain 0 that rests on a gate
    # the walk that made it (fxrf.walk): its fields per node, which fxrf.analysis.extend starts from
    _walk: object = dc_field(default=None, repr=False, compare=False)

    def record(self, name: str) -> NodeRecord:
        """The record of a node, by its fx node name (`layer1_0_conv1`) or by module path (`layer1.0.conv1`: the
        module's output node). A dict lookup."""
        r = self.get(name)
        if r is None:
            raise KeyError(f"no node or module named {name!r}; nodes: "
                           f"{', '.join(r.name for r in self.records[:8])}, ...; modules: "
                           f"{', '.join(p for p in list(self._by_path)[:8])}, ...")
        return r

    @property
    def capture(self) -> str:
        """How the graph was captured: "fx" (torch.fx.symbolic_trace) or "export" (torch.export)."""
        return self.graph_module.meta.get("fxrf_capture", "fx")

    def get(self, name: str) -> NodeRecord | None:
        """`record(name)`, or None when there is no such node or module."""
        r = self._by_name.get(name)
        return r if r is not None else self._by_path.get(name)

    @functools.cached_property
    def _by_name(self) -> dict:
        return {r.name: r for r in self.records}

    @functools.cached_property
    def _by_path(self) -> dict:
        out: dict = {}
        for r in self.records:  # graph order: a module traced through maps to its last node, its output
            if r.path is not None:
                out[r.path] = r
        for r in self.records:  # a leaf module is its call_module node
            if r.op not in ("input", "constant") and r.target.split(" (")[0] == r.path:
                out[r.path] = r
        return out

    @functools.cached_property
    def _nodes(self) -> dict:
        """{node name: node} of the graph (for passes that look nodes up by the names in the records)."""
        return {n.name: n for n in self.graph_module.graph.nodes}

    @functools.cached_property
    def _modules(self) -> dict:
        """The graph module's named_modules() as a dict, read once per analysis."""
        return dict(self.graph_module.named_modules())

    def convs(self) -> list:
        return [r for r in self.records if r.kernel is not None]

    @functools.cached_property
    def costs(self) -> dict:
        """{node name: fxrf.cost.Cost}: params and MACs from shapes alone (computed on first use)."""
        return model_cost(self.graph_module)

    def to_dict(self) -> dict:
        return _to_dict(self)

    def table(self, width: int | None = 80, depth: int | None = None) -> str:
        return _table(self, width, depth)


def path_of(a: Analysis, node: str | None) -> str:
    """The name users see for a node of `a`: its module path where that path names this node, else the node name."""
    r = a.get(node) if node else None
    return (r.path if r is not None and r.path and a.get(r.path) is r else node) or ""


def map_size(f: Field, shape) -> tuple:
    """Pixels of the tensor's map along each reference dim (1 where it has been pooled away)."""
    return tuple(shape[a] if a is not None else 1 for a in f.sp)

