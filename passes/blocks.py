"""The block catalog of the kernel-level decomposer: what may replace a standard k x k conv.

Each kind of block is one row of `CATALOG` (a `Kind`): its name and recipe parameters (from which its recipe names,
their parser and the parser's list of valid recipes are derived), its layers (`Step`s), the weight transfer that
initialises it, the candidates recipe="auto" tries and its doc line. Adding a block is adding a row (see
docs/decomposer.md, "Adding a block"); `decompose(..., catalog=...)` takes a catalog as a value. One builder
(`build`) turns a row plus the conv it replaces into a `Block` (the layers as modules) and a program; one emitter
(`emit`) writes that program into an fx graph. The decomposer emits into the model's graph; `measure` emits the
same program into a graph of its own and reads the block's 3DRF and cost from `fxrf.analyze` and `fxrf.cost` on it.
No number about a block is written by hand.

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
import itertools
import operator
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from fxrf.errors import InputError

from . import transfer
from .util import Template, conv_template, identity_norm, module_of

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
class Param:
    """A recipe parameter: the `Recipe` field it sets, its letter in a recipe name ("-g4"), the value the error
    text shows as an example, and what the parser accepts after the number ("%" after an overlap)."""

    field: str
    letter: str
    example: int
    suffix: str = ""


PARAMS = {p.field: p for p in (Param("groups", "g", 4), Param("overlap", "o", 50, "%?"), Param("expansion", "e", 6))}


@dataclass(frozen=True)
class Kind:
    """One kind of block, registered once: a row of the catalog. Everything else is derived from the rows: the
    recipe names and their parser (with the list of valid recipes in its error), what recipe="auto" tries, the
    channel rotation of RPW (a "roll" step), the layers and the weight transfer."""

    name: str  # the recipe name without parameters: "DW+RPW"
    params: tuple  # Recipe fields its recipe names set, in order: ("groups", "overlap") -> "DW+RPW-g4-o50"
    steps: tuple  # its layers (`Step`s) in order; () keeps the conv
    factorize: Callable | None  # the weight transfer: (weight, bias, recipe, shift) -> transfer.Factors
    flow: str  # the doc line: its channel flow (docs/decomposer.md draws it)
    auto: tuple = ()  # what recipe="auto" tries: one tuple of `params` values per candidate; () never

    @property
    def syntax(self) -> str:
        """The regex of the recipe names that select this kind (case is ignored)."""
        return re.escape(self.name) + "".join(
            rf"-{PARAMS[f].letter}(?P<{f}>\d+){PARAMS[f].suffix}" for f in self.params)

    @property
    def example(self) -> str:
        return self.recipe(*(PARAMS[f].example for f in self.params)).name

    @property
    def rotates(self) -> bool:
        """Its groups are rotated against the previous grouped layer of the stage (the RPW shift)."""
        return any(s.op == "roll" for s in self.steps)

    def recipe(self, *values: int) -> "Recipe":
        return Recipe(self, **dict(zip(self.params, values)))


@dataclass(frozen=True)
class Recipe:
    """A kind with its parameters: groups G, overlap o (percent of a group), expansion e."""

    kind: Kind
    groups: int = 1
    overlap: int = 0
    expansion: int = 1

    @property
    def name(self) -> str:
        return self.kind.name + "".join(f"-{PARAMS[f].letter}{getattr(self, f)}" for f in self.kind.params)

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
        """Channels the RPW groups are rotated by: o% of an input group (at least 1, less than a group); 0 for a
        kind without a roll step."""
        if not self.kind.rotates:
            return 0
        m = conv.in_channels // self.groups
        return min(max(1, round(self.overlap * m / 100)), m - 1) if m > 1 else 0


def parse(text: str | Recipe, catalog=None) -> Recipe:
    """'DW+RPW-g4-o50' -> Recipe(kind DW+RPW, groups 4, overlap 50), from the first row of `catalog` (default: CATALOG)
    whose syntax matches (a Recipe comes back as it is).

    >>> parse("dw+rpw-g4-o50%").name
    'DW+RPW-g4-o50'
    """
    if isinstance(text, Recipe):
        return text
    catalog = CATALOG if catalog is None else catalog
    for kind in catalog:
        m = re.fullmatch(kind.syntax, text.strip(), flags=re.IGNORECASE)
        if m:
            r = Recipe(kind, **{k: int(v) for k, v in m.groupdict().items() if v is not None})
            if r.groups < 1 or r.expansion < 1 or not 0 <= r.overlap < 100:
                raise InputError(f"recipe {text!r}: groups and expansion must be >= 1, overlap in 0..99")
            return r
    names = ["auto"] + [k.example for k in catalog]
    raise InputError(f"unknown recipe {text!r}; use {', '.join(names[:-1])} or {names[-1]}")


def check_catalog(catalog) -> tuple[Kind, ...]:
    """The catalog as a tuple, checked: names unique (case is ignored), parameters known, auto values complete."""
    seen: set = set()
    for kind in catalog:
        if kind.name.lower() in seen:
            raise InputError(f"block kind {kind.name!r} is in the catalog twice; give the new row its own name")
        seen.add(kind.name.lower())
        unknown = [f for f in kind.params if f not in PARAMS]
        if unknown:
            raise InputError(f"block kind {kind.name!r}: unknown recipe parameters {unknown}; use {sorted(PARAMS)}")
        if any(len(v) != len(kind.params) for v in kind.auto):
            raise InputError(f"block kind {kind.name!r}: each auto candidate needs one value per {kind.params}")
    return tuple(catalog)


def auto_candidates(catalog=None) -> tuple[str, ...]:
    """The recipes recipe="auto" tries, catalog order (S, keeping the convs, is always a candidate as well)."""
    return tuple(k.recipe(*v).name for k in (CATALOG if catalog is None else catalog) for v in k.auto)


# ------------------------------------------------------------------------------------------------- the catalog

CATALOG: tuple[Kind, ...] = check_catalog((
    Kind("S", (), (), None, "C -conv kxk-> O (kept as is)"),
    Kind("DW+PW", (), (DW, PW), lambda w, b, r, s: transfer.dw_pw(w, b),
         "C -dw kxk-> C -pw 1x1-> O (MobileNet)", auto=((),)),
    Kind("DW+GPW", ("groups",), (DW, GPW), lambda w, b, r, s: transfer.dw_pw(w, b, r.groups),
         "C -dw kxk-> C -pw 1x1, G groups-> O", auto=((2,), (4,), (8,))),
    Kind("DW+RPW", ("groups", "overlap"), (DW, SHIFT, GPW), lambda w, b, r, s: transfer.dw_pw(w, b, r.groups, s),
         "C -dw kxk-> C -roll o% of a group-> C -pw 1x1, G groups-> O (groups shifted against the previous layer)",
         auto=tuple(itertools.product((2, 4, 8), (33, 50)))),
    Kind("GC+shuffle", ("groups",), (GC, SHUFFLE), lambda w, b, r, s: transfer.gc_shuffle(w, b, r.groups),
         "C -conv kxk, G groups-> O -shuffle G-> O (ShuffleNet)", auto=((2,), (4,), (8,))),
    Kind("PW+DW+PW", ("expansion",), (EXPAND, DW_HIDDEN, PW), lambda w, b, r, s: transfer.inverted(w, b, r.expansion),
         "C -pw-> eC -dw kxk-> eC -pw-> O (inverted bottleneck, MobileNetV2)", auto=((6,),)),
))
KINDS = {k.name: k for k in CATALOG}
AUTO_CANDIDATES: tuple[str, ...] = auto_candidates(CATALOG)


# ------------------------------------------------------------------------------------ the model's norm/activation


@dataclass(frozen=True, eq=False)
class Pattern(Template):
    """The norm and activation the model puts after its convs (templates; None: the model has none)."""

    @property
    def signature(self) -> tuple:
        """What a block's 3DRF and cost depend on: the kinds of norm and activation, and whether the norm is affine."""
        return (type(self.norm).__name__ if self.norm is not None else None, getattr(self.norm, "affine", None),
                type(self.act).__name__ if self.act is not None else None)

    def make_norm(self, channels: int, like: torch.Tensor) -> nn.Module | None:
        """A fresh norm for `channels`, the identity in eval mode (util.identity_norm); only for BatchNorm2d."""
        t = self.norm
        if not isinstance(t, nn.BatchNorm2d):
            return None
        return identity_norm(t, channels, device=like.device, dtype=like.dtype).train(t.training)

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
    for node in gm.graph.nodes:
        if not isinstance(module_of(node, modules), nn.Conv2d) or len(node.users) != 1:
            continue
        t = conv_template(node, modules)
        p = Pattern(t.norm, t.act)
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
    block = Block(recipe.name, shift).train(conv.training)  # the conv's mode, as every layer below takes
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
    key = (recipe, signature(conv), (1,) + tuple(in_shape[1:]), pattern.signature)  # the row: a toy may reuse a name
    if key not in _MEASURES:
        _MEASURES[key] = _measure(recipe, _meta_conv(key[1]), key[2], pattern)
    return _MEASURES[key]


def cost(recipe: Recipe | str, conv: nn.Conv2d, in_shape: tuple, pattern: Pattern = Pattern()):
    """fxrf.cost.Cost of the block alone (batch 1; cached): cheaper than `measure` (no 3DRF analyses)."""
    from fxrf.cost import model_cost, total
    from fxrf.trace import trace

    recipe = parse(recipe)
    key = (recipe, signature(conv), (1,) + tuple(in_shape[1:]), pattern.signature)  # the row: a toy may reuse a name
    if key not in _COSTS:
        gm, _ = isolated(recipe, _meta_conv(key[1]), key[2], pattern)
        trace(gm, key[2])
        _COSTS[key] = total(model_cost(gm))
    return _COSTS[key]


_MEASURES: dict = {}  # (Recipe, conv signature, input shape, pattern signature) -> Measure
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
