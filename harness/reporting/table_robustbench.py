"""Official checkpoints: RobustBench's published numbers beside our `harness eval` of them."""

from __future__ import annotations

import pandas as pd

from harness.reporting import reference
from harness.reporting.loading import Results
from harness.reporting.tables import (
    AUTOATTACK_PREFERENCE,
    Cell,
    Table,
    diff_cell,
    external_match,
    fmt,
    reliability_cell,
)


def robustbench_table(results: Results) -> Table:
    table = reference.robustbench()
    export_rows, display_rows = [], []
    for _, row in table.iterrows():
        export, display = _rows(results, row)
        export_rows.append(export)
        display_rows.append(display)
    notes = [
        "Published numbers: RobustBench model_info (Linf leaderboard), copied into harness/data/robustbench.csv.",
        "“Our” columns come from `harness eval` records under results/external/ (same attack code as our runs).",
        "Zhang2019Theoretically was evaluated at eps 0.031 (≈7.9/255), the others at 8/255.",
    ]
    return Table(
        "robustbench",
        "Official checkpoints: RobustBench's published numbers and ours",
        "RobustBench Linf",
        pd.DataFrame(export_rows),
        display_rows,
        notes,
    )


def _rows(results: Results, row) -> tuple[dict, dict]:
    """One published checkpoint beside our evaluation of it: (export row, display row)."""
    ours = external_match(results, row["dataset"], row["name"])
    aa = (
        next((ours.result(a, row["eps"]) for a in AUTOATTACK_PREFERENCE if ours.result(a, row["eps"])), None)
        if ours
        else None
    )
    clean_ours = float(ours.data["clean_accuracy"]) if ours else None
    aa_ours = float(aa["robust_accuracy"]) if aa else None
    method = reference.method_label(row["harness_method"]) if row["harness_method"] else "—"
    export = {
        "dataset": row["dataset"],
        "name": row["name"],
        "architecture": row["architecture"],
        "eps": row["eps"],
        "harness_method": row["harness_method"],
        "published_clean": float(row["clean"]),
        "published_autoattack": float(row["autoattack"]),
        "ours_clean": clean_ours,
        "ours_autoattack": aa_ours,
        "ours_n": aa["n"] if aa else (ours.data["n"] if ours else None),
    }
    ours_aa_text = "—"
    if ours and aa:
        ours_aa_text = f"{aa_ours:.2f} (n={aa['n']})"
    elif ours:
        ours_aa_text = f"no AutoAttack at eps {row['eps']}"
    display = {
        "Data set": row["dataset"],
        "RobustBench model": Cell(row["name"], "method", row["note"]),
        "Method": method,
        "Architecture": row["architecture"],
        "eps": row["eps"],
        "Published clean": Cell(f"{float(row['clean']):.2f}", "claim"),
        "Published AA": Cell(f"{float(row['autoattack']):.2f}", "claim"),
        "Our clean": fmt(clean_ours),
        "Our AA": ours_aa_text,
        "Δ AA (ours − published)": diff_cell([aa_ours], float(row["autoattack"]))
        if aa_ours is not None
        else Cell("—", "muted"),
        "Reliability": reliability_cell([ours])
        if ours
        else Cell("not evaluated", "muted", "run `harness eval robustbench:...`"),
    }
    return export, display
