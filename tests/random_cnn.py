"""Random CNNs for property tests: a hypothesis strategy over small, traceable conv nets."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st


class RandomCNN(nn.Module):
    """Applies a list of op specs in order; every op is one the analysis has an exact rule for."""

    def __init__(self, cin: int, specs: list):
        super().__init__()
        self.specs = []
        self.layers = nn.ModuleList()
        c = cin
        for spec in specs:
            kind = spec[0]
            if kind == "conv":
                _, cout, k, dil, g, stride = spec
                g = g if c % g == 0 and cout % g == 0 else 1
                self.layers.append(nn.Sequential(nn.Conv2d(c, cout, k, stride, dil * (k - 1) // 2, dil, g),
                                                 nn.BatchNorm2d(cout), nn.ReLU()))
                c = cout
            elif kind == "dw":
                _, k, dil = spec
                self.layers.append(nn.Conv2d(c, c, k, 1, dil * (k - 1) // 2, dil, groups=c))
            elif kind == "pool":
                _, cls, k, s = spec
                self.layers.append(cls(k, s, (k - 1) // 2 if s == 1 else 0))
            elif kind == "res":
                _, k = spec
                self.layers.append(nn.Conv2d(c, c, k, padding=k // 2))
            elif kind == "cat":
                _, ca, cb = spec
                self.layers.append(nn.ModuleList([nn.Conv2d(c, ca, 1), nn.Conv2d(c, cb, 3, padding=1)]))
                c = ca + cb
            elif kind == "shuffle":
                if c % spec[1]:
                    continue
                self.layers.append(nn.ChannelShuffle(spec[1]))
            elif kind == "split":
                if c % 2:
                    continue
                self.layers.append(nn.Conv2d(c // 2, c // 2, 3, padding=1))
            elif kind == "se":
                self.layers.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1), nn.Sigmoid()))
            self.specs.append(kind)
        self.out_channels = c

    def forward(self, x):
        for kind, layer in zip(self.specs, self.layers):
            if kind == "res":
                x = x + layer(x)
            elif kind == "cat":
                x = torch.cat([layer[0](x), layer[1](x)], 1)
            elif kind == "split":
                a, b = x.chunk(2, dim=1)
                x = torch.cat([layer(b), a], 1)
            elif kind == "se":
                x = x * layer(x)
            else:
                x = layer(x)
        return F.relu(x)


_op = st.one_of(
    st.tuples(st.just("conv"), st.sampled_from([4, 6, 8, 12]), st.sampled_from([1, 3, 5]), st.sampled_from([1, 2]),
              st.sampled_from([1, 2, 4]), st.sampled_from([1, 1, 1, 2])),
    st.tuples(st.just("dw"), st.sampled_from([3, 5]), st.sampled_from([1, 2])),
    st.tuples(st.just("pool"), st.sampled_from([nn.MaxPool2d, nn.AvgPool2d]), st.sampled_from([2, 3]),
              st.sampled_from([1, 2])).map(lambda t: t if not (t[2] == 2 and t[3] == 1) else t[:3] + (2,)),
    st.tuples(st.just("res"), st.sampled_from([1, 3])),
    st.tuples(st.just("cat"), st.sampled_from([2, 4]), st.sampled_from([2, 4])),
    st.tuples(st.just("shuffle"), st.sampled_from([2, 4])),
    st.tuples(st.just("split")),
    st.tuples(st.just("se")),
)


@st.composite
def random_cnns(draw, max_ops: int = 6):
    """(model, input shape): 3-8 input channels, 7-15 px, up to `max_ops` ops."""
    cin = draw(st.integers(3, 8))
    size = draw(st.integers(7, 15))
    specs = draw(st.lists(_op, min_size=1, max_size=max_ops))
    torch.manual_seed(draw(st.integers(0, 2 ** 16)))
    return RandomCNN(cin, specs).eval(), (1, cin, size, size)


def assume_runnable(model: nn.Module, shape: tuple) -> None:
    """Reject a drawn net that pools its map away (its forward raises): not a model anyone could run."""
    try:
        with torch.no_grad():
            model(torch.zeros(shape))
    except RuntimeError:
        assume(False)
