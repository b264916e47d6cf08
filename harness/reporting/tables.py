"""What every report table shares: Cell and Table, grouping runs by protocol and variant, the values a row
reads from the records, and the cell formatting. Each table lives in its own module (table1, table2, table3,
table_robustbench), one table per protocol, never averaged across protocols.

Each table keeps two forms: `export` (numbers, for CSV and LaTeX) and `display` (formatted cells, for HTML), both
derived by `spec_table` from the table's one list of `Column`s, so a column is declared once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from harness.reporting import reference
from harness.reporting.loading import Evaluation, Protocol, Results, Run
from harness.reporting.stats import MIN_SEEDS, mean_std
from harness.reporting.variant import Variant

CHECKPOINTS = ("last", "best")
CHECKPOINT_LABELS = {"last": "last", "best": "best on validation"}


@dataclass(frozen=True)
class Cell:
    text: str
    cls: str = ""  # css class: good, bad, muted, claim
    title: str = ""  # hover text


@dataclass
class Table:
    key: str  # file stem of the CSV / LaTeX export
    title: str
    caption: str
    export: pd.DataFrame
    display: list[dict[str, Any]]  # column -> str or Cell
    notes: list[str] = field(default_factory=list)
    spec: tuple[Column, ...] = ()  # the declared columns both forms were derived from

    @property
    def columns(self) -> list[str]:
        return list(self.display[0]) if self.display else []

    def cells(self) -> list[list[Cell]]:
        return [
            [value if isinstance(value, Cell) else Cell("" if value is None else str(value)) for value in row.values()]
            for row in self.display
        ]


@dataclass(frozen=True)
class Column:
    """One column declared once: its HTML header, its CSV/LaTeX key, and how a row source gives both forms.

    A column shown in one form only has no key (HTML only, e.g. a Δ or a badge) or no header (export only, e.g.
    a std); `when` drops a column a table does not have (the paper's columns off the paper's data sets)."""

    header: str | None
    key: str | None
    value: Callable[[Any], Any] | None = None  # row source -> number or text for the export
    display: Callable[[Any], Any] | None = None  # row source -> str or Cell for the HTML
    when: bool = True


def exported(key: str, value: Callable[[Any], Any], when: bool = True) -> Column:
    """A column of the CSV/LaTeX export only."""
    return Column(None, key, value, None, when)


def shown(header: str, display: Callable[[Any], Any], when: bool = True) -> Column:
    """A column of the HTML only."""
    return Column(header, None, None, display, when)


def method_column(label: Callable[[Any], str]) -> Column:
    """The "Method" column every table starts with: the label in the export, styled as a method in the HTML."""
    return Column("Method", "method", label, lambda r: Cell(label(r), "method"))


def spec_rows(columns: Sequence[Column], sources: Iterable[Any]) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Export frame and display rows of one table, both derived from its column spec."""
    sources, live = list(sources), [c for c in columns if c.when]
    export = pd.DataFrame([{c.key: c.value(s) for c in live if c.key is not None} for s in sources])
    return export, [{c.header: c.display(s) for c in live if c.header is not None} for s in sources]


def spec_table(
    key: str, title: str, caption: str, columns: Sequence[Column], sources: Iterable[Any], notes: list[str]
) -> Table:
    """A table whose export and display both come from `columns`, one row per source."""
    export, display = spec_rows(columns, sources)
    return Table(key, title, caption, export, display, notes, tuple(c for c in columns if c.when))


# ----------------------------------------------------------------------------------------- grouping

Groups = dict[Protocol, dict[Variant, list[Run]]]


def group_runs(runs: Iterable[Run]) -> Groups:
    """protocol -> method variant -> runs (seeds). Two configs of one defense become two variants."""
    by_protocol: dict[Protocol, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        by_protocol[run.protocol][run.defense].append(run)
    groups: Groups = {}
    for protocol in sorted(by_protocol, key=lambda p: p.label()):
        variants: dict[Variant, list[Run]] = {}
        for defense, members in by_protocol[protocol].items():
            digests = sorted({r.config_digest() for r in members})
            for digest in digests:
                chosen = sorted((r for r in members if r.config_digest() == digest), key=lambda r: r.seed)
                variants[Variant(defense, "" if len(digests) == 1 else digest)] = chosen
        groups[protocol] = dict(sorted(variants.items(), key=lambda kv: variant_order(kv[0])))
    return groups


def variant_order(variant: Variant) -> tuple:
    """The paper's method order (reference.METHOD_ORDER), then name and digest."""
    return reference.method_sort_key(variant.defense), variant


def variant_label(variant: Variant) -> str:
    return reference.method_label(variant.defense) + (f" (config {variant.digest})" if variant.digest else "")


# ----------------------------------------------------------------------------------------- values


def final_values(runs: list[Run], checkpoint: str, metric: str) -> list[float]:
    return [
        float(r.record["final"][checkpoint][metric])
        for r in runs
        if isinstance(r.record["final"].get(checkpoint, {}).get(metric), (int, float))
    ]


AUTOATTACK_PREFERENCE = ("autoattack-standard", "autoattack-plus", "autoattack-rand", "autoattack")


def best_evaluation(
    results: Results, run: Run, checkpoint: str, attack: str, eps: str
) -> tuple[Evaluation, dict[str, Any]] | None:
    """The evaluation of this run's checkpoint with `attack` at `eps` on the most test examples;
    for AutoAttack the standard version first, then plus, rand, and any other (e.g. a custom list)."""
    evaluations = [e for e in results.evaluations_of(run.run_id) if e.label == checkpoint]
    for name in AUTOATTACK_PREFERENCE if attack == "autoattack" else (attack,):
        hits = [(e, e.result(name, eps)) for e in evaluations]
        hits = [(e, r) for e, r in hits if r is not None]
        if hits:
            return max(hits, key=lambda h: h[1]["n"])
    return None


@dataclass
class AutoAttackValues:
    values: list[float]
    n: set[int]
    evaluations: list[Evaluation]
    missing: int  # runs without an AutoAttack evaluation
    attacks: set[str] = field(default_factory=set)  # AutoAttack versions used

    @property
    def mixed(self) -> bool:
        """Different subsets or versions across seeds: not averaged."""
        return len(self.n) > 1 or len(self.attacks) > 1


def autoattack_values(results: Results, runs: list[Run], checkpoint: str, eps: str) -> AutoAttackValues:
    out = AutoAttackValues([], set(), [], 0)
    for run in runs:
        hit = best_evaluation(results, run, checkpoint, "autoattack", eps)
        if hit is None:
            out.missing += 1
            continue
        out.values.append(float(hit[1]["robust_accuracy"]))
        out.n.add(int(hit[1]["n"]))
        out.attacks.add(str(hit[1]["attack"]))
        out.evaluations.append(hit[0])
    return out


def reliability_cell(evaluations: list[Evaluation]) -> Cell:
    if not evaluations:
        return Cell("not evaluated", "muted", "no `harness eval` record for this checkpoint")
    failed = [c for e in evaluations for c in e.failed_checks]
    if failed:
        names = ", ".join(sorted({str(c.get("name")) for c in failed}))
        details = "; ".join(f"{c.get('name')}: {c.get('detail', '')}" for c in failed)
        return Cell(f"⚠ potentially unreliable ({names})", "bad", details)
    count = sum(len(e.checks) for e in evaluations)
    if count == 0:
        return Cell("no checks recorded", "muted")
    skipped = sorted({str(c.get("name")) for e in evaluations for c in e.skipped_checks})
    return Cell(
        f"✓ {count} checks passed" + (f", {len(skipped)} skipped" if skipped else ""),
        "good",
        ("not run: " + ", ".join(skipped)) if skipped else "",
    )


def fmt(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


FEW_SEEDS_MARK = "‡"


def seeds_note() -> str:
    return (
        f"{FEW_SEEDS_MARK}: fewer than {MIN_SEEDS} seeds; the number is shown, but no verdict rests on it "
        "(mean ± std over seeds, n = seeds)."
    )


def fmt_mean_std(values: list[float]) -> Cell:
    """mean ± std over seeds with the seed count; fewer than MIN_SEEDS is marked (no verdict rests on it)."""
    if not values:
        return Cell("—")
    mean, std = mean_std(values)
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "") + f" (n={len(values)})"
    return seed_count_mark(Cell(text), len(values))


def seed_count_mark(cell: Cell, seeds: int) -> Cell:
    if seeds >= MIN_SEEDS:
        return cell
    return Cell(
        f"{cell.text} {FEW_SEEDS_MARK}",
        cell.cls or "muted",
        f"{seeds} seed(s): fewer than {MIN_SEEDS}, so no verdict rests on this number",
    )


def diff_cell(measured: list[float], claim: float | None) -> Cell:
    if not measured or claim is None:
        return Cell("—", "muted")
    delta = float(np.mean(measured)) - claim
    return Cell(fmt(delta, signed=True), "good" if delta >= 0 else "bad")


def epoch_seconds(runs: list[Run]) -> list[float]:
    """Training seconds per equivalent epoch, one value per pass of every seed.

    A pass covers the equivalent epochs its SGD steps make (the record's cumulative
    `equivalent_epoch`): 1 for PGD-AT; m for a full Free-AT pass; less when the step budget ends
    a Free-AT pass early (the quick preset's single pass replays 15 of 40 minibatches 8 times: 3).
    """
    return [seconds for r in runs for seconds in _per_equivalent_epoch(r)]


def _per_equivalent_epoch(run: Run) -> list[float]:
    out, done = [], 0.0
    for entry in run.record["epochs"]:
        reached = float(entry.get("equivalent_epoch", done + run.replays))
        out.append(float(entry["train_seconds"]) / (reached - done))
        done = reached
    return out


def external_match(results: Results, dataset: str, name: str) -> Evaluation | None:
    hits = [
        e
        for e in results.external
        if e.data.get("dataset") == dataset
        and (e.name == name or e.name.endswith(f"-{name}") or e.name.endswith(f"/{name}"))
    ]
    return max(hits, key=lambda e: e.data["n"]) if hits else None
