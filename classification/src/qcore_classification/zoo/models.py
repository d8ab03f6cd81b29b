"""Architectures of qcore's own zoo, all trained by us on Fashion-MNIST.

``fmnist_resnet`` and ``fmnist_vit`` are small networks for 28x28 single-channel images: they take the normalized
image ``(x / 255 - MEAN) / STD`` of shape ``[B, 1, 28, 28]``. ``fmnist_tv_resnet18`` and ``fmnist_tv_mobilenetv2``
are the unmodified torchvision ResNet-18 and MobileNetV2 (10 classes) fed 32x32 RGB: the grey image resized
(bilinear, antialiased) to 32 px and repeated to 3 channels, normalized with the same MEAN and STD on every
channel (:data:`INPUTS`; ``qcore_classification.data.adapt`` does exactly this).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class FmnistResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, three stages of basic blocks, global pooling, linear classifier."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 2, num_classes: int = 10,
                 in_chans: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=False))
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def fmnist_resnet(num_classes: int = 10) -> nn.Module:
    """ResNet-14 (widths 16/32/64, two blocks per stage), about 0.17 M parameters."""
    return FmnistResNet(num_classes=num_classes)


def fmnist_vit(num_classes: int = 10) -> nn.Module:
    """A timm VisionTransformer for 28x28: patch 4 (49 tokens + class token), dim 96, depth 6, 4 heads."""
    from qcore import MissingDependencyError

    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as exc:  # pragma: no cover - timm is a dependency
        raise MissingDependencyError("timm", "pip install timm") from exc
    return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=num_classes, embed_dim=96,
                             depth=6, num_heads=4, mlp_ratio=2.0, class_token=True, global_pool="token")


def fmnist_tv_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision ``resnet18`` (ImageNet stem: 7x7/2 conv and max pool, so 32 px ends at 1x1), 11.2 M parameters."""
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=num_classes)


def fmnist_tv_mobilenetv2(num_classes: int = 10) -> nn.Module:
    """torchvision ``mobilenet_v2`` (width 1.0, depthwise-separable inverted residuals, ReLU6), 2.2 M parameters."""
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(weights=None, num_classes=num_classes)


#: Zoo architecture name -> constructor taking ``num_classes``.
ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "fmnist_resnet": fmnist_resnet,
    "fmnist_vit": fmnist_vit,
    "fmnist_tv_resnet18": fmnist_tv_resnet18,
    "fmnist_tv_mobilenetv2": fmnist_tv_mobilenetv2,
}

#: Zoo architecture name -> (channels, square input size) it was trained on; the normalization is
#: Fashion-MNIST's MEAN/STD on every channel.
INPUTS: dict[str, tuple[int, int]] = {
    "fmnist_resnet": (1, 28),
    "fmnist_vit": (1, 28),
    "fmnist_tv_resnet18": (3, 32),
    "fmnist_tv_mobilenetv2": (3, 32),
}
