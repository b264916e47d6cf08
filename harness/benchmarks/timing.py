"""`harness bench` machinery: benchmarks registered by name, timed in one process, alternating.

Speed goals are checked here, never in unit tests. Each benchmark alternates the variants it
compares (A, B, A, B, ...) after warm-up steps, so drift of the machine (turbo, other load) hits
both alike. A ratio is taken per round (A_i / B_i) and reported as min / median / max over the
rounds; a goal is "met" or "missed" only when the whole spread lies on one side of it, otherwise
"undecided" (two runs ten minutes apart once gave 7.22 and 8.82 for one ratio). A benchmark taken
while other processes kept the CPUs busy (`harness.training.resources.contended`) gets no verdict at all.
Benchmark modules live in `harness/benchmarks/`.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from harness.core.environment import synchronize
from harness.core.registry import Registry
from harness.training.resources import EpochMeter, contended, other_load

DEFAULT_ROUNDS = 11  # the spread of a ratio needs more than a handful of rounds


@dataclass(frozen=True)
class BenchOptions:
    device: torch.device
    repeats: int | None = None  # alternating rounds; None: the benchmark's own default
    warmup: int = 2
    quick: bool = False  # smaller batches and models, for a smoke check of the bench itself


def verdict(spread: list[float] | None, goal: float, machine: dict | None = None) -> str:
    """met / missed only when the whole [min, max] spread is on one side of the goal (at most)."""
    if machine is not None and contended(machine):
        return "withheld (machine busy)"
    if not spread:
        return "undecided (no spread)"
    low, _, high = spread
    return "met" if high <= goal else "missed" if low > goal else "undecided"


@dataclass
class BenchResult:
    name: str
    seconds: dict[str, float]  # variant -> median seconds per call
    ratios: dict[str, float] = field(default_factory=dict)  # label -> median of the per-round ratios
    targets: dict[str, float] = field(default_factory=dict)  # ratio label -> goal (at most)
    notes: str = ""
    spreads: dict[str, list[float]] = field(default_factory=dict)  # label -> [min, median, max] per round
    machine: dict | None = None  # CPU time, load and CPUs while it ran (`harness.training.resources`)
    extra: dict = field(default_factory=dict)  # other measurements (images/s, FLOPs, utilisation)

    @property
    def verdicts(self) -> dict[str, str]:
        return {label: verdict(self.spreads.get(label), goal, self.machine) for label, goal in self.targets.items()}

    def lines(self) -> list[str]:
        out = [f"{self.name}" + (f"  ({self.notes})" if self.notes else "")]
        if self.machine is not None and contended(self.machine):
            out.append(
                f"    machine busy: load {self.machine['load_1min']:.1f} on {self.machine['cpus']} CPUs "
                f"(other processes ~{other_load(self.machine):.1f} cores"
                + (f", {self.machine['other_cores_from']}" if self.machine.get("other_cores_from") else "")
                + "); no verdicts"
            )
        for variant, sec in self.seconds.items():
            out.append(f"    {variant:<40} {sec * 1000:10.1f} ms")
        verdicts = self.verdicts
        for label, ratio in self.ratios.items():
            spread = self.spreads.get(label)
            shown = f"  [{spread[0]:.3f} .. {spread[2]:.3f}]" if spread else ""
            goal = self.targets.get(label)
            judged = "" if goal is None else f"  target <= {goal}: {verdicts[label]}"
            out.append(f"    {label:<40} {ratio:10.3f}{shown}{judged}")
        for label, value in self.extra.items():
            out.append(f"    {label:<40} {value}")
        return out


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    run: Callable[[BenchOptions], list[BenchResult]]
    rounds: int = DEFAULT_ROUNDS  # default alternating rounds: a grid benchmark's round takes minutes

    def __call__(self, options: BenchOptions) -> list[BenchResult]:
        if options.repeats is None:
            options = dataclasses.replace(options, repeats=self.rounds)
        return self.run(options)


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def register_benchmark(name: str, description: str, rounds: int = DEFAULT_ROUNDS):
    def decorate(fn: Callable[[BenchOptions], list[BenchResult]]):
        BENCHMARKS.add(name, Benchmark(name, description, fn, rounds))
        return fn

    return decorate


class Timings(dict):
    """variant -> median seconds per call (a dict, as before), plus every round's seconds (`rounds`)
    and the machine's state while they were taken (`machine`)."""

    def __init__(self, rounds: dict[str, list[float]], machine: dict):
        super().__init__({k: statistics.median(v) for k, v in rounds.items()})
        self.rounds = rounds
        self.machine = machine

    def ratio(self, a: str, b: str) -> tuple[float, list[float]]:
        """(median, [min, median, max]) of the per-round ratios a_i / b_i."""
        return spread([x / y for x, y in zip(self.rounds[a], self.rounds[b])])


def ratio_result(
    name: str,
    timings: Timings,
    pairs: dict[str, tuple[str, str]],
    targets: dict[str, float] | None = None,
    notes: str = "",
) -> BenchResult:
    """A result whose ratios (label -> (variant a, variant b), a / b) are per-round spreads."""
    per_round = {label: timings.ratio(a, b) for label, (a, b) in pairs.items()}
    return BenchResult(
        name=name,
        seconds=dict(timings),
        ratios={k: mid for k, (mid, _) in per_round.items()},
        targets=dict(targets or {}),
        notes=notes,
        machine=timings.machine,
        spreads={k: s for k, (_, s) in per_round.items()},
    )


def spread(values: list[float]) -> tuple[float, list[float]]:
    mid = statistics.median(values)
    return mid, [min(values), mid, max(values)]


def alternate(variants: dict[str, Callable[[], object]], options: BenchOptions) -> Timings:
    """Wall seconds per call of each variant, interleaved round by round, warm-up excluded."""
    for _ in range(options.warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    meter = EpochMeter(options.device).start()
    for _ in range(options.repeats):
        for name, fn in variants.items():
            synchronize(options.device)
            t0 = time.perf_counter()
            fn()
            synchronize(options.device)
            times[name].append(time.perf_counter() - t0)
    return Timings(times, meter.finish())


def load_benchmarks() -> None:
    from harness import benchmarks

    for module in pkgutil.iter_modules(benchmarks.__path__):
        importlib.import_module(f"{benchmarks.__name__}.{module.name}")


load_benchmarks()
