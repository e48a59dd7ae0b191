"""The organizer never removes a conv on a gain that is not exact: one that rests on the conservative field of an
op without a rule, or on the saturation a gate's global context causes.

The ops without a rule are custom ops made up here (torch.library), which both captures keep as one opaque call
and which no future fxrf rule will cover.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxrf
from blocks import SEStage
from oracle import measure


@torch.library.custom_op("fxrf_tests::opaque", mutates_args=())
def opaque(x: torch.Tensor) -> torch.Tensor:
    """Per element (x itself), but fxrf cannot know: it has no rule for this op."""
    return x.clone()


@opaque.register_fake
def _(x):
    return torch.empty_like(x)


opaque.register_autograd(lambda ctx, g: g)  # d clone / dx = 1: the autograd oracle can see through it


@torch.library.custom_op("fxrf_tests::one_minus", mutates_args=())
def one_minus(x: torch.Tensor) -> torch.Tensor:
    """1 - x, like aten.rsub, which may get a rule one day; this op never will."""
    return 1 - x


@one_minus.register_fake
def _(x):
    return torch.empty_like(x)


one_minus.register_autograd(lambda ctx, g: -g)


class Opaque(nn.Module):
    def forward(self, x):
        return torch.ops.fxrf_tests.opaque(torch.relu(x))


class Gate(nn.Module):
    """g * x + (1 - g) * relu(x), g = sigmoid(x): per element, with `1 - g` an op without a rule."""

    def forward(self, x):
        g = torch.sigmoid(x)
        return g * x + torch.ops.fxrf_tests.one_minus(g) * torch.relu(x)


def opaque_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), Opaque(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())


def gate_net():
    layers = [nn.Conv2d(3, 8, 3, padding=1), Gate()]
    for _ in range(3):
        layers += [nn.Conv2d(8, 8, 3, padding=1), Gate()]
    return nn.Sequential(*layers)


SHAPE = (1, 3, 16, 16)


def _removed(r):
    return [c.node for c in r.changes if c.kind == "remove"]


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_conv_after_an_op_without_a_rule_is_kept(capture):
    torch.manual_seed(0)
    net = opaque_net()
    a = fxrf.analyze(net, SHAPE, capture=capture)
    last = a.convs()[-1]
    assert [t for _, t, _ in a.unsupported] and last.gain == 0  # the premise: the conservative field saturates
    # autograd: the last conv's input (the opaque op's output) sees two 3x3 convs, 5x5 of the 16x16 map, so the
    # stage is not saturated there and the gain 0 is an artifact of the conservative field
    src = a.graph_module.graph.find_nodes(op="call_function", target=torch.ops.fxrf_tests.opaque.default) \
        if capture == "export" else [n for n in a.graph_module.graph.nodes if n.name == "opaque"]
    seen = measure(net, SHAPE, a, names={src[0].name})[src[0].name]
    assert {ext for ext, _ in seen} == {(5, 5)}
    r = fxrf.organize_stages(fxrf.trace(net, SHAPE, capture=capture), SHAPE, macs_budget=None)
    assert _removed(r) == []
    kept = [d for d in r.declined if d.kind == "remove"]
    assert len(kept) == 1 and "conservative field of opaque" in kept[0].reason
    assert r.summary["convs_after"] == 3


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_gate_built_from_an_op_without_a_rule_removes_nothing(capture):
    # every conv after the first reads a gate whose `1 - g` has no rule: all three show gain 0 and must stay
    net = gate_net()
    gm = fxrf.trace(net, SHAPE, capture=capture)
    a = fxrf.analyze(gm, SHAPE)
    assert [round(r.gain, 4) for r in a.convs()[1:]] == [0.0, 0.0, 0.0]
    # autograd: the input of the last conv sees three 3x3 convs, 7x7 of 16x16: not saturated
    last_in = [n for n in a.graph_module.graph.nodes if n.name == a.convs()[-1].name][0].args[0]
    assert {ext for ext, _ in measure(net, SHAPE, a, names={last_in.name})[last_in.name]} == {(7, 7)}
    for strategy in ("greedy", "paper"):
        r = fxrf.organize_stages(gm, SHAPE, macs_budget=None, strategy=strategy)
        assert _removed(r) == [], strategy
        assert sum("conservative field" in d.reason for d in r.declined if d.kind == "remove") == 3, strategy


def test_gate_induced_saturation_does_not_justify_a_removal():
    # through the local path c1 3x3 -> c2 5x5 -> c3 7x7 over 4 channels of an 8x8x4 stage (V_0 = 256):
    # c2's local gain (100-36)/36 e^(-3*36/256) = 1.166, c3's (196-100)/100 e^(-3*100/256) = 0.2974; the gate
    # has seen the whole stage, so both full gains are 0
    v0 = 8 * 8 * 4
    local = {"c2": (100 - 36) / 36 * math.exp(-3 * 36 / v0), "c3": (196 - 100) / 100 * math.exp(-3 * 100 / v0)}
    r = fxrf.organize_stages(SEStage(), (1, 4, 8, 8), macs_budget=None, remove_below=0.0)
    assert _removed(r) == []  # gain 0 everywhere, but locally both convs grow the field
    kept = {d.node: d.reason for d in r.declined if d.kind == "remove"}
    assert {"c2", "c3"} <= set(kept)  # (the gate's own 1x1 convs are kept too: they change the width)
    for name, g in local.items():
        assert "gate-induced saturation" in kept[name] and f"{g:.4f}" in kept[name]
    # the default cutoff 0.3: c3's local gain 0.2974 <= 0.3 justifies its removal on its own; c2's does not
    r = fxrf.organize_stages(SEStage(), (1, 4, 8, 8), macs_budget=None)
    assert _removed(r) == ["c3"]
    assert any(d.node == "c2" and "gate-induced" in d.reason for d in r.declined)


def test_exact_saturation_is_still_removed():
    # control: on a 4x4x3 input, two 3x3 convs already see 4x4 (capped) x 3 channels = V_0, so the third conv's
    # exact gain is 0 and it goes
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    r = fxrf.organize_stages(net, (1, 3, 4, 4), macs_budget=None)
    assert "_4" in _removed(r)
