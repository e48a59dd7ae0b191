"""include/exclude: an empty include is refused, not read as "every conv"."""
import pytest
import torch.nn as nn

import fxrf
from fxrf.errors import InputError
from fxrf.passes.select import Selection


def net():
    # convs at module paths "0" (3 -> 16, the first: skip_first leaves it) and "3" (16 -> 32)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()).eval()


SHAPE = (2, 3, 8, 8)


@pytest.mark.parametrize("empty", [list, tuple, lambda: iter([])])
def test_empty_include_is_refused_by_both_passes(empty):
    with pytest.raises(InputError, match=r"selects no conv: pass include=None"):
        fxrf.decompose(net(), SHAPE, recipe="DW+PW", include=empty())
    with pytest.raises(InputError, match=r"selects no conv: pass include=None"):
        fxrf.organize_stages(net(), SHAPE, include=empty())


def test_none_include_and_empty_exclude_select_every_conv():
    # the only eligible conv (skip_first leaves "0"): module "3", node "_3"
    for kw in ({}, {"include": None}, {"exclude": []}, {"include": None, "exclude": ()}):
        r = fxrf.decompose(net(), SHAPE, recipe="DW+PW", **kw)
        assert [c.conv for c in r.changes] == ["_3"], kw
    assert Selection(exclude=[]).everything


def test_include_selects_only_what_it_names():
    r = fxrf.decompose(net(), SHAPE, recipe="DW+PW", include=["0"], skip_first=False)
    assert [c.conv for c in r.changes] == ["_0"]

