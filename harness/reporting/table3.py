"""Table 3: training cost per equivalent epoch per device, and the paper's timings against the compute floor."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pandas as pd

from harness.core.defense import StepCost
from harness.reporting import compute, reference
from harness.reporting.loading import Protocol, Run
from harness.reporting.stats import bootstrap_ratio, mean_std
from harness.reporting.tables import (
    Cell,
    Column,
    Groups,
    Table,
    epoch_seconds,
    fmt,
    seed_count_mark,
    seeds_note,
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
    examples = protocol.train_examples
    variants = {v: runs for v, runs in variants.items() if epoch_seconds(runs)}  # a record without epochs: no time
    baseline = variants.get(PGD_AT)
    paper_pgd = reference.paper_seconds("pgd-at")
    export_rows, display_rows = [], []
    for variant, runs in variants.items():
        export, display = _table3_row(variant, runs, baseline, device, peak, flops, examples, paper_pgd)
        export_rows.append(export)
        display_rows.append(display)
    notes = _table3_notes(protocol, device, variants, first, flops, peak, baseline)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_")
    return Table(
        f"table3_{protocol.slug()}_{slug}",
        f"Table 3: cost per epoch — {protocol.dataset}, {protocol.model}, {device}",
        protocol.label(),
        pd.DataFrame(export_rows),
        display_rows,
        notes,
    )


def _table3_row(
    variant: Variant,
    runs: list[Run],
    baseline: list[Run] | None,
    device: str,
    peak: compute.DevicePeak | None,
    flops: float | None,
    examples: int | None,
    paper_pgd: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One method's seconds per epoch, ratio to PGD-AT and compute floor: (export row, display row)."""
    seconds = epoch_seconds(runs)
    ratio = bootstrap_ratio(seconds, epoch_seconds(baseline)) if baseline and variant != PGD_AT else None
    paper_s = reference.paper_seconds(variant.defense)
    cost = compute.step_cost(variant.defense, runs[0].record["defense"].get("config"))
    floors = _floors(peak, flops, cost, examples)
    mean, std = mean_std(seconds)
    n_seeds = len({r.seed for r in runs})
    export = {
        "method": variant_label(variant),
        "seconds_per_epoch": mean,
        "seconds_std": std,
        "epochs_timed": len(seconds),
        "seeds": n_seeds,
        **_ratio_fields(ratio),
        "paper_seconds": paper_s,
        "paper_ratio": paper_s / paper_pgd if paper_s else None,
        "device": device,
        "forward_equivalents": cost.forward_equivalents if cost else None,
        "forward_flops": flops,
        "floor_seconds_fp32": floors.get("fp32"),
        "floor_seconds_tensor": floors.get("tensor"),
    }
    display = {
        "Method": Cell(variant_label(variant), "method"),
        "s / epoch": f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else ""),
        "Seeds": seed_count_mark(Cell(str(n_seeds)), n_seeds),
        "Epochs timed": str(len(seconds)),
        "× PGD-AT [95%]": Cell(
            _ratio_text(variant, ratio), title=ratio.interval.method if ratio and ratio.interval else ""
        ),
        "Paper s / epoch (V100)": Cell(fmt(paper_s, 0), "claim"),
        "Paper ×": Cell(f"×{paper_s / paper_pgd:.2f}" if paper_s else "—", "claim"),
        "Fwd-equiv / example": _cost_cell(cost),
        "Floor s (fp32 peak)": fmt(floors.get("fp32")) if floors else "—",
        "Floor s (fp16 tensor peak)": fmt(floors.get("tensor")) if floors else "—",
    }
    return export, display


def _floors(peak: compute.DevicePeak | None, flops: float | None, cost, examples: int | None) -> dict[str, float]:
    """The seconds an epoch cannot beat at the device's fp32 and tensor peaks ({} without a cost model)."""
    if not (peak and flops and cost and examples):
        return {}
    return {
        kind: compute.floor_seconds(flops, cost.forward_equivalents, examples, tflops)
        for kind, tflops in (("fp32", peak.fp32_tflops), ("tensor", peak.tensor_tflops))
    }


def _ratio_fields(ratio) -> dict[str, float | None]:
    """The export's ratio to PGD-AT and its interval (None where there is none)."""
    interval = ratio.interval if ratio else None
    return {
        "ratio_to_pgd_at": ratio.value if ratio else None,
        "ratio_low": interval.low if interval else None,
        "ratio_high": interval.high if interval else None,
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
