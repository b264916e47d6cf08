"""Table 1: clean, PGD and AutoAttack accuracy per method and checkpoint, beside the paper's numbers."""

from __future__ import annotations

from dataclasses import dataclass

from harness.reporting import protocol_cards, reference
from harness.reporting.loading import Protocol, Results, Run
from harness.reporting.stats import mean_std
from harness.reporting.tables import (
    AUTOATTACK_PREFERENCE,
    CHECKPOINT_LABELS,
    CHECKPOINTS,
    AutoAttackValues,
    Cell,
    Column,
    Groups,
    Table,
    autoattack_values,
    diff_cell,
    exported,
    external_match,
    final_values,
    fmt,
    fmt_mean_std,
    method_column,
    reliability_cell,
    seed_count_mark,
    seeds_note,
    shown,
    spec_table,
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


@dataclass(frozen=True)
class Table1Row:
    """One (method, checkpoint) row of Table 1, computed once; the columns read from it."""

    variant: Variant
    checkpoint: str
    runs: list[Run]
    n_test: list[int]
    clean: list[float]
    pgd: list[float]
    aa: AutoAttackValues
    claim: dict[str, float] | None  # the paper's numbers for the row's method, where it has them
    pgd_name: str
    departures: list[str]
    reliability: Cell
    published: str  # RobustBench's numbers for the method ('' off the paper's data sets)

    @property
    def aa_vals(self) -> list[float]:
        """AutoAttack per seed; none when the seeds used different subsets or versions."""
        return [] if self.aa.mixed else self.aa.values

    def paper(self, metric: str) -> float | None:
        return self.claim[metric] if self.claim else None

    def marked(self, cell: Cell) -> Cell:
        """The number marked where the row's runs depart from the authors' protocol (hover: in what)."""
        if not self.departures or cell.text in ("—", ""):
            return cell
        return Cell(f"{cell.text} {protocol_cards.MARK}", cell.cls, departure_title(self.departures))


def departure_title(departures: list[str]) -> str:
    return "departs from the authors' protocol in: " + "; ".join(departures) if departures else ""


def _table1_one(results: Results, index: int, protocol: Protocol, variants: dict[Variant, list[Run]]) -> Table:
    """Table 1 for one protocol: a row per (method, checkpoint), the paper's numbers beside where it has them."""
    with_paper = not reference.paper_table1().query("dataset == @protocol.dataset").empty
    steps = next(iter(variants.values()))[0].pgd_steps
    rows = [
        row
        for variant, runs in variants.items()
        for checkpoint in CHECKPOINTS
        if (row := _table1_row(results, protocol, variant, checkpoint, runs, with_paper, f"PGD-{steps}")) is not None
    ]
    return spec_table(
        f"table1_{protocol.slug()}",
        f"Table 1.{index}: accuracy (%) — {protocol.dataset}, {protocol.model}, eps {protocol.eps}",
        protocol.label(),
        table1_columns(f"PGD-{steps}", with_paper),
        rows,
        _table1_notes(protocol, f"PGD-{steps}", with_paper, steps),
    )


def _table1_row(
    results: Results,
    protocol: Protocol,
    variant: Variant,
    checkpoint: str,
    runs: list[Run],
    with_paper: bool,
    pgd_name: str,
) -> Table1Row | None:
    """One (method, checkpoint) row; None when no run has that checkpoint's numbers."""
    clean = final_values(runs, checkpoint, "clean")
    if not clean:
        return None
    aa = autoattack_values(results, runs, checkpoint, protocol.eps)
    reliability = reliability_cell(
        aa.evaluations or [e for r in runs for e in results.evaluations_of(r.run_id) if e.label == checkpoint]
    )
    return Table1Row(
        variant,
        checkpoint,
        runs,
        sorted({int(r.record["final"][checkpoint]["n"]) for r in runs}),
        clean,
        final_values(runs, checkpoint, "pgd"),
        aa,
        reference.paper_claim(protocol.dataset, variant.defense) if with_paper else None,
        pgd_name,
        protocol_cards.departure_settings(runs),
        reliability,
        _published(results, protocol.dataset, variant) if with_paper else "",
    )


def table1_columns(pgd_name: str, with_paper: bool) -> tuple[Column, ...]:
    """Table 1's columns in order; the paper's columns only where the paper reports this data set."""
    return _method_columns() + _accuracy_columns(pgd_name, with_paper) + _provenance_columns(with_paper)


def _method_columns() -> tuple[Column, ...]:
    return (
        method_column(lambda r: variant_label(r.variant)),
        exported("defense", lambda r: r.variant.format()),
        Column("Checkpoint", "checkpoint", lambda r: r.checkpoint, lambda r: CHECKPOINT_LABELS[r.checkpoint]),
        Column("Seeds", "seeds", lambda r: len(r.runs), lambda r: seed_count_mark(Cell(str(len(r.runs))), len(r.runs))),
        Column(
            "Test n", "test_examples", lambda r: ",".join(map(str, r.n_test)), lambda r: ", ".join(map(str, r.n_test))
        ),
    )


def _accuracy_columns(pgd_name: str, with_paper: bool) -> tuple[Column, ...]:
    """Clean, PGD and AutoAttack over seeds, each with the paper's number and the difference beside it."""
    return (
        Column("Clean", "clean_mean", lambda r: mean_std(r.clean)[0], lambda r: r.marked(fmt_mean_std(r.clean))),
        exported("clean_std", lambda r: mean_std(r.clean)[1]),
        shown("Paper clean", lambda r: Cell(fmt(r.paper("clean"), 1), "claim"), when=with_paper),
        shown("Δ clean", lambda r: diff_cell(r.clean, r.paper("clean")), when=with_paper),
        Column(pgd_name, "pgd_mean", lambda r: _mean(r.pgd), lambda r: r.marked(fmt_mean_std(r.pgd))),
        exported("pgd_std", lambda r: _std(r.pgd)),
        shown("Paper PGD-20", lambda r: Cell(fmt(r.paper("pgd"), 1), "claim"), when=with_paper),
        shown("Δ PGD", _pgd_diff, when=with_paper),
        Column("AutoAttack", "autoattack_mean", lambda r: _mean(r.aa_vals), lambda r: r.marked(_autoattack_cell(r))),
        exported("autoattack_std", lambda r: _std(r.aa_vals)),
        exported("autoattack_seeds", lambda r: len(r.aa_vals)),
        Column(
            "AA n",
            "autoattack_n",
            lambda r: ",".join(map(str, sorted(r.aa.n))),
            lambda r: ", ".join(map(str, sorted(r.aa.n))) or "—",
        ),
        exported("autoattack_version", lambda r: ",".join(sorted(r.aa.attacks))),
        shown("Paper AA", lambda r: Cell(fmt(r.paper("autoattack"), 1), "claim"), when=with_paper),
        shown("Δ AA", lambda r: diff_cell(r.aa_vals, r.paper("autoattack")), when=with_paper),
    )


def _provenance_columns(with_paper: bool) -> tuple[Column, ...]:
    """The paper's numbers in the export, the protocol departures, the reliability badge, RobustBench's numbers."""
    return (
        exported("paper_clean", lambda r: r.paper("clean"), when=with_paper),
        exported("paper_pgd20", lambda r: r.paper("pgd"), when=with_paper),
        exported("paper_autoattack", lambda r: r.paper("autoattack"), when=with_paper),
        Column("Authors' protocol", "protocol_departures", lambda r: "; ".join(r.departures), _departures_cell),
        shown("Reliability", lambda r: r.reliability),
        Column(
            "RobustBench official (clean / AA)",
            "robustbench",
            lambda r: r.published,
            lambda r: Cell(r.published or "—", "claim" if r.published else "muted"),
            when=with_paper,
        ),
    )


def _mean(values: list[float]) -> float | None:
    return mean_std(values)[0] if values else None


def _std(values: list[float]) -> float | None:
    return mean_std(values)[1] if values else None


def _pgd_diff(row: Table1Row) -> Cell:
    """The PGD difference from the paper, only where the runs used the paper's PGD-20."""
    if row.pgd_name != "PGD-20":
        return Cell("n/a", "muted", f"{row.pgd_name} is not PGD-20")
    return diff_cell(row.pgd, row.paper("pgd"))


def _departures_cell(row: Table1Row) -> Cell:
    if not row.departures:
        return Cell("as published", "good")
    return Cell(
        f"{protocol_cards.MARK} {len(row.departures)} setting(s) differ", "muted", departure_title(row.departures)
    )


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


def _autoattack_cell(row: Table1Row) -> Cell:
    """AutoAttack mean over seeds, or why it is not averaged (mixed subsets or versions)."""
    aa = row.aa
    if aa.mixed:
        return Cell(
            "not averaged: mixed " + ", ".join(map(str, sorted(aa.n))) + " examples / " + ", ".join(sorted(aa.attacks))
        )
    aa_cell = fmt_mean_std(row.aa_vals)
    extra = f" ({len(row.aa_vals)} of {len(row.runs)} seeds)" if aa.missing and row.aa_vals else ""
    if aa.attacks and aa.attacks != {"autoattack-standard"}:
        extra += f" [{', '.join(sorted(aa.attacks))}]"
    return Cell(aa_cell.text + extra, aa_cell.cls, aa_cell.title)
