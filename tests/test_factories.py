"""Constant factories and masked_fill, checked against autograd (tests/oracle.py).

A factory's output (zeros_like, new_full, arange, fill_, ...) depends on no input value: autograd gives it no
gradient at all, so its field must be empty (None), and what adds it to a map sees exactly what the map sees.
Before these rules the factories got the conservative field (the whole map, every channel), and so did every
node after them. masked_fill(x, mask, v) with a constant mask is elementwise in x.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxrf
from oracle import compare, faithful_copy

pytestmark = pytest.mark.threads(1)
SHAPE = (1, 2, 8, 8)


def exact(model, capture, skip=()):
    """The analysis, after checking that every stage field equals autograd's and every input field bounds it (but
    on the nodes in `skip`: tensors written in place later, which autograd measures after the write)."""
    a = fxrf.analyze(model, SHAPE, capture=capture)
    assert a.capture == capture and a.unsupported == []
    problems, n = compare(model, SHAPE, a)
    assert n > 0 and [p for p in problems if p.split(" ")[0] not in skip] == []
    above, _ = compare(model, SHAPE, a, reference="input")
    assert [p for p in above if p.split(" ")[0] not in skip] == []
    return a


def autograd_sees_nothing(model, capture, name) -> bool:
    """Whether node `name` of the same capture has no gradient with respect to the model input (none, or all 0)."""
    x = (torch.rand(SHAPE, dtype=torch.float64) + 0.5).requires_grad_(True)
    gm = fxrf.trace(faithful_copy(model), x, capture=capture)
    values = {}

    class Run(fx.Interpreter):
        def run_node(self, n):
            values[n.name] = out = super().run_node(n)
            return out

    Run(gm).run(x)
    y = values[name]
    if not y.requires_grad:
        return True
    g = torch.autograd.grad(y.sum(), x, allow_unused=True)[0]
    return g is None or not g.any()


def factory_nodes(a) -> list[str]:
    gm = a.graph_module
    modules = dict(gm.named_modules())
    return [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method")
            and (op := fxrf.ops.DEFAULT.lookup(n, modules.get(n.target))) is not None and op.name == "factory"]


def _filled(y):  # fill_ on a copy of the map: from here on the copy is constant
    z = y.clone()
    z.fill_(1.0)
    return z


FACTORIES = {
    "zeros_like": lambda y: torch.zeros_like(y),
    "ones_like": lambda y: torch.ones_like(y),
    "full_like": lambda y: torch.full_like(y, 2.0),
    "empty_like.fill_": lambda y: torch.empty_like(y).fill_(1.0),
    "new_zeros": lambda y: y.new_zeros(y.shape),
    "new_ones": lambda y: y.new_ones((1, 3, 8, 8)),
    "new_full": lambda y: y.new_full((1, 3, 1, 1), 0.5),
    "new_empty.zero_": lambda y: y.new_empty((1, 3, 8, 8)).zero_(),
    "zeros": lambda y: torch.zeros(1, 3, 8, 8, dtype=y.dtype),
    "full": lambda y: torch.full((1, 1, 8, 8), 3.0, dtype=y.dtype),
    "arange": lambda y: torch.arange(8, dtype=y.dtype),
    "fill_ in place": _filled,
}


class WithFactory(nn.Module):
    """conv -> y + factory(y) -> conv: the sum sees what y sees (3x3, both channels), the last conv 5x5."""

    def __init__(self, make):
        super().__init__()
        self.make = make
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y + self.make(y))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("kind", list(FACTORIES))
def test_factory_sees_nothing(capture, kind):
    model = WithFactory(FACTORIES[kind]).eval()
    a = exact(model, capture, skip={"clone"})  # before: "no rule", and the sum and the last conv saw the whole 8x8 map
    names = factory_nodes(a)
    assert names
    for name in names:
        assert a.record(name).field is None and autograd_sees_nothing(model, capture, name)
    # autograd and by hand: a 3x3 conv after a 3x3 conv sees 5x5 of both input channels
    assert a.convs()[-1].rf.spatial == (5, 5) and a.convs()[-1].rf.channel == 2


class Masked(nn.Module):
    """conv -> masked_fill with a constant border mask -> conv. The centre is not masked, so there the output is
    y's element: autograd sees 3x3 of both channels at the masked_fill and 5x5 at the last conv."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        border = torch.ones(1, 1, 8, 8, dtype=torch.bool)
        border[..., 1:-1, 1:-1] = False
        self.register_buffer("mask", border)

    def forward(self, x):
        y = self.a(x)
        if self.form == "method":
            y = y.masked_fill(self.mask, 0.0)
        elif self.form == "function":
            y = torch.masked_fill(y, self.mask, -1.0)
        elif self.form == "in place":
            y = y * 2.0  # a copy to write into (relu's backward would need its output unchanged)
            y.masked_fill_(self.mask, 0.0)
        else:  # a mask made in forward from arange (a factory), compared: the first row
            y = y.masked_fill((torch.arange(8) < 1).view(1, 1, 8, 1), 0.0)
        return self.b(y)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("form", ["method", "function", "in place", "arange mask"])
def test_masked_fill_is_elementwise(capture, form):
    a = exact(Masked(form).eval(), capture)  # before: "no rule", the conservative 8x8
    r = next(r for r in a.records if r.op.startswith("masked_fill"))
    assert r.rf.spatial == (3, 3) and r.rf.channel == 2
    assert a.convs()[-1].rf.spatial == (5, 5) and a.convs()[-1].rf.channel == 2


class FillFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        return torch.zeros_like(y).fill_(y[0, 0, 0, 0])  # the fill value is computed from the input


def test_fill_with_a_value_from_the_input_declines():
    a = fxrf.analyze(FillFromInput().eval(), SHAPE, capture="fx")
    assert ("fill_", "fill_", "a fill value that is a tensor computed from the input") in a.unsupported
    assert a.record("fill_").field is not None  # conservative, not empty
