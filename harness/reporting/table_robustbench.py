"""Official checkpoints: RobustBench's published numbers beside our `harness eval` of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from harness.reporting import reference
from harness.reporting.loading import Evaluation, Results
from harness.reporting.tables import (
    AUTOATTACK_PREFERENCE,
    Cell,
    Column,
    Table,
    diff_cell,
    exported,
    external_match,
    fmt,
    reliability_cell,
    shown,
    spec_table,
)


def robustbench_table(results: Results) -> Table:
    notes = [
        "Published numbers: RobustBench model_info (Linf leaderboard), copied into harness/data/robustbench.csv.",
        "“Our” columns come from `harness eval` records under results/external/ (same attack code as our runs).",
        "Zhang2019Theoretically was evaluated at eps 0.031 (≈7.9/255), the others at 8/255.",
    ]
    return spec_table(
        "robustbench",
        "Official checkpoints: RobustBench's published numbers and ours",
        "RobustBench Linf",
        ROBUSTBENCH_COLUMNS,
        [_checkpoint_row(results, entry) for _, entry in reference.robustbench().iterrows()],
        notes,
    )


@dataclass(frozen=True)
class CheckpointRow:
    """One published checkpoint beside our evaluation of it, computed once; the columns read from it."""

    entry: pd.Series  # the row of harness/data/robustbench.csv
    ours: Evaluation | None  # our `harness eval` of the checkpoint
    aa: dict[str, Any] | None  # its AutoAttack result at the published eps

    @property
    def clean_ours(self) -> float | None:
        return float(self.ours.data["clean_accuracy"]) if self.ours else None

    @property
    def aa_ours(self) -> float | None:
        return float(self.aa["robust_accuracy"]) if self.aa else None


def _checkpoint_row(results: Results, entry: pd.Series) -> CheckpointRow:
    ours = external_match(results, entry["dataset"], entry["name"])
    aa = (
        next((ours.result(a, entry["eps"]) for a in AUTOATTACK_PREFERENCE if ours.result(a, entry["eps"])), None)
        if ours
        else None
    )
    return CheckpointRow(entry, ours, aa)


def _our_aa_text(row: CheckpointRow) -> str:
    if row.ours and row.aa:
        return f"{row.aa_ours:.2f} (n={row.aa['n']})"
    return f"no AutoAttack at eps {row.entry['eps']}" if row.ours else "—"


def _our_n(row: CheckpointRow) -> int | None:
    return row.aa["n"] if row.aa else (row.ours.data["n"] if row.ours else None)


ROBUSTBENCH_COLUMNS = (
    Column("Data set", "dataset", lambda r: r.entry["dataset"], lambda r: r.entry["dataset"]),
    Column(
        "RobustBench model",
        "name",
        lambda r: r.entry["name"],
        lambda r: Cell(r.entry["name"], "method", r.entry["note"]),
    ),
    shown(
        "Method",
        lambda r: reference.method_label(r.entry["harness_method"]) if r.entry["harness_method"] else "—",
    ),
    Column("Architecture", "architecture", lambda r: r.entry["architecture"], lambda r: r.entry["architecture"]),
    Column("eps", "eps", lambda r: r.entry["eps"], lambda r: r.entry["eps"]),
    exported("harness_method", lambda r: r.entry["harness_method"]),
    Column(
        "Published clean",
        "published_clean",
        lambda r: float(r.entry["clean"]),
        lambda r: Cell(f"{float(r.entry['clean']):.2f}", "claim"),
    ),
    Column(
        "Published AA",
        "published_autoattack",
        lambda r: float(r.entry["autoattack"]),
        lambda r: Cell(f"{float(r.entry['autoattack']):.2f}", "claim"),
    ),
    Column("Our clean", "ours_clean", lambda r: r.clean_ours, lambda r: fmt(r.clean_ours)),
    Column("Our AA", "ours_autoattack", lambda r: r.aa_ours, _our_aa_text),
    exported("ours_n", _our_n),
    shown(
        "Δ AA (ours − published)",
        lambda r: diff_cell([r.aa_ours], float(r.entry["autoattack"])) if r.aa_ours is not None else Cell("—", "muted"),
    ),
    shown(
        "Reliability",
        lambda r: (
            reliability_cell([r.ours])
            if r.ours
            else Cell("not evaluated", "muted", "run `harness eval robustbench:...`")
        ),
    ),
)
