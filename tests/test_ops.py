"""The op table: one registration per op kind serves shapes, fields, costs and the passes' traits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxrf
import fxrf.ops
from fxrf import field
from fxrf.cost import Cost, model_cost
from fxrf.ops import DEFAULT, Op, OpTable
from fxrf.rules import per_output, same_shape
from fxrf.rules.conv import ConvSpec
from fxrf.rules.elementwise import per_element
from oracle import compare

# The whole of "add an activation": one registration (docs/architecture.md shows the same lines).
SOFTSIGN = Op("softsign", (nn.Softsign, F.softsign, "softsign"), shape=same_shape, rf=per_element,
              cost=per_output, kind="activation", traits={"per_element", "per_channel", "activation"})


def _softsign_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Softsign(), nn.Conv2d(8, 8, 3, padding=1)).eval()


def test_adding_an_activation_is_one_registration():
    model, shape = _softsign_model(), (1, 3, 16, 16)
    before = fxrf.analyze(model, shape)
    assert [u[0] for u in before.unsupported] == ["_1"]  # unknown: conservative and listed
    table = DEFAULT + OpTable([SOFTSIGN])
    a = fxrf.analyze(model, shape, rules=table)
    assert not a.unsupported
    problems, checked = compare(model, shape, a)  # the autograd oracle agrees on every node
    assert not problems and checked >= 3
    # cost: one op per output element, 8 x 16 x 16 = 2048 (hand count), kind "activation"
    assert model_cost(a.graph_module, table)["_1"] == Cost(0, 0, 2048, "activation")
    # the default table does not know it; FlopCounterMode counts nothing for it either: listed as uncounted
    assert model_cost(a.graph_module)["_1"] == Cost(0, 0, 0, "other", "none")
    # the lists the passes used to keep by hand are queries on the table
    assert nn.Softsign in table.targets("activation") and nn.Softsign in table.targets("per_channel")
    assert nn.Softsign not in DEFAULT.targets("activation")  # the override stayed scoped
    assert DEFAULT.lookup_target(nn.Softsign) is None


def test_the_passes_read_the_table(monkeypatch):
    """With the op in the default table, the decomposer's norm/activation template and permutation folding see it."""
    from fxrf.passes.blocks import model_pattern
    monkeypatch.setattr(fxrf.ops, "DEFAULT", DEFAULT + OpTable([SOFTSIGN]))
    gm = fxrf.trace(_softsign_model(), (1, 3, 16, 16))
    assert isinstance(model_pattern(gm).act, nn.Softsign)


def test_user_conv_like_rule_gets_kernel_type_and_gain():
    class MyConv(nn.Module):  # a conv written by hand; traced as a leaf
        def __init__(self, cin, cout):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))

        def forward(self, x):
            return F.conv2d(x, self.weight, padding=1)

    def spec(call):
        w = call.module.weight
        return ConvSpec(w.shape[1], w.shape[0], 1, (3, 3), (1, 1), (1, 1), (1, 1))

    def rf(call):  # every input channel, a 3x3 window
        f = call.args[0].field
        f = field.mix(f, call.module.weight.shape[0], 1, axis=f.idx_axis(1))
        return field.window(f, (3, 3), (1, 1), (1, 1), (1, 1))

    model = nn.Sequential(MyConv(3, 8), MyConv(8, 8))
    mine = OpTable()
    mine.rf_rule(MyConv, spec=spec)(rf)
    a = fxrf.analyze(model, (1, 3, 32, 32), rules=DEFAULT + mine, leaf_modules=[MyConv])
    assert [r.kernel for r in a.convs()] == ["standard", "standard"]
    # Table 2, variant 1 by hand: V0 = 32*32*3 = 3072, 3DRF 27 -> 75: (75 - 27)/27 * exp(-3 * 27/3072) = 1.7315
    assert a.record("_1").gain == pytest.approx(48 / 27 * math.exp(-3 * 27 / 3072), abs=1e-12)
    plain = OpTable()
    plain.rf_rule(MyConv)(rf)  # not declared conv-like: a field, but no kernel type and no gain
    b = fxrf.analyze(model, (1, 3, 32, 32), rules=DEFAULT + plain, leaf_modules=[MyConv])
    assert b.convs() == [] and b.record("_1").rf.volume == 75


def test_override_is_scoped_to_the_call():
    def declines(call):
        raise fxrf.Decline("test override")

    model, shape = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (1, 3, 8, 8)
    mine = OpTable([Op("relu", (nn.ReLU,), rf=declines)])
    a = fxrf.analyze(model, shape, rules=DEFAULT + mine)
    assert a.unsupported == [("_1", "1 (ReLU)", "test override")]
    assert fxrf.analyze(model, shape).unsupported == []
    assert (DEFAULT + mine).lookup_target(F.relu) is DEFAULT.lookup_target(F.relu)  # other targets untouched


def test_one_lookup_rule_for_subclasses_and_duplicates_raise():
    class MyReLU(nn.ReLU):
        pass

    assert DEFAULT.lookup_target(MyReLU) is DEFAULT.lookup_target(nn.ReLU)
    assert DEFAULT.lookup_target(F.relu_) is DEFAULT.lookup_target(torch.relu_)  # one object, two names
    with pytest.raises(fxrf.DuplicateRuleError, match="ReLU already has the op 'a'"):
        OpTable([Op("a", (nn.ReLU,)), Op("b", (nn.ReLU, nn.GELU))])
    with pytest.raises(ValueError, match="unknown traits"):
        Op("x", ("x",), traits={"elementwise"})


def test_subclass_with_its_own_forward_gets_its_shape_from_meta_execution():
    class SamePadConv(nn.Conv2d):  # timm's Conv2dSame: pads on the fly, so the closed form would be wrong
        def forward(self, x):
            return super().forward(F.pad(x, (1, 1, 1, 1)))

    model = nn.Sequential(SamePadConv(3, 4, 3))
    gm = fxrf.trace(model, (1, 3, 8, 8), leaf_modules=[SamePadConv])
    out = [n for n in gm.graph.nodes if n.op == "call_module"][0]
    assert tuple(out.meta["tensor_meta"].shape) == tuple(model(torch.randn(1, 3, 8, 8)).shape) == (1, 4, 8, 8)


def test_lazy_targets_resolve_once_their_module_is_imported():
    import torchvision.ops
    assert DEFAULT.lookup_target(torchvision.ops.StochasticDepth).name == "identity"
    assert DEFAULT.lookup_target(torchvision.ops.stochastic_depth).name == "identity"


def test_every_op_is_well_formed():
    for op in DEFAULT.ops():
        assert op.targets, op.name
        assert op.shape or op.rf or op.cost, op.name  # an op with no rule says nothing
        assert op.cost is None or op.kind != "other", op.name  # counted ops name their kind
