"""Table 1: clean, PGD and AutoAttack accuracy per method and checkpoint, beside the paper's numbers."""

from __future__ import annotations

from typing import Any

import pandas as pd

from harness.reporting import protocol_cards, reference
from harness.reporting.loading import Protocol, Results, Run
from harness.reporting.stats import mean_std
from harness.reporting.tables import (
    AUTOATTACK_PREFERENCE,
    CHECKPOINT_LABELS,
    CHECKPOINTS,
    AutoAttackValues,
    Cell,
    Groups,
    Table,
    autoattack_values,
    diff_cell,
    external_match,
    final_values,
    fmt,
    fmt_mean_std,
    reliability_cell,
    seed_count_mark,
    seeds_note,
    variant_label,
)
from harness.reporting.variant import Variant


def _published(results: Results, dataset: str, variant: Variant) -> str:
    """RobustBench's numbers for the official checkpoints of this baseline, and ours where evaluated."""
    table = reference.robustbench()
    hits = table[(table["dataset"] == dataset) & (table["harness_method"] == variant.defense)]
    parts = []
    for _, r in hits.iterrows():
        text = f"{r['name']}: {r['clean']} / {r['autoattack']} ({r['architecture']}, eps {r['eps']}" + (
            f"; {r['note']})" if r.get("note") else ")"
        )
        ours = external_match(results, dataset, r["name"])
        if ours is not None:
            aa = next((ours.result(a, r["eps"]) for a in AUTOATTACK_PREFERENCE if ours.result(a, r["eps"])), None)
            text += f"; ours {float(ours.data['clean_accuracy']):.2f} / " + (
                f"{float(aa['robust_accuracy']):.2f} (n={aa['n']})" if aa else "no AutoAttack"
            )
        parts.append(text)
    return "; ".join(parts)


def table1(results: Results, groups: Groups) -> list[Table]:
    return [
        _table1_one(results, index, protocol, variants) for index, (protocol, variants) in enumerate(groups.items(), 1)
    ]


def _table1_one(results: Results, index: int, protocol: Protocol, variants: dict[Variant, list[Run]]) -> Table:
    """Table 1 for one protocol: a row per (method, checkpoint), the paper's numbers beside where it has them."""
    with_paper = not reference.paper_table1().query("dataset == @protocol.dataset").empty
    steps = next(iter(variants.values()))[0].pgd_steps
    export_rows, display_rows = [], []
    for variant, runs in variants.items():
        claim = reference.paper_claim(protocol.dataset, variant.defense) if with_paper else None
        for checkpoint in CHECKPOINTS:
            rows = _table1_row(results, protocol, variant, checkpoint, runs, with_paper, claim, steps)
            if rows is not None:
                export_rows.append(rows[0])
                display_rows.append(rows[1])
    return Table(
        f"table1_{protocol.slug()}",
        f"Table 1.{index}: accuracy (%) — {protocol.dataset}, {protocol.model}, eps {protocol.eps}",
        protocol.label(),
        pd.DataFrame(export_rows),
        display_rows,
        _table1_notes(protocol, f"PGD-{steps}", with_paper, steps),
    )


def _table1_row(
    results: Results,
    protocol: Protocol,
    variant: Variant,
    checkpoint: str,
    runs: list[Run],
    with_paper: bool,
    claim,
    steps: int,
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """One (method, checkpoint) row: (export, display); None when no run has that checkpoint's numbers."""
    pgd_name = f"PGD-{steps}"
    clean = final_values(runs, checkpoint, "clean")
    pgd = final_values(runs, checkpoint, "pgd")
    if not clean:
        return None
    n_test = sorted({int(r.record["final"][checkpoint]["n"]) for r in runs})
    aa = autoattack_values(results, runs, checkpoint, protocol.eps)
    aa_vals = [] if aa.mixed else aa.values
    row_export = _export_row(variant, checkpoint, runs, n_test, clean, pgd, aa, aa_vals)
    row = {
        "Method": Cell(variant_label(variant), "method"),
        "Checkpoint": CHECKPOINT_LABELS[checkpoint],
        "Seeds": seed_count_mark(Cell(str(len(runs))), len(runs)),
        "Test n": ", ".join(map(str, n_test)),
        "Clean": fmt_mean_std(clean),
    }
    if with_paper:
        row["Paper clean"] = Cell(fmt(claim and claim["clean"], 1), "claim")
        row["Δ clean"] = diff_cell(clean, claim and claim["clean"])
    row[pgd_name] = fmt_mean_std(pgd)
    if with_paper:
        row["Paper PGD-20"] = Cell(fmt(claim and claim["pgd"], 1), "claim")
        row["Δ PGD"] = (
            diff_cell(pgd, claim and claim["pgd"]) if steps == 20 else Cell("n/a", "muted", f"{pgd_name} is not PGD-20")
        )
    row["AutoAttack"] = _autoattack_cell(aa, aa_vals, len(runs))
    row["AA n"] = ", ".join(map(str, sorted(aa.n))) or "—"
    if with_paper:
        _paper_autoattack(row, row_export, claim, aa_vals)
    _mark_departures(row, row_export, runs, (pgd_name, "Clean", "AutoAttack"))
    _add_reliability_and_published(results, protocol, variant, checkpoint, runs, aa, with_paper, row, row_export)
    return row_export, row


def _paper_autoattack(row: dict[str, Any], row_export: dict[str, Any], claim, aa_vals: list[float]) -> None:
    """The paper's AutoAttack beside ours, and the paper's three numbers in the export."""
    row["Paper AA"] = Cell(fmt(claim and claim["autoattack"], 1), "claim")
    row["Δ AA"] = diff_cell(aa_vals, claim and claim["autoattack"])
    row_export.update(
        paper_clean=claim and claim["clean"],
        paper_pgd20=claim and claim["pgd"],
        paper_autoattack=claim and claim["autoattack"],
    )


def _add_reliability_and_published(
    results: Results,
    protocol: Protocol,
    variant: Variant,
    checkpoint: str,
    runs: list[Run],
    aa: AutoAttackValues,
    with_paper: bool,
    row: dict[str, Any],
    row_export: dict[str, Any],
) -> None:
    """The row's reliability badge, then RobustBench's published numbers for the method where the paper compares."""
    row["Reliability"] = reliability_cell(
        aa.evaluations or [e for r in runs for e in results.evaluations_of(r.run_id) if e.label == checkpoint]
    )
    published = _published(results, protocol.dataset, variant) if with_paper else ""
    if with_paper:
        row["RobustBench official (clean / AA)"] = Cell(published or "—", "claim" if published else "muted")
        row_export["robustbench"] = published


def _table1_notes(protocol: Protocol, pgd_name: str, with_paper: bool, steps: int) -> list[str]:
    """The protocol, where each number comes from, and why a comparison with the paper is missing."""
    notes = [
        f"Protocol: {protocol.label()}.",
        seeds_note(),
        f"{protocol_cards.MARK}: the row's runs depart from the method's published protocol (hover the "
        f"number; the protocol cards list every setting).",
        f"Clean and {pgd_name} from the run records (test examples {protocol.test_indices}); AutoAttack "
        f"from `harness eval` records at eps {protocol.eps}, with its own test-example count (AA n).",
    ]
    if not with_paper:
        notes.append(f"The paper reports CIFAR-10/100 only; its numbers are not compared with {protocol.dataset}.")
    elif steps != 20:
        notes.append(
            f"The runs were evaluated with {pgd_name}, not the paper's PGD-20: that difference is not computed."
        )
    return notes


def _export_row(
    variant: Variant,
    checkpoint: str,
    runs: list[Run],
    n_test: list[int],
    clean: list[float],
    pgd: list[float],
    aa: AutoAttackValues,
    aa_vals: list[float],
) -> dict[str, Any]:
    """The numbers of one Table 1 row, for CSV and LaTeX."""
    return {
        "method": variant_label(variant),
        "defense": variant.format(),
        "checkpoint": checkpoint,
        "seeds": len(runs),
        "test_examples": ",".join(map(str, n_test)),
        "clean_mean": mean_std(clean)[0],
        "clean_std": mean_std(clean)[1],
        "pgd_mean": mean_std(pgd)[0] if pgd else None,
        "pgd_std": mean_std(pgd)[1] if pgd else None,
        "autoattack_mean": mean_std(aa_vals)[0] if aa_vals else None,
        "autoattack_std": mean_std(aa_vals)[1] if aa_vals else None,
        "autoattack_seeds": len(aa_vals),
        "autoattack_n": ",".join(map(str, sorted(aa.n))),
        "autoattack_version": ",".join(sorted(aa.attacks)),
    }


def _autoattack_cell(aa: AutoAttackValues, aa_vals: list[float], seeds: int) -> Cell:
    """AutoAttack mean over seeds, or why it is not averaged (mixed subsets or versions)."""
    aa_cell = fmt_mean_std(aa_vals)
    if aa.mixed:
        aa_cell = Cell(
            "not averaged: mixed " + ", ".join(map(str, sorted(aa.n))) + " examples / " + ", ".join(sorted(aa.attacks))
        )
    else:
        extra = f" ({len(aa_vals)} of {seeds} seeds)" if aa.missing and aa_vals else ""
        if aa.attacks and aa.attacks != {"autoattack-standard"}:
            extra += f" [{', '.join(sorted(aa.attacks))}]"
        aa_cell = Cell(aa_cell.text + extra, aa_cell.cls, aa_cell.title)
    return aa_cell


def _mark_departures(
    row: dict[str, Any], row_export: dict[str, Any], runs: list[Run], columns: tuple[str, ...]
) -> None:
    """Mark the row's numbers when its runs depart from the authors' protocol, and say in what."""
    departures = protocol_cards.departure_settings(runs)
    row_export["protocol_departures"] = "; ".join(departures)
    title = "departs from the authors' protocol in: " + "; ".join(departures) if departures else ""
    for column in columns:
        value = row.get(column)
        text = value.text if isinstance(value, Cell) else str(value)
        if departures and text not in ("—", ""):
            row[column] = Cell(f"{text} {protocol_cards.MARK}", getattr(value, "cls", ""), title)
    row["Authors' protocol"] = (
        Cell(f"{protocol_cards.MARK} {len(departures)} setting(s) differ", "muted", title)
        if departures
        else Cell("as published", "good")
    )
