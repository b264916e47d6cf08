"""`harness bench` machinery: benchmarks registered by name, timed in one process, alternating.

Speed goals are checked here, never in unit tests. Each benchmark alternates the variants it
compares (A, B, A, B, ...) after warm-up steps, so drift of the machine (turbo, other load) hits
both alike, and reports medians. Benchmark modules live in `harness/benchmarks/`.
"""

from __future__ import annotations

import importlib
import pkgutil
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from harness.environment import synchronize
from harness.registry import Registry


@dataclass(frozen=True)
class BenchOptions:
    device: torch.device
    repeats: int = 5
    warmup: int = 2
    quick: bool = False  # smaller batches and models, for a smoke check of the bench itself


@dataclass
class BenchResult:
    name: str
    seconds: dict[str, float]  # variant -> median seconds per call
    ratios: dict[str, float] = field(default_factory=dict)  # label -> ratio of two medians
    targets: dict[str, float] = field(default_factory=dict)  # ratio label -> goal (at most)
    notes: str = ""

    def lines(self) -> list[str]:
        out = [f"{self.name}" + (f"  ({self.notes})" if self.notes else "")]
        for variant, sec in self.seconds.items():
            out.append(f"    {variant:<40} {sec * 1000:10.1f} ms")
        for label, ratio in self.ratios.items():
            goal = self.targets.get(label)
            verdict = "" if goal is None else (f"  target <= {goal}: " + ("met" if ratio <= goal else "MISSED"))
            out.append(f"    {label:<40} {ratio:10.3f}{verdict}")
        return out


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    run: Callable[[BenchOptions], list[BenchResult]]


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def register_benchmark(name: str, description: str):
    def decorate(fn: Callable[[BenchOptions], list[BenchResult]]):
        BENCHMARKS.add(name, Benchmark(name, description, fn))
        return fn

    return decorate


def alternate(variants: dict[str, Callable[[], object]], options: BenchOptions) -> dict[str, float]:
    """Median wall seconds per call of each variant, interleaved, warm-up excluded."""
    for _ in range(options.warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(options.repeats):
        for name, fn in variants.items():
            synchronize(options.device)
            t0 = time.perf_counter()
            fn()
            synchronize(options.device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def load_benchmarks() -> None:
    from harness import benchmarks

    for module in pkgutil.iter_modules(benchmarks.__path__):
        importlib.import_module(f"{benchmarks.__name__}.{module.name}")


load_benchmarks()
