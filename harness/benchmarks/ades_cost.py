"""Epoch cost of ADES, its readings and Static-DES relative to PGD-AT on the same model and data.

Targets: ADES (`head` MC mode) at most 1.05x PGD-AT per epoch, Static-DES at most 1.03x (the paper
claims 1.12x and 1.05x, Table 3). ADES-bilevel (a held-out PGD and a double backward every k steps)
is reported without a target. `full` mode (T full stochastic passes) is reported against PGD-AT
on the same dropout model, without a target. All variants run in one process, alternating; each
keeps its own model copy, optimiser and defense state. An "epoch" here is `batches` training steps
plus the defense's end-of-epoch diagnostics: the steps are timed (median per call of `steps` training
steps), the diagnostics once, and epoch time = batches x step time + diagnostics time.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable

import torch

from harness.benchmarks.at_step import make_batch
from harness.benchmarks.timing import BenchOptions, BenchResult, alternate, register_benchmark, spread
from harness.core.config import PRESETS
from harness.core.datasets import DATASETS, Split
from harness.core.defense import DEFENSES, Defense, DefenseContext
from harness.core.environment import synchronize
from harness.core.models import build_model

FULL_MODE_DROPOUT = 0.1
TARGETS = {"ades (head) / pgd-at": 1.05, "static-des / pgd-at": 1.03}


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str
    defense: str
    dropout: float = 0.0
    overrides: tuple[tuple[str, object], ...] = ()


VARIANTS = (
    Variant("pgd-at", "pgd-at"),
    Variant("ades (head)", "ades"),
    Variant("ades-joint (head)", "ades-joint"),
    Variant("ades-bilevel (head)", "ades-bilevel"),
    Variant("static-des", "static-des"),
    Variant(f"pgd-at (dropout {FULL_MODE_DROPOUT})", "pgd-at", FULL_MODE_DROPOUT),
    Variant("ades (full)", "ades", FULL_MODE_DROPOUT, (("mc_mode", "full"),)),
)
RATIOS = (
    ("ades (head) / pgd-at", "ades (head)", "pgd-at"),
    ("ades-joint (head) / pgd-at", "ades-joint (head)", "pgd-at"),
    ("static-des / pgd-at", "static-des", "pgd-at"),
    ("ades-bilevel (head) / pgd-at", "ades-bilevel (head)", "pgd-at"),
    ("ades (full) / pgd-at, same dropout model", "ades (full)", f"pgd-at (dropout {FULL_MODE_DROPOUT})"),
)


def batches_per_epoch(dataset: str, batch_size: int) -> int:
    """Batches of the quick preset's training subset (CPU) or of the full training set (GPU)."""
    subset = PRESETS.get("quick").data.train_subset if dataset == "fashion-mnist" else 49000
    return math.ceil(subset / batch_size)


def build_variant(
    variant: Variant, models: dict[float, torch.nn.Module], dataset: str, batch, options: BenchOptions, steps: int
) -> tuple[Callable[[], None], Defense]:
    info = DATASETS.get(dataset)
    model = copy.deepcopy(models[variant.dropout])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cls = DEFENSES.get(variant.defense)
    config = dataclasses.replace(cls.Config(), **dict(variant.overrides))
    # ADES-bilevel's outer loss draws from a held-out split: here the benchmark batch itself
    held_out = Split(batch.x, batch.y) if cls.held_out_size(config, len(batch.y)) else None
    context = DefenseContext(
        eps=info.eps, dataset=info, train_size=len(batch.y), epochs=1, device=options.device, held_out=held_out
    )
    defense = cls(config, context)
    defense.setup(model)

    def run() -> None:
        for _ in range(steps):
            defense.train_step(model, optimizer, batch)

    return run, defense


def timed_once(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def epoch_ratios(model_name: str, dataset: str, batch_size: int, options: BenchOptions, steps: int) -> BenchResult:
    info = DATASETS.get(dataset)
    torch.manual_seed(0)
    models = {0.0: build_model(model_name, info, 0.0).to(options.device)}
    torch.manual_seed(0)
    models[FULL_MODE_DROPOUT] = build_model(model_name, info, FULL_MODE_DROPOUT).to(options.device)
    batch = make_batch(dataset, batch_size, options.device)
    built = {v.label: build_variant(v, models, dataset, batch, options, steps) for v in VARIANTS}
    timings = alternate({k: fn for k, (fn, _) in built.items()}, options)
    step_seconds = {k: s / steps for k, s in timings.items()}
    # end-of-epoch diagnostics over everything logged above (more samples than one epoch: an upper bound)
    diag_seconds = {k: timed_once(lambda d=d: d.end_epoch(0), options.device) for k, (_, d) in built.items()}
    n = batches_per_epoch(dataset, batch_size)
    epoch = {k: n * step_seconds[k] + diag_seconds[k] for k in built}
    seconds = {f"{k} step": v for k, v in step_seconds.items()}
    seconds.update({f"{k} epoch of {n} batches": v for k, v in epoch.items()})
    rounds = {k: [n * t / steps + diag_seconds[k] for t in timings.rounds[k]] for k in built}  # epoch per round
    per_round = {label: spread([x / y for x, y in zip(rounds[a], rounds[b])]) for label, a, b in RATIOS}
    per_round.update({f"{label} (step only)": timings.ratio(a, b) for label, a, b in RATIOS[:4]})
    ratios = {label: mid for label, (mid, _) in per_round.items()}
    return BenchResult(
        spreads={label: s for label, (_, s) in per_round.items()},
        machine=timings.machine,
        name=f"ADES / Static-DES epoch cost, {model_name} on {dataset}-shaped batches of {batch_size} "
        f"({options.device.type})",
        seconds=seconds,
        ratios=ratios,
        targets=TARGETS,
        notes=f"per-round ratios over {options.repeats} alternating calls of {steps} steps; full mode T="
        f"{DEFENSES.get('ades').Config().mc_samples}, dropout {FULL_MODE_DROPOUT}",
    )


@register_benchmark(
    "ades",
    "ADES (head) / PGD-AT <= 1.05 and Static-DES / PGD-AT <= 1.03 per epoch; ADES-bilevel and ADES full mode reported",
)
def ades_benchmark(options: BenchOptions) -> list[BenchResult]:
    if options.quick:
        return [epoch_ratios("small-cnn", "fashion-mnist", 16, options, steps=1)]
    results = [epoch_ratios("small-cnn", "fashion-mnist", 128, options, steps=2)]
    if options.device.type == "cuda":  # too slow for a CPU
        results.append(epoch_ratios("preact-resnet18", "cifar10", 128, options, steps=2))
    return results
