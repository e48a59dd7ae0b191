"""Hand-written blocks that exercise every channel- and spatial-moving op the analysis claims to follow."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def cbr(cin, cout, k=3, groups=1, dilation=1, stride=1):
    pad = tuple(dilation * (kk - 1) // 2 for kk in ((k, k) if isinstance(k, int) else k))
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, dilation, groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class GroupedChain(nn.Module):
    """Grouped convs without shuffle: the channel field never leaves its group."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.b = nn.Conv2d(8, 16, 1, groups=4)
        self.c = nn.Conv2d(16, 16, 3, padding=1, groups=2)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


def channel_shuffle(x, groups: int):
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNet v1 unit: grouped 1x1, shuffle (view/transpose/view), depthwise 3x3, grouped 1x1, residual."""

    def __init__(self, c=16, g=4):
        super().__init__()
        self.g = g
        self.gc1 = nn.Conv2d(c, c, 1, groups=g)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.gc2 = nn.Conv2d(c, c, 1, groups=g)

    def forward(self, x):
        y = channel_shuffle(F.relu(self.gc1(x)), self.g)
        return F.relu(x + self.gc2(self.dw(y)))


class ShuffleV2Unit(nn.Module):
    """ShuffleNet v2 unit: split halves (chunk), branch on one half, cat, nn.ChannelShuffle."""

    def __init__(self, c=16):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(cbr(h, h, 1), nn.Conv2d(h, h, 3, padding=1, groups=h), cbr(h, h, 1))
        self.shuffle = nn.ChannelShuffle(2)

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return self.shuffle(torch.cat((a, self.branch(b)), dim=1))


class TwoShuffleV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.u1, self.u2, self.u3 = ShuffleV2Unit(), ShuffleV2Unit(), ShuffleV2Unit()

    def forward(self, x):
        return self.u3(self.u2(self.u1(x)))


class ConcatBranches(nn.Module):
    """Inception-style: a 1x1, a 3x3 and a 5x5 (as two 3x3) branch and a pooled branch, concatenated."""

    def __init__(self):
        super().__init__()
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b3 = nn.Conv2d(8, 4, 3, padding=1)
        self.b5 = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
        self.bp = nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.Conv2d(8, 4, 1))
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)

    def forward(self, x):
        y = torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)
        return self.dw(y)


class Residual(nn.Module):
    """Two basic blocks, the second with a 1x1 projection."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = cbr(8, 8), nn.Conv2d(8, 8, 3, padding=1)
        self.c3, self.c4 = cbr(8, 12), nn.Conv2d(12, 12, 3, padding=1)
        self.proj = nn.Conv2d(8, 12, 1)

    def forward(self, x):
        x = F.relu(x + self.c2(self.c1(x)))
        return F.relu(self.proj(x) + self.c4(self.c3(x)))


class SplitHalves(nn.Module):
    """split / slicing on channels: each half goes its own way and is merged back in another order."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        lo, hi = torch.split(x, [4, 4], dim=1)
        y = torch.cat([self.b(hi), self.a(lo)], 1)
        return y[:, 2:6] + y[:, :4]


class Dilated(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(cbr(4, 8, 3, dilation=1), cbr(8, 8, 3, dilation=2), cbr(8, 8, 3, dilation=3))

    def forward(self, x):
        return self.body(x)


class Asymmetric(nn.Module):
    """1x7 then 7x1 (Inception v3): height and width grow separately."""

    def __init__(self):
        super().__init__()
        self.h = nn.Conv2d(4, 6, (1, 7), padding=(0, 3))
        self.v = nn.Conv2d(6, 6, (7, 1), padding=(3, 0))
        self.h2 = nn.Conv2d(6, 6, (1, 5), padding=(0, 2))

    def forward(self, x):
        return self.h2(self.v(self.h(x)))


class Rolled(nn.Module):
    """torch.roll on channels between depthwise convs: each channel's field moves with it."""

    def __init__(self):
        super().__init__()
        self.dw1 = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.dw2 = nn.Conv2d(6, 6, 3, padding=1, groups=3)

    def forward(self, x):
        return self.dw2(torch.roll(self.dw1(x), shifts=1, dims=1))


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc(pool(x))): the gate sees the whole stage, so the product does too."""

    def __init__(self, c=8):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)

    def forward(self, x):
        y = self.dw(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(y)))))
        return y * s


class SaturatingStack(nn.Module):
    """Five 3x3 convs at 6x6 then a stride-2 conv and a pool to a classifier: the field hits w_0 and stays."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(*[cbr(4 if i == 0 else 8, 8) for i in range(5)])
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.more = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(self.more(self.down(self.convs(x))))


class Eca(nn.Module):
    """ECA attention: a conv1d across channels of the pooled vector (view/transpose around it)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.pw = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.pool(x)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return self.pw(x * torch.sigmoid(y))


BLOCKS = {  # name -> (model, input shape)
    "grouped_chain": (GroupedChain, (1, 8, 9, 9)),
    "shuffle_unit": (ShuffleUnit, (1, 16, 9, 9)),
    "shufflenet_v2_units": (TwoShuffleV2, (1, 16, 11, 11)),
    "concat_branches": (ConcatBranches, (1, 8, 11, 11)),
    "residual": (Residual, (1, 8, 13, 13)),
    "split_halves": (SplitHalves, (1, 8, 9, 9)),
    "dilated": (Dilated, (1, 4, 21, 21)),
    "asymmetric_1x7_7x1": (Asymmetric, (1, 4, 15, 15)),
    "roll": (Rolled, (1, 6, 9, 9)),
    "squeeze_excite": (SqueezeExcite, (1, 8, 9, 9)),
    "saturating_stack": (SaturatingStack, (1, 4, 7, 7)),
    "eca": (Eca, (1, 8, 7, 7)),
}


class Functional(nn.Module):
    """Functional forms: F.conv2d with parameters (as torch.compile sees convs), F.avg_pool2d, torch.cat."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4, 3, 3))
        self.w2 = nn.Parameter(torch.randn(6, 3, 1, 5))

    def forward(self, x):
        y = F.relu(F.conv2d(x, self.w1, padding=1))
        y = F.avg_pool2d(y, 3, 1, 1)
        return torch.cat([F.conv2d(y, self.w2, padding=(0, 2), groups=2), y], dim=1)


BLOCKS["functional"] = (Functional, (1, 4, 9, 9))


class SEStage(nn.Module):
    """conv -> squeeze-excite -> two more convs, in one 8x8 stage."""

    def __init__(self, c=4):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)
        self.c2, self.c3 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.c1(x)
        y = y * torch.sigmoid(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.c3(self.c2(y))
