"""Models sized by the data set (channels, classes), with normalisation inside the model.

Every model is `Normalize -> features -> classifier`: attacks see inputs in [0, 1], and the split
into `features` (penultimate vector) and `classifier` (one Linear) lets a defense resample dropout on
the head alone (ADES's MC-dropout `head` mode). `dropout` > 0 adds dropout throughout the network
(ADES's `full` mode needs it); 0 builds exactly the architecture of the reference papers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.datasets import DatasetInfo
from harness.core.registry import Registry


@dataclass(frozen=True)
class ModelInfo:
    name: str
    build: Callable[[DatasetInfo, float], Classifier]
    description: str
    # Bumped when a change keeps every parameter's name and shape but changes what the network
    # computes: run records carry it, so such a checkpoint is refused instead of loading silently.
    revision: int = 1


MODELS: Registry[ModelInfo] = Registry("model")


RAW_INPUT_SUFFIX = "-raw"


def register_model(name: str, description: str, revision: int = 1):
    """Registers `name` and its raw-input twin `name-raw` (see `without_input_normalization`)."""

    def decorate(build):
        MODELS.add(name, ModelInfo(name, build, description, revision))
        MODELS.add(
            name + RAW_INPUT_SUFFIX,
            ModelInfo(
                name + RAW_INPUT_SUFFIX,
                lambda dataset, dropout: without_input_normalization(build(dataset, dropout)),
                f"{name} on raw [0, 1] input, no normalisation layer (as the TRADES, MART and FAT reference networks)",
                revision,
            ),
        )
        return build

    return decorate


def without_input_normalization(model: Classifier) -> Classifier:
    """The same network fed raw [0, 1] pixels: its Normalize layer becomes the identity (mean 0, std 1).

    Kept as buffers rather than removed, so the state dict has the same keys and a checkpoint carries
    its own input convention: loading it into either twin restores the function it was trained as.
    """
    model.normalize.mean.zero_()
    model.normalize.std.fill_(1.0)
    return model


def normalizes_input(model: Classifier) -> bool:
    return not (bool((model.normalize.mean == 0).all()) and bool((model.normalize.std == 1).all()))


def build_model(name: str, dataset: DatasetInfo, dropout: float = 0.0) -> Classifier:
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

    def __init__(self, normalize: Normalize, features: nn.Module, feature_dim: int, num_classes: int, dropout: float):
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


class FlattenChannelsLast(nn.Module):
    """Flatten (B, C, H, W) in (H, W, C) order: a view of a channels-last tensor, not a copy.

    Why: `nn.Flatten` hands the layer below an NCHW gradient, and adaptive average pooling's
    backward from an NCHW gradient into a channels-last input costs 3x its channels-last path
    (1.0 against 0.3 ms at 128x32x7x7 on a 2-core CPU), once per attack step. The order of the
    features is a fixed permutation, which the next linear layer absorbs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


@register_model(
    "small-cnn",
    "TRADES' MNIST SmallCNN at half width (conv 16-16-32-32, FC 128) with "
    "BatchNorm after the 2nd-4th convolutions, so a CPU trains every defense in minutes",
    revision=2,
)  # 2: features flattened in (H, W, C) order
def small_cnn(dataset: DatasetInfo, dropout: float) -> Classifier:
    """conv-ReLU, conv-pool-BN-ReLU (28x28 -> 14x14), conv-BN-ReLU, conv-pool-BN-ReLU (-> 7x7), 4x4 average,
    FC 128.

    Why BatchNorm, and why never at 28x28: BN is what lets AT leave chance within the quick preset's
    120 SGD steps (with none, quick PGD-AT ends near 66/52 instead of 73/56), and the more layers
    have it the better Free-AT does there. But BN costs as much in an attack step's input-only
    backward as in a training backward, so BN on full-resolution activations makes PGD-AT's step
    memory-bound on a CPU. On a 2-core CPU the PGD-10 AT step / clean step ratio (`harness bench
    at-step`, target 8.5) measured 8.8-9.4 with BN after every convolution before pooling, and
    normalising after the pool (a quarter of the activations) with no BN on the first convolution
    measured 0.5-0.7 lower in the same minutes. With freed memory kept in the process
    (`harness.training.allocator`, which removed the page faults behind most of the drift) and the features
    flattened channels-last (revision 2: 3% off an AT step) it measures 8.0-8.5.
    (Max-pool commutes with ReLU, not with BN: this is a different network from conv-BN-ReLU-pool,
    not a reordering.)
    """
    c, w = dataset.channels, 16

    def conv(cin: int, cout: int, bias: bool = False) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)

    def norm_relu(channels: int) -> list[nn.Module]:
        return [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]

    drop = [nn.Dropout(dropout)] if dropout > 0 else []
    features = nn.Sequential(
        conv(c, w, bias=True),
        nn.ReLU(inplace=True),
        conv(w, w),
        nn.MaxPool2d(2),
        *norm_relu(w),
        *drop,
        conv(w, 2 * w),
        *norm_relu(2 * w),
        conv(2 * w, 2 * w),
        nn.MaxPool2d(2),
        *norm_relu(2 * w),
        *drop,
        nn.AdaptiveAvgPool2d(4),
        FlattenChannelsLast(),
        nn.Linear(2 * w * 16, 128),
        nn.ReLU(inplace=True),
        *drop,
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
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

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
    return Classifier(Normalize(dataset.mean, dataset.std), nn.Sequential(*layers), 512, dataset.num_classes, dropout)


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
    return he_init(
        Classifier(Normalize(dataset.mean, dataset.std), nn.Sequential(*layers), cin, dataset.num_classes, dropout)
    )


@register_model("wrn-34-10", "WideResNet-34-10, 46.2M parameters (the paper's; Madry's 'WRN-32-10')")
def wrn_34_10(dataset: DatasetInfo, dropout: float) -> Classifier:
    return wide_resnet(dataset, 34, 10, dropout)


@register_model("wrn-28-4", "WideResNet-28-4 (MMA's reference model)")
def wrn_28_4(dataset: DatasetInfo, dropout: float) -> Classifier:
    return wide_resnet(dataset, 28, 4, dropout)
