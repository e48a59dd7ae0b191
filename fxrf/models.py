"""The paper's baseline CNNs as plain, randomly initialised ``nn.Module``s.

Layouts follow ``docs/paper.md`` ("Model layouts that reproduce the baselines") and the
poster's Tables 2-6.  Every factory takes ``num_classes`` and builds a model that
``torch.fx.symbolic_trace`` can trace (static ``nn.Sequential`` graphs, no data-dependent
control flow).  Nothing is downloaded and nothing else from ``fxrf`` is imported.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

__all__ = [
    "MODELS",
    "VGG_CFGS",
    "make_vgg_classifier",
    "mobilenet_v1",
    "mobilenet_v1_cifar",
    "mobilenet_v1_imagenet",
    "resnet50_cifar",
    "vgg11_cifar",
    "vgg11_variant",
    "vgg16_cifar",
    "vgg16_cifar100",
    "vgg16_opt_table3",
    "vgg16_opt_table6",
    "vgg19_cifar",
    "vgg19_cifar100",
    "vgg_cifar",
    "vgg_from_cfg",
]

# Per-stage conv counts of the usual VGG configurations (widths 64, 128, 256, 512, 512).
VGG_STAGE_CONVS: dict[str, tuple[int, ...]] = {
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}
VGG_WIDTHS: tuple[int, ...] = (64, 128, 256, 512, 512)


def _stage_cfg(stage_convs: Sequence[int], widths: Sequence[int]) -> list[int | str]:
    cfg: list[int | str] = []
    for n, w in zip(stage_convs, widths, strict=True):
        cfg.extend([w] * n)
        cfg.append("M")
    return cfg


# The usual cfg lists, e.g. VGG11 = [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M].
VGG_CFGS: dict[str, list[int | str]] = {
    name: _stage_cfg(convs, VGG_WIDTHS) for name, convs in VGG_STAGE_CONVS.items()
}


class VGG(nn.Module):
    """CIFAR VGG: ``features`` (conv-BN-ReLU stacks and max pools), flatten, ``classifier``."""

    def __init__(self, features: nn.Sequential, classifier: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _vgg_features(cfg: Sequence[int | str], in_channels: int = 3) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            assert isinstance(v, int)
            layers += [nn.Conv2d(c, v, kernel_size=3, padding=1, bias=True), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers), c


def make_vgg_classifier(in_features: int, num_classes: int, classifier: str = "linear") -> nn.Module:
    """VGG head (docs/paper.md): "linear" = Linear(in, classes) (CIFAR-10); "mlp" = in-4096-4096-classes (CIFAR-100).

    >>> make_vgg_classifier(512, 100, "mlp")[-1]
    Linear(in_features=4096, out_features=100, bias=True)
    """
    if classifier == "linear":
        return nn.Linear(in_features, num_classes)
    if classifier in ("mlp", "cifar100"):
        return nn.Sequential(
            nn.Linear(in_features, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, num_classes),
        )
    raise ValueError(f"unknown VGG classifier {classifier!r} (expected 'linear' or 'mlp')")


def vgg_from_cfg(cfg: Sequence[int | str], num_classes: int = 10, classifier: str = "linear") -> VGG:
    """CIFAR VGG from a cfg list of widths and "M" (max pool 2), as in docs/paper.md's CIFAR-10 VGG16/19 layout.

    >>> vgg_from_cfg([64, "M", 128, "M"], num_classes=10).classifier
    Linear(in_features=128, out_features=10, bias=True)
    """
    features, c = _vgg_features(cfg)
    return VGG(features, make_vgg_classifier(c, num_classes, classifier))


def vgg_cifar(
    stage_convs: Sequence[int] = (2, 2, 3, 3, 3),
    widths: Sequence[int] = VGG_WIDTHS,
    num_classes: int = 10,
    classifier: str = "linear",
) -> VGG:
    """CIFAR VGG from per-stage conv counts (docs/paper.md: VGG16-opt layouts 4,3,2,3,1 and 5,4,2,1,1).

    >>> round(sum(p.numel() for p in vgg_cifar((4, 3, 2, 3, 1)).parameters()) / 1e6, 2)
    9.64
    """
    if len(stage_convs) != len(widths):
        raise ValueError("stage_convs and widths must have the same length")
    return vgg_from_cfg(_stage_cfg(stage_convs, widths), num_classes=num_classes, classifier=classifier)


def vgg11_cifar(num_classes: int = 10, classifier: str = "linear") -> VGG:
    """VGG-11 on CIFAR (Table 2 baseline; docs/paper.md: stages 1,1,2,2,2 convs of 64..512).

    >>> sum(isinstance(m, nn.Conv2d) for m in vgg11_cifar().modules())
    8
    """
    return vgg_cifar(VGG_STAGE_CONVS["vgg11"], num_classes=num_classes, classifier=classifier)


def vgg16_cifar(num_classes: int = 10, classifier: str = "linear") -> VGG:
    """VGG16 on CIFAR-10 (Table 3; docs/paper.md: 14,728,266 params, 313.2M MACs).

    >>> sum(p.numel() for p in vgg16_cifar().parameters())
    14728266
    """
    return vgg_cifar(VGG_STAGE_CONVS["vgg16"], num_classes=num_classes, classifier=classifier)


def vgg19_cifar(num_classes: int = 10, classifier: str = "linear") -> VGG:
    """VGG19 on CIFAR-10 (Table 3: 20.04M params).

    >>> round(sum(p.numel() for p in vgg19_cifar().parameters()) / 1e6, 2)
    20.04
    """
    return vgg_cifar(VGG_STAGE_CONVS["vgg19"], num_classes=num_classes, classifier=classifier)


def vgg16_cifar100(num_classes: int = 100) -> VGG:
    """VGG16 on CIFAR-100 with the 512-4096-4096-classes head (Table 4: 34.02M params).

    >>> round(sum(p.numel() for p in vgg16_cifar100().parameters()) / 1e6, 2)
    34.02
    """
    return vgg16_cifar(num_classes=num_classes, classifier="mlp")


def vgg19_cifar100(num_classes: int = 100) -> VGG:
    """VGG19 on CIFAR-100 with the 512-4096-4096-classes head (Table 4: 39.33M params)."""
    return vgg19_cifar(num_classes=num_classes, classifier="mlp")


def vgg16_opt_table6(num_classes: int = 10) -> VGG:
    """VGG16-opt, stage convs 4,3,2,3,1 (Table 6 baseline: 9.64M params, 370M MACs; docs/paper.md)."""
    return vgg_cifar((4, 3, 2, 3, 1), num_classes=num_classes)


def vgg16_opt_table3(num_classes: int = 10) -> VGG:
    """VGG16-opt, stage convs 5,4,2,1,1 (Table 3: 5.10M params, 370M MACs; docs/paper.md)."""
    return vgg_cifar((5, 4, 2, 1, 1), num_classes=num_classes)


def vgg11_variant(i: int, num_classes: int = 10) -> VGG:
    """VGG-11 CIFAR with one extra 3x3 conv+BN+ReLU before the i-th max pool, i in 1..5 (Table 2 Variant-i).

    >>> [sum(isinstance(m, nn.Conv2d) for m in vgg11_variant(i).modules()) for i in range(1, 6)]
    [9, 9, 9, 9, 9]
    """
    convs = list(VGG_STAGE_CONVS["vgg11"])
    if not 1 <= i <= len(convs):
        raise ValueError(f"variant index must be in 1..{len(convs)}, got {i}")
    convs[i - 1] += 1
    return vgg_cifar(tuple(convs), num_classes=num_classes)


def _conv_bn_relu(c_in: int, c_out: int, kernel_size: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


# (pointwise out channels, depthwise stride) of MobileNet v1's 13 DW+PW blocks (docs/paper.md).
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
)


class MobileNetV1(nn.Module):
    """MobileNet v1: ``features`` (stem + 13 DW/PW blocks), global average pool, flatten, ``classifier``."""

    def __init__(self, num_classes: int = 10, stem_stride: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = _conv_bn_relu(3, 32, 3, stride=stem_stride)
        c = 32
        for c_out, s in MOBILENET_V1_BLOCKS:
            layers += _conv_bn_relu(c, c, 3, stride=s, groups=c)  # depthwise 3x3
            layers += _conv_bn_relu(c, c_out, 1)  # pointwise 1x1
            c = c_out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v1(num_classes: int = 10, stem_stride: int = 1) -> MobileNetV1:
    """MobileNet v1 with a given stem stride (docs/paper.md: stride 1 on CIFAR, 2 on ImageNet)."""
    return MobileNetV1(num_classes=num_classes, stem_stride=stem_stride)


def mobilenet_v1_cifar(num_classes: int = 10) -> MobileNetV1:
    """CIFAR MobileNet v1, stride-1 stem (Table 3: 3.22M params, 50M MACs; Table 4 with 100 classes: 3.32M).

    >>> round(sum(p.numel() for p in mobilenet_v1_cifar().parameters()) / 1e6, 2)
    3.22
    """
    return MobileNetV1(num_classes=num_classes, stem_stride=1)


def mobilenet_v1_imagenet(num_classes: int = 1000) -> MobileNetV1:
    """ImageNet MobileNet v1, stride-2 stem (Table 5: 4.23M params, 580M MACs).

    >>> round(sum(p.numel() for p in mobilenet_v1_imagenet().parameters()) / 1e6, 2)
    4.23
    """
    return MobileNetV1(num_classes=num_classes, stem_stride=2)


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet: 3x3 stem + BN + ReLU (no max pool), bottleneck stages, global average pool, ``fc``."""

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 10) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(64, layers[0], stride=1)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet50_cifar(num_classes: int = 10) -> ResNetCIFAR:
    """CIFAR ResNet50, Bottleneck [3,4,6,3] (Table 3: 23.52M params, ~1.30G MACs; Table 4 with 100 classes: 23.71M).

    >>> with torch.device("meta"):
    ...     n = sum(p.numel() for p in resnet50_cifar().parameters())
    >>> round(n / 1e6, 2)
    23.52
    """
    return ResNetCIFAR((3, 4, 6, 3), num_classes=num_classes)


def _variant_factory(i: int) -> Callable[..., nn.Module]:
    def factory(num_classes: int = 10) -> VGG:
        return vgg11_variant(i, num_classes=num_classes)

    factory.__name__ = f"vgg11_variant{i}"
    factory.__qualname__ = factory.__name__
    factory.__doc__ = f"VGG-11 CIFAR Variant-{i} of Table 2 (extra 3x3 conv before max pool {i})."
    return factory


MODELS: dict[str, Callable[..., nn.Module]] = {
    "vgg11_cifar": vgg11_cifar,
    "vgg16_cifar": vgg16_cifar,
    "vgg19_cifar": vgg19_cifar,
    "vgg16_cifar100": vgg16_cifar100,
    "vgg19_cifar100": vgg19_cifar100,
    "vgg16_opt_table6": vgg16_opt_table6,
    "vgg16_opt_table3": vgg16_opt_table3,
    **{f"vgg11_variant{i}": _variant_factory(i) for i in range(1, 6)},
    "mobilenet_v1_cifar": mobilenet_v1_cifar,
    "mobilenet_v1_imagenet": mobilenet_v1_imagenet,
    "resnet50_cifar": resnet50_cifar,
}
