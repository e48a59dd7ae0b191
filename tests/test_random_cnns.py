"""Property tests on hypothesis-generated CNNs: the analysis equals autograd, node by node, channel by channel."""
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings

import fxrf
from oracle import compare
from random_cnn import random_cnns

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(case):
    model, shape = case
    try:
        model(torch.rand(shape))
    except RuntimeError:  # the random net pooled its map away: not a model anyone could run
        assume(False)
    a = fxrf.analyze(model, shape)
    assert not a.unsupported, a.unsupported
    for reference in ("stage", "input"):
        problems, checked = compare(model, shape, a, reference=reference)
        assert checked > 0
        assert not problems, f"{reference}: {model.specs}\n" + "\n".join(problems)
    # every conv has a record with a field and, unless it starts a stage, a gain
    starts = {n for s in a.stages for n in s.inputs}
    for r in a.convs():
        assert r.rf is not None and r.input_rf is not None
        assert (r.gain is None) == (r.name in starts)


@FAST
@given(random_cnns())
def test_random_cnn_matches_autograd(case):
    _check(case)


@pytest.mark.slow
@SLOW
@given(random_cnns(max_ops=10))
def test_random_cnn_matches_autograd_many(case):
    _check(case)
