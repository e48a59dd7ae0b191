"""The bundled example: a small CNN with the shapes fxrf cares about (stages, a residual, a depthwise conv)."""
import torch.nn as nn


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.pool = nn.MaxPool2d(2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.stage1(x)
        x = self.pw(self.dw(self.pool(x)))
        return self.head(x)


def make():
    """Factory for `fxrf analyze examples/tiny_cnn.py:make --input 1,3,32,32`."""
    return TinyCNN()
