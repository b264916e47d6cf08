"""The compute floor of one training epoch: the least time any implementation could take.

floor = forward FLOPs of the model on one input (measured with torch's FlopCounterMode on a meta
        device, so nothing is computed) x forward-equivalents per example per step x examples per
        epoch / the device's peak FLOP/s.

Forward-equivalents count a forward pass as 1, a backward pass to the input only as 1 and a full
backward (input and weights) as 2, so a clean SGD step is 3 and an attack step with input gradients
only is 2 (docs/recipes.md, "Compute conventions"). Each defense states its count and the assumption
behind it in its own file (`Defense.step_cost`), as a lower bound where the method's cost varies.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from harness.core.datasets import DATASETS
from harness.core.defense import DEFENSES, StepCost
from harness.core.errors import UnknownNameError
from harness.core.models import MODELS, build_model


@dataclass(frozen=True)
class DevicePeak:
    match: str  # substring of torch's device name
    fp32_tflops: float
    tensor_tflops: float  # dense fp16/bf16 tensor-core peak (no sparsity)
    source: str


# Vendor datasheets, dense throughput; the fp16/bf16 figure is the most favourable to a claim.
DEVICE_PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("V100", 15.7, 125.0, "NVIDIA V100 SXM2 datasheet"),
    DevicePeak("A100", 19.5, 312.0, "NVIDIA A100 datasheet"),
    DevicePeak("H100", 67.0, 989.0, "NVIDIA H100 SXM datasheet"),
    DevicePeak("H200", 67.0, 989.0, "NVIDIA H200 datasheet"),
    DevicePeak("T4", 8.1, 65.0, "NVIDIA T4 datasheet"),
)


def device_peak(device_name: str | None) -> DevicePeak | None:
    """The peak of a known device (by name), or None: CPUs and unlisted GPUs are not guessed."""
    if not device_name:
        return None
    for peak in DEVICE_PEAKS:
        if peak.match.lower() in device_name.lower():
            return peak
    return None


def step_cost(defense: str, config: dict[str, Any] | None = None) -> StepCost | None:
    """Forward-equivalents per training example per (equivalent) epoch, with the assumption made: the
    defense's own `step_cost` hook (methods/<name>.py); None for a defense without a cost model or one
    no longer registered. `defense` is a registered name ("trades"), never a variant key."""
    try:
        cls = DEFENSES.get(defense)
    except UnknownNameError:
        return None
    return cls.step_cost(config or {})


@cache
def forward_flops(model: str, dataset: str) -> int | None:
    """FLOPs (multiply-add = 2) of one forward pass of `model` on one `dataset` input, or None if unknown."""
    try:
        MODELS.get(model)
        info = DATASETS.get(dataset)
    except UnknownNameError:
        return None
    with torch.device("meta"):
        net = build_model(model, info).eval()
        x = torch.zeros(1, info.channels, info.image_size, info.image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x)
    return int(counter.get_total_flops())


def floor_seconds(flops: float, forward_equivalents: float, examples: int, peak_tflops: float) -> float:
    return flops * forward_equivalents * examples / (peak_tflops * 1e12)
