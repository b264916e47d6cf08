"""Cost of one PGD-10 AT training step over one clean training step, same model and batch.

The algorithm's floor is about 7.7 (10 x (forward + input backward) + one forward/backward, in
forward-equivalents; docs/recipes.md "Compute conventions"); an attack that also computes weight gradients is ~11.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.benchmarks.timing import BenchOptions, BenchResult, alternate, register_benchmark
from harness.core.datasets import DATASETS, Batch
from harness.core.defense import DEFENSES, DefenseContext, sgd_step
from harness.core.models import build_model

CASES = (("small-cnn", "fashion-mnist", 128), ("preact-resnet18", "cifar10", 32))
TARGET = 8.5


def make_batch(dataset: str, batch_size: int, device: torch.device) -> Batch:
    info = DATASETS.get(dataset)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, info.channels, info.image_size, info.image_size, generator=gen)
    y = torch.randint(0, info.num_classes, (batch_size,), generator=gen)
    return Batch(
        x.to(device).contiguous(memory_format=torch.channels_last),
        y.to(device),
        torch.arange(batch_size, device=device),
    )


def step_ratio(
    model_name: str, dataset: str, batch_size: int, options: BenchOptions, defense: str = "pgd-at"
) -> BenchResult:
    info = DATASETS.get(dataset)
    torch.manual_seed(0)
    model = build_model(model_name, info).to(options.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = make_batch(dataset, batch_size, options.device)
    context = DefenseContext(eps=info.eps, dataset=info, train_size=batch_size, epochs=1, device=options.device)
    at = DEFENSES.get(defense)(DEFENSES.get(defense).Config(), context)
    at.setup(model)

    def clean() -> None:
        model.train()
        sgd_step(optimizer, F.cross_entropy(model(batch.x), batch.y))

    seconds = alternate(
        {"clean step": clean, f"{defense} step": lambda: at.train_step(model, optimizer, batch)}, options
    )
    label = f"{defense} / clean step"
    ratio, ratio_spread = seconds.ratio(f"{defense} step", "clean step")
    return BenchResult(
        name=f"{model_name} on {dataset}-shaped batch of {batch_size} ({options.device.type})",
        seconds=dict(seconds),
        ratios={label: ratio},
        targets={label: TARGET},
        spreads={label: ratio_spread},
        machine=seconds.machine,
    )


@register_benchmark("at-step", "PGD-10 AT step over a clean step (small CNN, PreAct-ResNet-18); target <= 8.5")
def at_step(options: BenchOptions) -> list[BenchResult]:
    cases = CASES[:1] if options.quick else CASES
    return [step_ratio(model, dataset, bs if not options.quick else 16, options) for model, dataset, bs in cases]
