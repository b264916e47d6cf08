"""A WRN-34-10 PGD-10 training epoch on a GPU in fp32 and bf16: seconds, images/s, model-FLOP utilisation.

The issue's target on an H100-class GPU: a CIFAR-10 epoch (50,000 images, batch 128) of PGD-AT in bf16
in at most 50 s; the compute floor is about 19 s. An epoch is estimated from alternating timed
training steps (PGD-10 attack + update, through the runner's own autocast and loss-scaling path) as
steps-per-epoch x seconds per step. Model FLOPs are counted once per step with
`torch.utils.flop_counter` on the real step (attack included); utilisation divides them by the GPU's
dense peak for the precision (`PEAK_TFLOPS`, or $HARNESS_PEAK_TFLOPS), left out when unknown.
On the CPU only `--quick` runs (small CNN), to check the benchmark itself.
"""

from __future__ import annotations

import math
import os

import torch
from torch.utils.flop_counter import FlopCounterMode

from harness.benchmarks.at_step import make_batch
from harness.benchmarks.timing import BenchOptions, BenchResult, alternate, register_benchmark
from harness.core.datasets import DATASETS
from harness.core.defense import DEFENSES, DefenseContext
from harness.core.models import build_model
from harness.training import precision

EPOCH_IMAGES = 50_000
TARGET_BF16_SECONDS = 50.0
# Dense peak TFLOP/s (tensor cores; fp32 means TF32) by device-name fragment: vendor data sheets.
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp32": 494.0},
    "H200": {"bf16": 989.0, "fp32": 494.0},
    "A100": {"bf16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp32": 183.0},
}


def peak_tflops(device: torch.device, precision_name: str) -> float | None:
    if "HARNESS_PEAK_TFLOPS" in os.environ:
        return float(os.environ["HARNESS_PEAK_TFLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks[precision_name] for key, peaks in PEAK_TFLOPS.items() if key in name), None)


def step_flops(step) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


@register_benchmark(
    "gpu-epoch",
    "WRN-34-10 PGD-10 epoch in fp32 and bf16 on a GPU: seconds, images/s, "
    "model-FLOP utilisation; bf16 target <= 50 s on an H100-class GPU",
)
def gpu_epoch(options: BenchOptions) -> list[BenchResult]:
    device = options.device
    if device.type != "cuda" and not options.quick:
        return []  # a WRN-34-10 epoch on a CPU takes hours: nothing to learn here
    model_name, dataset, batch_size = ("small-cnn", "synthetic", 16) if options.quick else ("wrn-34-10", "cifar10", 128)
    info = DATASETS.get(dataset)
    batch = make_batch(dataset, batch_size, device)
    variants, flops = {}, {}
    for name in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model(model_name, info).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        context = DefenseContext(eps=info.eps, dataset=info, train_size=batch_size, epochs=1, device=device)
        defense = DEFENSES.get("pgd-at")(DEFENSES.get("pgd-at").Config(), context)
        scaling = precision.LossScaling(name, device)

        def step(defense=defense, model=model, optimizer=optimizer, name=name, scaling=scaling) -> None:
            with precision.autocast(name, device), precision.scaling(scaling):
                defense.train_step(model, optimizer, batch)

        flops[name] = step_flops(step)
        variants[f"{name} PGD-10 step"] = step
    timings = alternate(variants, options)
    per_epoch = math.ceil(EPOCH_IMAGES / batch_size)
    extra = {}
    for name in ("fp32", "bf16"):
        seconds = timings[f"{name} PGD-10 step"]
        extra[f"{name} epoch estimate (s)"] = round(per_epoch * seconds, 2)
        extra[f"{name} images/s"] = round(batch_size / seconds, 1)
        extra[f"{name} model TFLOP per step"] = round(flops[name] / 1e12, 4)
        peak = peak_tflops(device, name)
        extra[f"{name} model-FLOP utilisation"] = (
            round(flops[name] / seconds / (peak * 1e12), 3) if peak else "unknown peak (set HARNESS_PEAK_TFLOPS)"
        )
    ratio, ratio_spread = timings.ratio("bf16 PGD-10 step", "fp32 PGD-10 step")
    label = "bf16 / fp32 step"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = BenchResult(
        name=f"PGD-10 training epoch, {model_name} batch {batch_size} ({device_name})",
        seconds=dict(timings),
        ratios={label: ratio},
        spreads={label: ratio_spread},
        machine=timings.machine,
        extra=extra,
        notes=f"epoch = {per_epoch} steps x median step; bf16 epoch target <= {TARGET_BF16_SECONDS:.0f} s "
        f"on an H100-class GPU",
    )
    return [result]
