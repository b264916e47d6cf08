"""Table 3: training cost per equivalent epoch per device, and the paper's timings against the compute floor."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from harness.core.defense import StepCost
from harness.reporting import compute, reference
from harness.reporting.loading import Protocol, Run
from harness.reporting.stats import Estimate, Interval, bootstrap_ratio, mean_std
from harness.reporting.tables import (
    Cell,
    Column,
    Groups,
    Table,
    epoch_seconds,
    exported,
    fmt,
    method_column,
    seed_count_mark,
    seeds_note,
    shown,
    spec_table,
    variant_label,
)
from harness.reporting.variant import Variant
from harness.training.resources import CONTENTION_CORES, contended

PGD_AT = Variant("pgd-at")  # the reference of every ratio: PGD-AT's only configuration


def table3(groups: Groups) -> list[Table]:
    tables = []
    for protocol, variants in groups.items():
        by_device: dict[str, dict[Variant, list[Run]]] = defaultdict(dict)
        for variant, runs in variants.items():
            for device in sorted({r.device for r in runs}):
                by_device[device][variant] = [r for r in runs if r.device == device]
        for device, members in by_device.items():
            tables.append(_table3_one(protocol, device, members))
    return tables


def _table3_one(protocol: Protocol, device: str, variants: dict[Variant, list[Run]]) -> Table:
    peak = compute.device_peak(device)
    first = next(iter(variants.values()))[0]
    flops = compute.forward_flops(first.spec["model"], protocol.dataset)
    variants = {v: runs for v, runs in variants.items() if epoch_seconds(runs)}  # a record without epochs: no time
    baseline = variants.get(PGD_AT)
    rows = [
        _table3_row(variant, runs, baseline, device, FloorModel(peak, flops, protocol.train_examples))
        for variant, runs in variants.items()
    ]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_")
    return spec_table(
        f"table3_{protocol.slug()}_{slug}",
        f"Table 3: cost per epoch — {protocol.dataset}, {protocol.model}, {device}",
        protocol.label(),
        TABLE3_COLUMNS,
        rows,
        _table3_notes(protocol, device, variants, first, flops, peak, baseline),
    )


@dataclass(frozen=True)
class FloorModel:
    """What bounds an epoch on this device: its peak, the model's forward FLOPs, the examples per epoch."""

    peak: compute.DevicePeak | None
    flops: float | None
    examples: int | None


@dataclass(frozen=True)
class Table3Row:
    """One method's timing on one device, computed once; the columns read from it."""

    variant: Variant
    device: str
    seconds: list[float]  # per equivalent epoch, every epoch of every seed
    seeds: int
    ratio: Estimate | None  # to PGD-AT on this device
    paper_seconds: float | None
    cost: StepCost | None
    flops: float | None
    floors: dict[str, float]  # fp32 / tensor -> seconds; {} without a cost model or a known peak

    @property
    def interval(self) -> Interval | None:
        return self.ratio.interval if self.ratio else None

    @property
    def paper_ratio(self) -> float | None:
        return self.paper_seconds / reference.paper_seconds("pgd-at") if self.paper_seconds else None


def _table3_row(
    variant: Variant, runs: list[Run], baseline: list[Run] | None, device: str, floor: FloorModel
) -> Table3Row:
    """One method's seconds per epoch, ratio to PGD-AT and compute floor."""
    seconds = epoch_seconds(runs)
    cost = compute.step_cost(variant.defense, runs[0].record["defense"].get("config"))
    return Table3Row(
        variant,
        device,
        seconds,
        len({r.seed for r in runs}),
        bootstrap_ratio(seconds, epoch_seconds(baseline)) if baseline and variant != PGD_AT else None,
        reference.paper_seconds(variant.defense),
        cost,
        floor.flops,
        _floors(floor.peak, floor.flops, cost, floor.examples),
    )


def _floor_column(header: str, kind: str) -> Column:
    """The epoch's floor at the device's fp32 or tensor peak ("—" without a cost model or a known peak)."""
    return Column(header, f"floor_seconds_{kind}", lambda r: r.floors.get(kind), lambda r: fmt(r.floors.get(kind)))


TABLE3_COLUMNS = (
    method_column(lambda r: variant_label(r.variant)),
    Column("s / epoch", "seconds_per_epoch", lambda r: mean_std(r.seconds)[0], lambda r: _seconds_text(r.seconds)),
    exported("seconds_std", lambda r: mean_std(r.seconds)[1]),
    exported("epochs_timed", lambda r: len(r.seconds)),
    Column("Seeds", "seeds", lambda r: r.seeds, lambda r: seed_count_mark(Cell(str(r.seeds)), r.seeds)),
    shown("Epochs timed", lambda r: str(len(r.seconds))),
    Column(
        "× PGD-AT [95%]",
        "ratio_to_pgd_at",
        lambda r: r.ratio.value if r.ratio else None,
        lambda r: Cell(_ratio_text(r.variant, r.ratio), title=r.interval.method if r.interval else ""),
    ),
    exported("ratio_low", lambda r: r.interval.low if r.interval else None),
    exported("ratio_high", lambda r: r.interval.high if r.interval else None),
    Column(
        "Paper s / epoch (V100)",
        "paper_seconds",
        lambda r: r.paper_seconds,
        lambda r: Cell(fmt(r.paper_seconds, 0), "claim"),
    ),
    Column(
        "Paper ×",
        "paper_ratio",
        lambda r: r.paper_ratio,
        lambda r: Cell(f"×{r.paper_ratio:.2f}" if r.paper_seconds else "—", "claim"),
    ),
    exported("device", lambda r: r.device),
    Column(
        "Fwd-equiv / example",
        "forward_equivalents",
        lambda r: r.cost.forward_equivalents if r.cost else None,
        lambda r: _cost_cell(r.cost),
    ),
    exported("forward_flops", lambda r: r.flops),
    _floor_column("Floor s (fp32 peak)", "fp32"),
    _floor_column("Floor s (fp16 tensor peak)", "tensor"),
)


def _seconds_text(seconds: list[float]) -> str:
    mean, std = mean_std(seconds)
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _floors(peak: compute.DevicePeak | None, flops: float | None, cost, examples: int | None) -> dict[str, float]:
    """The seconds an epoch cannot beat at the device's fp32 and tensor peaks ({} without a cost model)."""
    if not (peak and flops and cost and examples):
        return {}
    return {
        kind: compute.floor_seconds(flops, cost.forward_equivalents, examples, tflops)
        for kind, tflops in (("fp32", peak.fp32_tflops), ("tensor", peak.tensor_tflops))
    }


def _cost_cell(cost) -> Cell:
    """Forward-equivalents per example, the cost model's assumption on hover."""
    if cost is None:
        return Cell("?", title="no cost model for this method")
    return Cell(fmt(cost.forward_equivalents, 0), title=cost.assumption)


def _ratio_text(variant: Variant, ratio) -> str:
    if variant == PGD_AT:
        return "×1.00 (reference)"
    if ratio:
        return f"×{ratio.value:.2f}" + (
            f" [{ratio.interval.low:.2f}, {ratio.interval.high:.2f}]" if ratio.interval else ""
        )
    return "—"


def _table3_notes(
    protocol: Protocol,
    device: str,
    variants: dict[Variant, list[Run]],
    first: Run,
    flops: float | None,
    peak: compute.DevicePeak | None,
    baseline: list[Run] | None,
) -> list[str]:
    """What the table's seconds mean, which peak bounds them, and which rows carry no verdict (busy machine)."""
    notes = [
        f"Protocol: {protocol.label()}. Device: {device}.",
        "Seconds are training time per equivalent epoch (a pass's time over the epochs of SGD steps it made; "
        "Free-AT: a full pass / m) from the same runs' records, "
        "averaged over every epoch of every seed; validation is excluded.",
        seeds_note(),
    ]
    notes.append(
        f"Forward FLOPs of {first.spec['model']} on one {protocol.dataset} input: "
        + (f"{flops / 1e9:.4g} GFLOP (FlopCounterMode)." if flops else "unknown (model not registered).")
    )
    if peak is None:
        notes.append(
            f"Peak FLOP/s of “{device}” is unknown to the harness (known: "
            + ", ".join(p.match for p in compute.DEVICE_PEAKS)
            + "), so no floor is computed for it."
        )
    else:
        notes.append(
            f"{peak.match} peak: {peak.fp32_tflops} TFLOP/s fp32, {peak.tensor_tflops} TFLOP/s dense "
            f"fp16/bf16 tensor ({peak.source})."
        )
    if baseline is None:
        notes.append("No PGD-AT run on this device under this protocol: ratios are missing.")
    notes.extend(_busy_and_cost_notes(variants))
    return notes


def _busy_and_cost_notes(variants: dict[Variant, list[Run]]) -> list[str]:
    """Which rows were timed on a busy machine (no verdict), and each method's cost-model assumption."""
    notes = []
    busy = sorted(
        {
            variant_label(v)
            for v, runs in variants.items()
            for r in runs
            for entry in r.record["epochs"]
            if contended(entry.get("resources"))
        }
    )
    if busy:
        notes.append(
            "Timed on a busy machine (other processes kept more than "
            f"{CONTENTION_CORES} CPU cores busy): {', '.join(busy)}; their seconds and ratios "
            "are shown but carry no verdict."
        )
    costs = (compute.step_cost(v.defense, runs[0].record["defense"].get("config")) for v, runs in variants.items())
    notes.extend(sorted({f"{variant_label(v)}: {c.assumption}." for v, c in zip(variants, costs) if c}))
    return notes


PAPER_SETTING = {"model": "wrn-34-10", "dataset": "cifar10", "examples": 50000, "device": "Tesla V100"}


@dataclass(frozen=True)
class FloorRow:
    """One of the paper's Table 3 rows beside the compute floor of its method on a V100."""

    method: str
    seconds: float
    cost: StepCost
    fp32: float
    tensor: float

    @property
    def possible(self) -> bool:
        return self.seconds >= self.tensor


FLOOR_COLUMNS = (
    Column("Method", "method", lambda r: r.method, lambda r: Cell(r.method, "method")),
    Column("Paper s / epoch", "paper_seconds", lambda r: r.seconds, lambda r: Cell(f"{r.seconds:.0f}", "claim")),
    Column(
        "Fwd-equiv / example",
        "forward_equivalents",
        lambda r: r.cost.forward_equivalents,
        lambda r: Cell(f"{r.cost.forward_equivalents:.0f}", title=r.cost.assumption),
    ),
    Column("Floor s (fp32, 15.7 TFLOP/s)", "floor_seconds_fp32", lambda r: r.fp32, lambda r: f"{r.fp32:.0f}"),
    Column(
        "Floor s (fp16 tensor, 125 TFLOP/s)", "floor_seconds_tensor", lambda r: r.tensor, lambda r: f"{r.tensor:.0f}"
    ),
    Column(
        "Physically possible?",
        "possible",
        lambda r: r.possible,
        lambda r: Cell("yes" if r.possible else "no: below the floor", "good" if r.possible else "bad"),
    ),
)


def floor_rows(flops: float, peak: compute.DevicePeak) -> list[FloorRow]:
    name_of = {v: k for k, v in reference.PAPER_ROW.items() if k not in ("ades-joint", "ades-bilevel")}
    rows = []
    for _, row in reference.paper_table3().iterrows():
        cost = compute.step_cost(name_of.get(row["method"], row["method"]))
        fp32, tensor = (
            compute.floor_seconds(flops, cost.forward_equivalents, PAPER_SETTING["examples"], tflops)
            for tflops in (peak.fp32_tflops, peak.tensor_tflops)
        )
        rows.append(FloorRow(row["method"], float(row["seconds_per_epoch"]), cost, fp32, tensor))
    return rows


def paper_floor_table() -> Table:
    """The paper's Table 3 against what a V100 can compute for WRN-34-10 on CIFAR-10."""
    flops = compute.forward_flops(PAPER_SETTING["model"], PAPER_SETTING["dataset"])
    peak = compute.device_peak(PAPER_SETTING["device"])
    notes = [
        f"WRN-34-10 forward on one 32×32 input: {flops / 1e9:.2f} GFLOP (measured with FlopCounterMode); "
        f"{PAPER_SETTING['examples']:,} training examples per epoch; V100 peaks from {peak.source}.",
        "The floor assumes every FLOP runs at the device's peak with no data loading, memory traffic or "
        "kernel overhead: real epochs take longer.",
    ]
    return spec_table(
        "table3_paper_floor",
        "Table 3b: the paper's timings against the V100 compute floor",
        "CIFAR-10, WRN-34-10, V100",
        FLOOR_COLUMNS,
        floor_rows(flops, peak),
        notes,
    )
