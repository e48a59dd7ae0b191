"""The block catalog of the kernel-level decomposer: what may replace a standard k x k conv.

Each kind of block is one row of `CATALOG`: its name, the recipe syntax that selects it, its layers (`Step`s) and
the weight transfer that initialises it. One builder (`build`) turns a row plus the conv it replaces into a
`Block` (the layers as modules) and a program; one emitter (`emit`) writes that program into an fx graph. The
decomposer emits into the model's graph; `measure` emits the same program into a graph of its own and reads the
block's 3DRF and cost from `fxrf.analyze` and `fxrf.cost` on it. No number about a block is written by hand.

    >>> import torch.nn as nn
    >>> conv = nn.Conv2d(64, 128, 3, padding=1)
    >>> [(m.recipe, m.rf_text, m.macs, m.compact) for m in (measure("S", conv, (1, 64, 16, 16)),
    ...                                                     measure("DW+PW", conv, (1, 64, 16, 16)))]
    [('S', '3x3x64', 18874368, True), ('DW+PW', '3x3x64', 2244608, True)]
    >>> measure("DW+GPW-g4", conv, (1, 64, 16, 16)).rf_text       # a group sees a quarter of the channels
    '3x3x16'
"""
from __future__ import annotations

import copy
import operator
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import transfer

# ---------------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Step:
    """One layer of a block."""

    op: str  # "conv" | "roll" (rotate channels: the RPW shift) | "shuffle" (nn.ChannelShuffle)
    name: str  # the child module's name in the Block, and the key of its weights in the transfer
    out: str = "out"  # a conv's output channels: "in" (the block's input channels), "hidden" (E x in), "out"
    window: bool = False  # the replaced conv's k x k window, stride, padding, dilation (else 1x1, stride 1)
    groups: str = "1"  # "1" | "G" (the recipe's groups) | "dw" (one group per channel)
    inner: bool = False  # an intermediate factor: followed by the model's own norm and activation


DW = Step("conv", "dw", out="in", window=True, groups="dw", inner=True)
PW = Step("conv", "pw")
GPW = Step("conv", "pw", groups="G")
SHIFT = Step("roll", "shift")
GC = Step("conv", "gc", window=True, groups="G")
SHUFFLE = Step("shuffle", "shuffle")
EXPAND = Step("conv", "expand", out="hidden", inner=True)
DW_HIDDEN = Step("conv", "dw", out="hidden", window=True, groups="dw", inner=True)


@dataclass(frozen=True)
class Kind:
    """A row of the catalog."""

    name: str
    syntax: str  # regex of the recipe names that select this kind (named groups g, o, e)
    steps: tuple
    factorize: Callable | None  # (weight, bias, recipe, shift) -> transfer.Factors
    flow: str  # the channel flow in one line (docs/decomposer.md draws it)


CATALOG: tuple[Kind, ...] = (
    Kind("S", r"S", (), None, "C -conv kxk-> O (kept as is)"),
    Kind("DW+PW", r"DW\+PW", (DW, PW),
         lambda w, b, r, s: transfer.dw_pw(w, b), "C -dw kxk-> C -pw 1x1-> O (MobileNet)"),
    Kind("DW+GPW", r"DW\+GPW-g(?P<g>\d+)", (DW, GPW),
         lambda w, b, r, s: transfer.dw_pw(w, b, r.groups), "C -dw kxk-> C -pw 1x1, G groups-> O"),
    Kind("DW+RPW", r"DW\+RPW-g(?P<g>\d+)-o(?P<o>\d+)%?", (DW, SHIFT, GPW),
         lambda w, b, r, s: transfer.dw_pw(w, b, r.groups, s),
         "C -dw kxk-> C -roll o% of a group-> C -pw 1x1, G groups-> O (groups shifted against the previous layer)"),
    Kind("GC+shuffle", r"GC\+shuffle-g(?P<g>\d+)", (GC, SHUFFLE),
         lambda w, b, r, s: transfer.gc_shuffle(w, b, r.groups),
         "C -conv kxk, G groups-> O -shuffle G-> O (ShuffleNet)"),
    Kind("PW+DW+PW", r"PW\+DW\+PW-e(?P<e>\d+)", (EXPAND, DW_HIDDEN, PW),
         lambda w, b, r, s: transfer.inverted(w, b, r.expansion),
         "C -pw-> eC -dw kxk-> eC -pw-> O (inverted bottleneck, MobileNetV2)"),
)
KINDS = {k.name: k for k in CATALOG}

# What recipe="auto" tries, per stage (S, keeping the convs, is always a candidate).
AUTO_CANDIDATES: tuple[str, ...] = (
    "DW+PW", "DW+GPW-g2", "DW+GPW-g4", "DW+GPW-g8",
    "DW+RPW-g2-o33", "DW+RPW-g2-o50", "DW+RPW-g4-o33", "DW+RPW-g4-o50", "DW+RPW-g8-o33", "DW+RPW-g8-o50",
    "GC+shuffle-g2", "GC+shuffle-g4", "GC+shuffle-g8", "PW+DW+PW-e6",
)


@dataclass(frozen=True)
class Recipe:
    """A kind with its parameters: groups G, overlap o (percent of a group), expansion e."""

    kind: Kind
    groups: int = 1
    overlap: int = 0
    expansion: int = 1

    @property
    def name(self) -> str:
        k = self.kind.name
        if k == "DW+GPW" or k == "GC+shuffle":
            return f"{k}-g{self.groups}"
        if k == "DW+RPW":
            return f"{k}-g{self.groups}-o{self.overlap}"
        if k == "PW+DW+PW":
            return f"{k}-e{self.expansion}"
        return k

    @property
    def keeps(self) -> bool:
        return not self.kind.steps

    def inapplicable(self, conv: nn.Conv2d) -> str | None:
        """Why this recipe cannot replace `conv` (None if it can)."""
        g = self.groups
        if g > 1 and (conv.in_channels % g or conv.out_channels % g):
            return f"{conv.in_channels} -> {conv.out_channels} channels are not divisible by {g} groups"
        return None

    def shift(self, conv: nn.Conv2d) -> int:
        """Channels the RPW groups are rotated by: o% of an input group (at least 1, less than a group)."""
        if self.kind.name != "DW+RPW":
            return 0
        m = conv.in_channels // self.groups
        return min(max(1, round(self.overlap * m / 100)), m - 1) if m > 1 else 0


def parse(text: str | Recipe) -> Recipe:
    """'DW+RPW-g4-o50' -> Recipe(kind DW+RPW, groups 4, overlap 50)."""
    if isinstance(text, Recipe):
        return text
    for kind in CATALOG:
        m = re.fullmatch(kind.syntax, text.strip(), flags=re.IGNORECASE)
        if m:
            d = {k: int(v) for k, v in m.groupdict().items() if v is not None}
            r = Recipe(kind, groups=d.get("g", 1), overlap=d.get("o", 0), expansion=d.get("e", 1))
            if r.groups < 1 or r.expansion < 1 or not 0 <= r.overlap < 100:
                raise ValueError(f"recipe {text!r}: groups and expansion must be >= 1, overlap in 0..99")
            return r
    raise ValueError(f"unknown recipe {text!r}; use auto, S, DW+PW, DW+GPW-g4, DW+RPW-g4-o50, GC+shuffle-g4 or "
                     f"PW+DW+PW-e6")


# ------------------------------------------------------------------------------------ the model's norm/activation

_ACT_FUNCTIONS = {F.relu: nn.ReLU, torch.relu: nn.ReLU, F.relu6: nn.ReLU6, F.silu: nn.SiLU, F.gelu: nn.GELU,
                  F.hardswish: nn.Hardswish, F.leaky_relu: nn.LeakyReLU, "relu": nn.ReLU}
_ACTS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardtanh, nn.PReLU)


@dataclass(frozen=True, eq=False)
class Pattern:
    """The norm and activation the model puts after its convs (templates; None: the model has none)."""

    norm: nn.Module | None = None
    act: nn.Module | None = None

    @property
    def signature(self) -> tuple:
        """What a block's 3DRF and cost depend on: the kinds of norm and activation, and whether the norm is affine."""
        return (type(self.norm).__name__ if self.norm is not None else None, getattr(self.norm, "affine", None),
                type(self.act).__name__ if self.act is not None else None)

    def make_norm(self, channels: int, like: torch.Tensor) -> nn.Module | None:
        """A fresh norm for `channels`, the identity in eval mode (running stats 0/1, weight sqrt(1 + eps))."""
        t = self.norm
        if not isinstance(t, nn.BatchNorm2d):
            return None
        bn = nn.BatchNorm2d(channels, t.eps, t.momentum, t.affine, t.track_running_stats, device=like.device,
                            dtype=like.dtype)
        if bn.affine and like.device.type != "meta":
            with torch.no_grad():
                bn.weight.fill_((1 + t.eps) ** 0.5)
        return bn.train(t.training)

    def make_act(self, channels: int) -> nn.Module | None:
        t = self.act
        if t is None:
            return None
        if isinstance(t, nn.PReLU):
            return nn.PReLU(1 if t.num_parameters == 1 else channels)
        return copy.deepcopy(t)


def model_pattern(gm: fx.GraphModule) -> Pattern:
    """The most common conv -> norm -> activation pattern of the graph (templates from its first occurrence)."""
    modules = dict(gm.named_modules())
    seen: Counter = Counter()
    first: dict = {}

    def act_of(node):
        if node.op == "call_module" and isinstance(modules.get(node.target), _ACTS):
            return modules[node.target]
        if node.op in ("call_function", "call_method") and node.target in _ACT_FUNCTIONS:
            return _ACT_FUNCTIONS[node.target]()
        return None

    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Conv2d) or len(node.users) != 1:
            continue
        nxt = next(iter(node.users))
        norm = modules.get(nxt.target) if nxt.op == "call_module" else None
        norm = norm if isinstance(norm, nn.modules.batchnorm._NormBase) else None
        after = next(iter(nxt.users)) if norm is not None and len(nxt.users) == 1 else (None if norm else nxt)
        act = act_of(after) if after is not None else None
        p = Pattern(norm, act)
        seen[p.signature] += 1
        first.setdefault(p.signature, p)
    if not seen:
        return Pattern()
    return first[seen.most_common(1)[0][0]]


# ------------------------------------------------------------------------------------------ building and emitting


class Block(nn.Module):
    """The layers of one factorized block (the graph calls them one by one: this container has no forward)."""

    def __init__(self, recipe: str, shift: int = 0):
        super().__init__()
        self.recipe = recipe
        self.shift = shift

    def extra_repr(self) -> str:
        return f"recipe={self.recipe!r}" + (f", shift={self.shift}" if self.shift else "")


def _channels(step: Step, conv: nn.Conv2d, recipe: Recipe) -> int:
    return {"in": conv.in_channels, "hidden": conv.in_channels * recipe.expansion, "out": conv.out_channels}[step.out]


def build(recipe: Recipe | str, conv: nn.Conv2d, pattern: Pattern = Pattern(), shift: int = 0):
    """(Block, program) replacing `conv`: the modules on the conv's device and dtype, untrained, and the program
    `emit` writes: ("module", child name) or ("roll", channels) per instruction."""
    recipe = parse(recipe)
    like = conv.weight
    block = Block(recipe.name, shift)
    program = []
    c = conv.in_channels
    if recipe.keeps:
        block.add_module("conv", copy.deepcopy(conv))
        return block, [("module", "conv")]
    last = max(i for i, s in enumerate(recipe.kind.steps) if s.op == "conv")
    for i, step in enumerate(recipe.kind.steps):
        if step.op == "roll":
            if shift:
                program.append(("roll", shift))
            continue
        if step.op == "shuffle":
            block.add_module(step.name, nn.ChannelShuffle(recipe.groups))
            program.append(("module", step.name))
            continue
        out = _channels(step, conv, recipe)
        groups = {"1": 1, "G": recipe.groups, "dw": c}[step.groups]
        win = step.window
        m = nn.Conv2d(c, out, conv.kernel_size if win else 1, conv.stride if win else 1,
                      conv.padding if win else 0, conv.dilation if win else 1, groups,
                      bias=conv.bias is not None and i == last, padding_mode=conv.padding_mode if win else "zeros",
                      device=like.device, dtype=like.dtype)
        block.add_module(step.name, m.train(conv.training))
        program.append(("module", step.name))
        if step.inner:
            for suffix, layer in (("bn", pattern.make_norm(out, like)), ("act", pattern.make_act(out))):
                if layer is not None:
                    block.add_module(f"{step.name}_{suffix}", layer.train(conv.training))
                    program.append(("module", f"{step.name}_{suffix}"))
        c = out
    return block, program


def load(block: Block, recipe: Recipe | str, conv: nn.Conv2d) -> float:
    """Initialise the block's convs from `conv` (transfer.py); returns the relative Frobenius error."""
    recipe = parse(recipe)
    if recipe.keeps:
        block.conv.load_state_dict(conv.state_dict())
        return 0.0
    f = recipe.kind.factorize(conv.weight.detach(), None if conv.bias is None else conv.bias.detach(), recipe,
                              block.shift)
    with torch.no_grad():
        for name, (w, b) in f.weights.items():
            m = block.get_submodule(name)
            m.weight.copy_(w)
            if m.bias is not None and b is not None:
                m.bias.copy_(b)
    return f.error(conv.weight.detach())


def emit(graph: fx.Graph, path: str, program, x: fx.Node, remove: dict | None = None) -> list:
    """Write the program of the Block at `path` into `graph` after input `x`; returns the new nodes (the last one
    is the block's output). `remove`: {child: fn(graph, x) -> node} stands in for those convs ("N - x")."""
    base = path.replace(".", "_")
    nodes = []
    for op, arg in program:
        if op == "roll":
            x = graph.create_node("call_function", torch.roll, (x,), {"shifts": -arg, "dims": 1}, name=f"{base}_shift")
        elif remove and arg in remove:
            x = remove[arg](graph, x)
        else:
            x = graph.create_node("call_module", f"{path}.{arg}", (x,), {}, name=f"{base}_{arg}")
        nodes.append(x)
    return nodes


# -------------------------------------------------------------------------------------------- measuring a block


@dataclass(frozen=True)
class Measure:
    """A block alone, its input as the reference (the paper's Figure 4): 3DRF and cost from the analysis."""

    recipe: str
    rf: object  # fxrf.RF of the block's output, referenced to the block's input
    params: int
    macs: int
    extra_macs: int
    without: tuple  # ((conv child, 3DRF volume of the block with that conv passed through), ...)

    @property
    def rf_text(self) -> str:
        return "x".join(str(s) for s in self.rf.spatial) + f"x{self.rf.channel}"

    @property
    def compact(self) -> bool:
        """Removing any one factorized kernel makes the 3DRF smaller."""
        return all(v < self.rf.volume for _, v in self.without)


def signature(conv: nn.Conv2d) -> tuple:
    return (conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
            conv.padding if isinstance(conv.padding, str) else tuple(conv.padding), tuple(conv.dilation),
            conv.bias is not None, conv.padding_mode)


def measure(recipe: Recipe | str, conv: nn.Conv2d, in_shape: tuple, pattern: Pattern = Pattern()) -> Measure:
    """3DRF, cost and compactness of `recipe` replacing `conv` on an input of `in_shape` (batch 1; cached)."""
    recipe = parse(recipe)
    key = (recipe.name, signature(conv), (1,) + tuple(in_shape[1:]), pattern.signature)
    if key not in _MEASURES:
        _MEASURES[key] = _measure(recipe, _meta_conv(key[1]), key[2], pattern)
    return _MEASURES[key]


def cost(recipe: Recipe | str, conv: nn.Conv2d, in_shape: tuple, pattern: Pattern = Pattern()):
    """fxrf.cost.Cost of the block alone (batch 1; cached): cheaper than `measure` (no 3DRF analyses)."""
    from fxrf.cost import model_cost, total
    from fxrf.trace import trace

    recipe = parse(recipe)
    key = (recipe.name, signature(conv), (1,) + tuple(in_shape[1:]), pattern.signature)
    if key not in _COSTS:
        gm, _ = isolated(recipe, _meta_conv(key[1]), key[2], pattern)
        trace(gm, key[2])
        _COSTS[key] = total(model_cost(gm))
    return _COSTS[key]


_MEASURES: dict = {}  # (recipe, conv signature, input shape, pattern signature) -> Measure
_COSTS: dict = {}


def _meta_conv(sig) -> nn.Conv2d:
    cin, cout, k, s, p, d, bias, mode = sig
    return nn.Conv2d(cin, cout, k, s, p, d, bias=bias, padding_mode=mode, device="meta")


def _measure(recipe: Recipe, conv: nn.Conv2d, in_shape: tuple, pattern: Pattern) -> Measure:
    from fxrf.analysis import analyze

    gm, out = isolated(recipe, conv, in_shape, pattern)
    c = cost(recipe, conv, in_shape, pattern)
    without = []
    for child in _io(recipe, conv):
        g, o = isolated(recipe, conv, in_shape, pattern, remove=child)
        without.append((child, analyze(g, in_shape).record(o).input_rf.volume))
    return Measure(recipe.name, analyze(gm, in_shape).record(out).input_rf, c.params, c.macs, c.extra_macs,
                   tuple(without))


def _io(recipe: Recipe, conv: nn.Conv2d) -> dict:
    """{conv child: (in channels, out channels, has the window)} in block order."""
    if recipe.keeps:
        return {"conv": (conv.in_channels, conv.out_channels, True)}
    io, c = {}, conv.in_channels
    for step in recipe.kind.steps:
        if step.op == "conv":
            out = _channels(step, conv, recipe)
            io[step.name] = (c, out, step.window)
            c = out
    return io


def isolated(recipe: Recipe, conv: nn.Conv2d, in_shape: tuple, pattern: Pattern = Pattern(), remove: str | None = None):
    """(GraphModule of the block alone, name of its output node): the program the decomposer emits, with the conv
    child `remove` passed through (see `pass_through`) if given."""
    root = nn.Module()
    block, program = build(recipe, conv, pattern, recipe.shift(conv))
    root.add_module("block", block)
    graph = fx.Graph()
    x = graph.placeholder("x")
    cut = None
    if remove is not None:
        cin, cout, window = _io(recipe, conv)[remove]
        cut = {remove: lambda g, v: pass_through(g, v, root, cin, cout, conv if window else None, in_shape)}
    out = emit(graph, "block", program, x, cut)[-1]
    graph.output(out)
    return fx.GraphModule(root, graph), out.name


def pass_through(graph: fx.Graph, x: fx.Node, root: nn.Module, cin: int, cout: int, window: nn.Conv2d | None,
                 in_shape: tuple) -> fx.Node:
    """What is left of a conv once it is removed: its output shape, but no window and no channel mixing (output
    channel i is input channel i mod C_in; output pixel x is the input pixel under the centre of its window)."""
    if cout != cin:
        name = f"_keep_{len(root._buffers)}"
        root.register_buffer(name, torch.arange(cout) % cin)
        x = graph.create_node("call_function", torch.index_select, (x, 1, graph.create_node("get_attr", name)))
    if window is None:
        return x
    conv = window
    pads = conv.padding if not isinstance(conv.padding, str) else (
        (0,) * len(conv.kernel_size) if conv.padding == "valid" else
        tuple(dl * (kk - 1) // 2 for kk, dl in zip(conv.kernel_size, conv.dilation)))
    index = [slice(None), slice(None)]
    for size, kk, ss, pp, dl in zip(in_shape[2:], conv.kernel_size, conv.stride, pads, conv.dilation):
        n = (size + 2 * pp - dl * (kk - 1) - 1) // ss + 1
        a = dl * (kk - 1) // 2 - pp
        if a < 0:
            raise ValueError(f"a window padded beyond its half-width ({conv}) has no pass-through")
        index.append(slice(a, a + (n - 1) * ss + 1, ss))
    if any(sl != slice(0, n, 1) for sl, n in zip(index[2:], in_shape[2:])):
        x = graph.create_node("call_function", operator.getitem, (x, tuple(index)))
    return x
