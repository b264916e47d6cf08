"""Models sized by the data set (channels, classes), with normalisation inside the model.

Every model is `Normalize -> features -> classifier`: attacks see inputs in [0, 1], and the split
into `features` (penultimate vector) and `classifier` (one Linear) lets a defense resample dropout on
the head alone (ADES's MC-dropout `head` mode). `dropout` > 0 adds dropout throughout the network
(ADES's `full` mode needs it); 0 builds exactly the architecture of the reference papers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from harness.data import DatasetInfo
from harness.registry import Registry


@dataclass(frozen=True)
class ModelInfo:
    name: str
    build: Callable[[DatasetInfo, float], "Classifier"]
    description: str


MODELS: Registry[ModelInfo] = Registry("model")


def register_model(name: str, description: str):
    def decorate(build):
        MODELS.add(name, ModelInfo(name, build, description))
        return build

    return decorate


def build_model(name: str, dataset: DatasetInfo, dropout: float = 0.0) -> "Classifier":
    """Channels-last memory format: oneDNN (CPU) and cuDNN run these convolutions faster in it."""
    return MODELS.get(name).build(dataset, dropout).to(memory_format=torch.channels_last)


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """normalize -> features -> classifier; `logits = classifier(features(normalize(x)))`."""

    def __init__(self, normalize: Normalize, features: nn.Module, feature_dim: int, num_classes: int,
                 dropout: float):
        super().__init__()
        self.normalize = normalize
        self.features = features
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.dropout = dropout

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def he_init(model: Classifier) -> Classifier:
    """He-normal convolutions and zero biases, as in the WRN reference code."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    return model


# --------------------------------------------------------------------------- small CNN

@register_model("small-cnn", "TRADES' MNIST SmallCNN at half width with BatchNorm (conv 16-16-32-32, "
                             "FC 128), so a CPU trains every defense in minutes")
def small_cnn(dataset: DatasetInfo, dropout: float) -> Classifier:
    c, w = dataset.channels, 16

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    drop = [nn.Dropout(dropout)] if dropout > 0 else []
    features = nn.Sequential(
        *block(c, w), *block(w, w), nn.MaxPool2d(2), *drop,
        *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2), *drop,
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(2 * w * 16, 128), nn.ReLU(inplace=True), *drop,
    )
    return he_init(Classifier(Normalize(dataset.mean, dataset.std), features, 128, dataset.num_classes, dropout))


# --------------------------------------------------------------------------- PreAct-ResNet-18

class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.drop(F.relu(self.bn2(out))))
        return out + shortcut


@register_model("preact-resnet18", "PreAct-ResNet-18 (He et al. 2016; Rice et al. 2020, Wong et al. 2020)")
def preact_resnet18(dataset: DatasetInfo, dropout: float) -> Classifier:
    layers: list[nn.Module] = [nn.Conv2d(dataset.channels, 64, 3, 1, 1, bias=False)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [PreActBlock(cin, cout, stride, dropout), PreActBlock(cout, cout, 1, dropout)]
        cin = cout
    layers += [nn.BatchNorm2d(512), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(Normalize(dataset.mean, dataset.std), nn.Sequential(*layers), 512,
                      dataset.num_classes, dropout)


# --------------------------------------------------------------------------- WideResNet

class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.equal = cin == cout
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.equal else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.drop(F.relu(self.bn2(out))))
        return out + shortcut


def wide_resnet(dataset: DatasetInfo, depth: int, widen: int, dropout: float) -> Classifier:
    """WRN-depth-widen as in Zagoruyko & Komodakis (2016), the layout used by TRADES and Madry."""
    n = (depth - 4) // 6
    widths = (16, 16 * widen, 32 * widen, 64 * widen)
    layers: list[nn.Module] = [nn.Conv2d(dataset.channels, widths[0], 3, 1, 1, bias=False)]
    cin = widths[0]
    for cout, stride in zip(widths[1:], (1, 2, 2)):
        for i in range(n):
            layers.append(WideBlock(cin, cout, stride if i == 0 else 1, dropout))
            cin = cout
    layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return he_init(Classifier(Normalize(dataset.mean, dataset.std), nn.Sequential(*layers), cin,
                              dataset.num_classes, dropout))


@register_model("wrn-34-10", "WideResNet-34-10, 46.2M parameters (the paper's; Madry's 'WRN-32-10')")
def wrn_34_10(dataset: DatasetInfo, dropout: float) -> Classifier:
    return wide_resnet(dataset, 34, 10, dropout)


@register_model("wrn-28-4", "WideResNet-28-4 (MMA's reference model)")
def wrn_28_4(dataset: DatasetInfo, dropout: float) -> Classifier:
    return wide_resnet(dataset, 28, 4, dropout)
