"""passes/surgery.py (graph edits any pass can use) and passes/util.py's activation and norm detection, against
torch itself: the edited graph computes what the equivalent nn.Sequential built by hand computes."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxrf
from fxrf.passes.surgery import add_modules, erase_chain, free_prefix, insert_after
from fxrf.passes.util import activation, is_norm, running_norm


def test_insert_after_runs_the_chain_between_a_node_and_its_consumers():
    torch.manual_seed(0)
    conv, tail, extra = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 4, 1)
    gm = fxrf.trace(nn.Sequential(conv, nn.ReLU(), tail).eval(), (1, 3, 8, 8))
    relu = next(n for n in gm.graph.nodes if n.target == "1")
    prefix = free_prefix(gm, "extra")
    add_modules(gm, prefix, {"conv": extra}, training=False)
    nodes = insert_after(gm, relu, [("call_module", f"{prefix}.conv", (), {}),
                                    ("call_function", F.hardtanh, (-0.5, 0.5), {})])
    assert [n.op for n in nodes] == ["call_module", "call_function"] and prefix == "extra1"
    assert free_prefix(gm, "extra") == "extra2" and gm.get_submodule(prefix).training is False
    x = torch.randn(2, 3, 8, 8)
    expected = nn.Sequential(conv, nn.ReLU(), extra, nn.Hardtanh(-0.5, 0.5), tail).eval()(x)
    torch.testing.assert_close(gm(x), expected)


def test_erase_chain_reconnects_the_consumers():
    torch.manual_seed(0)
    a, b, c = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 2, 1)
    gm = fxrf.trace(nn.Sequential(a, nn.ReLU(), b, nn.BatchNorm2d(3), nn.ReLU(), c).eval(), (1, 3, 8, 8))
    chain = [x for x in gm.graph.nodes if x.op == "call_module" and x.target in ("2", "3", "4")]
    erase_chain(gm, chain, next(x for x in gm.graph.nodes if x.target == "1"))
    gm.recompile()
    assert [x.target for x in gm.graph.nodes if x.op == "call_module"] == ["0", "1", "5"]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm(x), nn.Sequential(a, nn.ReLU(), c).eval()(x))


class _Acts(nn.Module):
    def forward(self, x):
        y = F.hardtanh(x, -1.0, 1.0)
        z = torch.clamp(y, min=x.mean())  # a bound computed in the graph
        s = torch.softmax(z, 1)  # an activation, not per element
        return operator.add(nn.functional.leaky_relu(s, 0.2), s)


def test_activation_describes_the_call():
    gm = fxrf.trace(_Acts(), (1, 3, 4, 4))
    modules = dict(gm.named_modules())
    acts = {n.name: activation(n, modules) for n in gm.graph.nodes}
    ht = acts["hardtanh"]
    assert (ht.op, ht.target, ht.idempotent, ht.repeatable) == ("call_function", F.hardtanh, True, True)
    x = torch.linspace(-3, 3, 13)  # the description, applied twice, is the activation once with its bounds

    def again(v):
        return ht.target(v, *ht.args, **ht.kwargs)
    torch.testing.assert_close(again(again(x)), F.hardtanh(x, -1.0, 1.0))
    assert acts["clamp"].repeatable is False  # min=x.mean() is a graph value
    assert acts["softmax"] is not None and "per_element" not in acts["softmax"].traits
    assert acts["leaky_relu"].idempotent is False and acts["add"] is None and acts["x"] is None


@pytest.mark.parametrize("layer, norm, running", [
    (nn.BatchNorm2d(4), True, True),
    (nn.BatchNorm2d(4, track_running_stats=False), True, False),
    (nn.InstanceNorm2d(4, track_running_stats=True), True, False),  # not a batch norm: cannot pass through
    (nn.GroupNorm(2, 4), True, False),
    (nn.ReLU(), False, False),
])
def test_norm_detection(layer, norm, running):
    gm = fxrf.trace(nn.Sequential(nn.Conv2d(3, 4, 1), layer), (1, 3, 4, 4))
    modules = dict(gm.named_modules())
    node = next(n for n in gm.graph.nodes if n.target == "1")
    assert is_norm(node, modules) is norm
    assert (running_norm(node, modules) is layer) is running
