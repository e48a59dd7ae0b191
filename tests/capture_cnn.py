"""Random small CNNs that both captures (torch.fx and torch.export) can read, for the capture agreement tests.

A model is a chain of blocks; each block is one op kind from `BLOCKS` with drawn parameters. Every block keeps its
output positive where a kink follows (ReLU after a batch norm with positive statistics, sigmoid after anything that
can change sign), so the autograd oracle (tests/oracle.py) sees every dependence.

`KNOWN_BAD` lists the op kinds on which today's analysis is known to disagree with autograd; they are left out of
the default draw (`random_models(kinds=...)` includes them) and each has a strict-xfail test.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, strategies as st

# op kind -> why the analysis gets it wrong today (tests/test_capture_agreement.py holds one strict xfail per kind;
# the kinds fixed since, among them rsub, reciprocal, instance_norm, nearest_exact, batch statistics, tensor clamp
# bounds, max pool indices, writes into views and export's strided slice, are in the default draw)
KNOWN_BAD = {
    "pad_dilated": "reflect/replicate padding with dilation > 1 on a small map: declined and listed, with a "
                   "conservative field that contains autograd's (tests/test_padding_modes.py); not exact",
    "flatten_back": "flatten -> elementwise -> view back: the view back and what follows are exact now "
                    "(tests/test_flatten_round_trip.py), but the flattened tensors in between report the whole map "
                    "(9x9 where autograd sees 2x2 of the flat axis) without being listed as conservative",
    "se_expand": "squeeze-excite gate s[:, :, None, None].expand_as(x) * x: the fx capture declines the mul "
                 "('a channel-like axis broadcast against a spatial one'); export is exact",
    # found by this generator: a resample to a 1x1 map reads one pixel when its sample lands on a pixel centre
    # (align_corners=True: position 0; 3 -> 1 px: position 1.0); the analysis counts the whole interpolation
    # window (bilinear 2, bicubic 3 or 4, and fx and export disagree on bicubic 6 -> 1 with align_corners=True)
    "resample_to_one": "F.interpolate(x, size=1, mode='bilinear', align_corners=True) on 3x3: analysis extent 2, "
                       "autograd 1",
}


class Block(nn.Module):
    """Base: subclasses set `c`/`h` (output channels and map size) in __init__."""


class ConvBNReLU(Block):
    def __init__(self, c, h, cout, k, dil, groups, stride, mode):
        super().__init__()
        g = groups if c % groups == 0 and cout % groups == 0 else 1
        self.conv = nn.Conv2d(c, cout, k, stride, dil * (k - 1) // 2, dil, g, padding_mode=mode)
        self.bn, self.act = nn.BatchNorm2d(cout), nn.ReLU()
        self.c, self.h = cout, (h - 1) // stride + 1

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Depthwise(Block):
    def __init__(self, c, h, k, dil, mode):
        super().__init__()
        self.conv = nn.Conv2d(c, c, k, 1, dil * (k - 1) // 2, dil, groups=c, padding_mode=mode)
        self.c, self.h = c, h

    def forward(self, x):
        return self.conv(x)


class Pool(Block):
    def __init__(self, c, h, kind, k, s, pad, ceil, dil=1):
        super().__init__()
        self.pool = nn.MaxPool2d(k, s, pad, dil, ceil_mode=ceil) if kind == "max" else \
            nn.AvgPool2d(k, s, pad, ceil_mode=ceil)
        self.c = c
        self.h = int(self.pool(torch.zeros(1, 1, h, h)).shape[-1])

    def forward(self, x):
        return self.pool(x)


class Resample(Block):
    def __init__(self, c, h, mode, scale, align):
        super().__init__()
        self.mode, self.align = mode, align
        self.size = h * 2 if scale == 2 else h + 3 if scale == "up" else 1 if scale == "one" else max(h // 2, 1)
        self.c, self.h = c, self.size

    def forward(self, x):
        kw = {"align_corners": self.align} if self.mode in ("bilinear", "bicubic") else {}
        return F.interpolate(x, size=(self.size, self.size), mode=self.mode, **kw)


class Gate(Block):  # x * sigmoid(conv(x)), the SiLU-style spatial gate
    def __init__(self, c, h, k):
        super().__init__()
        self.conv = nn.Conv2d(c, c, k, padding=k // 2)
        self.c, self.h = c, h

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x))


class SE(Block):  # pool -> linear -> view -> mul
    def __init__(self, c, h, expand=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, max(c // 2, 1)), nn.Linear(max(c // 2, 1), c)
        self.expand = expand
        self.c, self.h = c, h

    def forward(self, x):
        n, c = x.shape[0], x.shape[1]
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1).flatten(1)))))
        return x * (s[:, :, None, None].expand_as(x) if self.expand else s.view(n, c, 1, 1))


class Shuffle(Block):  # ShuffleNet's view -> transpose -> view
    def __init__(self, c, h, groups):
        super().__init__()
        self.g, self.c, self.h = groups, c, h

    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, self.g, c // self.g, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class CatSplit(Block):
    def __init__(self, c, h, first):
        super().__init__()
        self.first = min(first, c - 1)
        self.conv = nn.Conv2d(c - self.first, c - self.first, 3, padding=1)
        self.c, self.h = c, h

    def forward(self, x):
        a, b = torch.split(x, [self.first, x.shape[1] - self.first], 1)
        return torch.cat([self.conv(b), a], 1)


class Residual(Block):
    def __init__(self, c, h, k):
        super().__init__()
        self.conv = nn.Conv2d(c, c, k, padding=k // 2)
        self.c, self.h = c, h

    def forward(self, x):
        return x + self.conv(x)


class InplaceView(Block):  # a write into a view of a copy
    def __init__(self, c, h):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.c, self.h = c, h

    def forward(self, x):
        z = self.conv(x)
        y = x.clone()
        y[:, 0:1].copy_(z[:, 0:1])  # `y[:, 0:1] = ...` cannot be traced by torch.fx (Proxy has no __setitem__)
        return y


class FlattenBack(Block):  # flatten -> elementwise -> view back
    def __init__(self, c, h):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.c, self.h = c, h

    def forward(self, x):
        n, c, h, w = x.shape
        return self.conv(torch.sigmoid(x.flatten(2)).view(n, c, h, w))


class Rsub(Block):
    def __init__(self, c, h):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.c, self.h = c, h

    def forward(self, x):
        return x * (1 - torch.sigmoid(self.conv(x)))


class Reciprocal(Block):
    def __init__(self, c, h):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.c, self.h = c, h

    def forward(self, x):
        return x * torch.reciprocal(1 + self.conv(x))


class Norm(Block):  # statistics over the whole map; sigmoid keeps what follows positive
    def __init__(self, c, h, kind):
        super().__init__()
        self.norm = nn.InstanceNorm2d(c, affine=True) if kind == "instance" else \
            nn.BatchNorm2d(c, track_running_stats=False)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.c, self.h = c, h

    def forward(self, x):
        return torch.sigmoid(self.norm(self.conv(x)))


class ClampTensor(Block):  # clamp(x, max=a tensor computed from x): bounded by what the bound sees too
    def __init__(self, c, h):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.c, self.h = c, h

    def forward(self, x):
        return torch.clamp(x, max=self.conv(x) + 100.0)  # never binds: x's gradient passes, the bound's is 0


class MaxPoolIndices(Block):
    def __init__(self, c, h):
        super().__init__()
        self.c, self.h = c, max((h - 2) // 2 + 1, 1)

    def forward(self, x):
        return F.max_pool2d(x, 2, 2, 0, 1, True, return_indices=True)[0]


class StridedSlice(Block):
    def __init__(self, c, h):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.c, self.h = c, (h + 1) // 2

    def forward(self, x):
        return self.conv(x[:, :, ::2, ::2])


def _pad_mode(h, dil, k):
    return lambda mode: mode == "zeros" or dil * (k - 1) // 2 < h


def build(kind: str, c: int, h: int, p: tuple) -> Block | None:
    """The block of `kind` for a c-channel h x h input with drawn parameters `p`; None where it does not fit."""
    if kind in ("conv", "pad_dilated"):
        cout, k, dil, groups, stride, mode = p
        if kind == "pad_dilated":
            dil, mode = max(dil, 2), mode if mode != "zeros" else "replicate"
        elif mode != "zeros":
            dil = 1
        if mode == "reflect" and dil * (k - 1) // 2 >= h:
            return None
        return ConvBNReLU(c, h, cout, k, dil, groups, stride, mode)
    if kind == "dw":
        k, dil, mode = p
        dil = 1 if mode != "zeros" else dil
        return None if mode == "reflect" and dil * (k - 1) // 2 >= h else Depthwise(c, h, k, dil, mode)
    if kind == "pool":
        pk, k, s, ceil, dil = p
        pad = (k - 1) // 2 if s == 1 else k // 2 if k > 2 else 0
        dil = dil if pk == "max" else 1
        if dil * (k - 1) + 1 > h + 2 * pad:
            return None
        return Pool(c, h, pk, k, s, pad, ceil, dil)
    if kind in ("resample", "nearest_exact", "resample_to_one"):
        mode, scale, align = p
        if kind == "resample_to_one":
            return Resample(c, h, mode, "one", align)
        b = Resample(c, h, "nearest-exact" if kind == "nearest_exact" else mode, scale, align)
        return None if b.h == 1 and mode != "nearest" else b  # resample_to_one
    if kind == "gate":
        return Gate(c, h, p[0])
    if kind in ("se", "se_expand"):
        return SE(c, h, expand=kind == "se_expand")
    if kind == "shuffle":
        return Shuffle(c, h, p[0]) if c % p[0] == 0 else None
    if kind == "catsplit":
        return CatSplit(c, h, p[0]) if c > 1 else None
    if kind == "res":
        return Residual(c, h, p[0])
    if kind in ("instance_norm", "bn_batch_stats"):
        return Norm(c, h, "instance" if kind == "instance_norm" else "batch") if h > 1 else None
    if kind == "maxpool_indices":
        return MaxPoolIndices(c, h) if h >= 2 else None
    simple = {"inplace_view": InplaceView, "flatten_back": FlattenBack, "rsub": Rsub, "reciprocal": Reciprocal,
              "clamp_tensor": ClampTensor, "strided_slice": StridedSlice}
    return simple[kind](c, h)


_PARAMS = {
    "conv": st.tuples(st.sampled_from([2, 4, 6, 8]), st.sampled_from([1, 3, 5]), st.sampled_from([1, 2, 3]),
                      st.sampled_from([1, 2]), st.sampled_from([1, 1, 2]),
                      st.sampled_from(["zeros", "zeros", "reflect", "replicate"])),
    "dw": st.tuples(st.sampled_from([3, 5]), st.sampled_from([1, 2]),
                    st.sampled_from(["zeros", "reflect", "replicate"])),
    "pool": st.tuples(st.sampled_from(["max", "avg"]), st.sampled_from([2, 3]), st.sampled_from([1, 2]),
                      st.booleans(), st.sampled_from([1, 1, 2])),
    "resample": st.tuples(st.sampled_from(["nearest", "bilinear", "bicubic"]), st.sampled_from([2, "up", "down"]),
                          st.booleans()),
    "gate": st.tuples(st.sampled_from([1, 3])),
    "se": st.tuples(),
    "shuffle": st.tuples(st.sampled_from([2, 3])),
    "catsplit": st.tuples(st.integers(1, 3)),
    "res": st.tuples(st.sampled_from([1, 3])),
}
_PARAMS["pad_dilated"] = _PARAMS["conv"]
_PARAMS["nearest_exact"] = _PARAMS["resample"]
_PARAMS["resample_to_one"] = _PARAMS["resample"]
for _k in KNOWN_BAD:
    _PARAMS.setdefault(_k, st.tuples())

DEFAULT_KINDS = tuple(k for k in _PARAMS if k not in KNOWN_BAD)


class CaptureCNN(nn.Module):
    """A chain of blocks; `specs` lists (kind, params) of the blocks that fit (and were built)."""

    def __init__(self, cin: int, size: int, specs: list):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.specs = []
        c, h = cin, size
        for kind, p in specs:
            b = build(kind, c, h, p)
            if b is None or b.h < 1:
                continue
            self.blocks.append(b)
            self.specs.append((kind, p))
            c, h = b.c, b.h
        self.out_channels, self.out_size = c, h

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@st.composite
def random_models(draw, kinds=DEFAULT_KINDS, max_ops: int = 5, must=None):
    """(model in eval mode, input shape): 2-6 input channels, 6-12 px, 1..max_ops blocks drawn from `kinds`
    (plus one block of kind `must`, placed at a drawn position)."""
    cin = draw(st.integers(2, 6))
    size = draw(st.integers(6, 12))
    op = st.sampled_from(list(kinds)).flatmap(lambda k: st.tuples(st.just(k), _PARAMS[k]))
    specs = draw(st.lists(op, min_size=0 if must else 1, max_size=max_ops))
    if must is not None:
        specs.insert(draw(st.integers(0, len(specs))), (must, draw(_PARAMS[must])))
    torch.manual_seed(draw(st.integers(0, 2 ** 16)))
    model = CaptureCNN(cin, size, specs).eval()
    assume(model.specs)  # every drawn block was too big for its map: nothing to check
    return model, (1, cin, size, size)
