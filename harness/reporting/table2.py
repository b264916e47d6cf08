"""Table 2: the paper's ablation (learned vs static eps fusion) with controls, eps spread and cue correlations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.reporting import reference
from harness.reporting.loading import Protocol, Run
from harness.reporting.stats import mean_std
from harness.reporting.tables import (
    CHECKPOINT_LABELS,
    Cell,
    Column,
    Groups,
    Table,
    diff_cell,
    exported,
    final_values,
    fmt,
    fmt_mean_std,
    seed_count_mark,
    seeds_note,
    shown,
    spec_table,
    variant_label,
)
from harness.reporting.variant import Variant


def last_pass_diagnostics(runs: list[Run]) -> list[dict[str, Any]]:
    """The defense's diagnostics of each seed's last pass (contract A), where it logged eps."""
    out = []
    for run in runs:
        epochs = run.record.get("epochs") or []
        last = (epochs[-1].get("defense") or {}) if epochs else {}
        if isinstance(last.get("eps_std"), (int, float)):
            out.append(last)
    return out


def spread_cell(runs: list[Run]) -> Cell:
    """eps std / (eps_max - eps_min) in the last pass, mean over seeds; flagged when collapsed."""
    diags = last_pass_diagnostics(runs)
    values = [d["eps_std_rel"] for d in diags if isinstance(d.get("eps_std_rel"), (int, float))]
    if not values:
        return Cell("—", "muted", "no per-sample eps in the record")
    warning = next((d["collapse_warning"] for d in diags if d.get("collapse_warning")), None)
    return Cell(
        f"{np.mean(values):.3f}" + (" ⚠" if warning else ""),
        "bad" if warning else "",
        warning or "std of the per-example eps over the last pass, as a share of eps_max - eps_min",
    )


def correlation_cell(runs: list[Run]) -> Cell:
    """Mean within-batch Spearman r(eps, cue) per cue in the last pass (older records: pooled, marked)."""
    diags = last_pass_diagnostics(runs)
    if not diags:
        return Cell("—", "muted")
    pooled_only = "spearman_pooled" not in diags[0]
    parts = []
    for cue, short in (("grad_norm", "g"), ("entropy", "H"), ("mc_variance", "v")):
        values = [d["spearman"][cue] for d in diags if isinstance((d.get("spearman") or {}).get(cue), (int, float))]
        if values:
            parts.append(f"{short} {np.mean(values):+.2f}")
    title = (
        "pooled over the pass (record predates within-batch correlations)"
        if pooled_only
        else "mean of per-batch Spearman r(eps, cue): g grad-norm, H entropy, v head-dropout variance"
    )
    return Cell(" ".join(parts) or "—", "muted" if pooled_only else "", title)


def table2(groups: Groups, checkpoint: str) -> list[Table]:
    """The paper's ablation (learned vs static fusion) plus two controls the paper lacks: PGD-AT (one eps)
    and CAT (dynamic over training, not per sample); with each run's eps spread and cue correlations."""
    tables = []
    for protocol, variants in groups.items():
        scheduled = [v for v in variants if v.defense in reference.TABLE2_ROWS]
        if not scheduled:
            continue
        controls = [v for v in variants if v.defense in reference.TABLE2_CONTROLS]
        compare = protocol.dataset == "cifar10"
        rows = [_scheduler_row(variants[v], v, checkpoint, compare) for v in scheduled + controls]
        tables.append(
            spec_table(
                f"table2_{protocol.slug()}",
                f"Table 2: ablation — {protocol.dataset}, {protocol.model}",
                protocol.label(),
                table2_columns(f"PGD-{variants[scheduled[0]][0].pgd_steps}"),
                rows + _gain_rows(variants, scheduled, controls, checkpoint),
                _table2_notes(protocol, checkpoint, variants, scheduled, controls),
            )
        )
    return tables


@dataclass(frozen=True)
class SchedulerRow:
    """One scheduler's (or control's) row beside the paper's row of the same reading, computed once."""

    variant: Variant
    runs: list[Run]
    clean: list[float]
    pgd: list[float]
    paper_row: str | None  # the paper's Table 2 row; None for a control
    paper_clean: float | None
    paper_pgd: float | None
    compare: bool  # the paper's data set (CIFAR-10): differences are computed

    @property
    def name(self) -> str:
        return variant_label(self.variant)

    @property
    def shown_name(self) -> str:
        return self.name

    def seeds(self) -> int:
        return len(self.runs)

    def seeds_cell(self) -> Cell:
        return seed_count_mark(Cell(str(len(self.runs))), len(self.runs))

    def mean(self, metric: str) -> float | None:
        return mean_std(self.clean if metric == "clean" else self.pgd)[0]

    def std(self, metric: str) -> float | None:
        return mean_std(self.clean if metric == "clean" else self.pgd)[1]

    def accuracy_cell(self, metric: str) -> Cell:
        return fmt_mean_std(self.clean if metric == "clean" else self.pgd)

    def paper(self, metric: str) -> float | None:
        return self.paper_clean if metric == "clean" else self.paper_pgd

    def paper_cell(self, metric: str) -> Cell:
        return Cell(fmt(self.paper(metric), 1), "claim")

    def paper_row_cell(self) -> str | Cell:
        return self.paper_row or Cell("control (not in the paper)", "muted")

    def diff(self, metric: str) -> Cell:
        """Ours minus the paper's, on CIFAR-10 only, and for PGD only where the runs used PGD-20."""
        if not self.compare or (metric == "pgd" and self.runs[0].pgd_steps != 20):
            return Cell("n/a", "muted")
        return diff_cell(self.clean if metric == "clean" else self.pgd, self.paper(metric))

    def spread(self) -> float | None:
        diags = last_pass_diagnostics(self.runs)
        known = diags and all(isinstance(d.get("eps_std_rel"), (int, float)) for d in diags)
        return float(np.mean([d["eps_std_rel"] for d in diags])) if known else None

    def spread_cell(self) -> Cell:
        return spread_cell(self.runs)

    def correlation_cell(self) -> Cell:
        return correlation_cell(self.runs)


def _scheduler_row(runs: list[Run], variant: Variant, checkpoint: str, compare: bool) -> SchedulerRow:
    row_name = reference.TABLE2_ROWS.get(variant.defense)
    claim = reference.paper_table2().set_index("scheduler").loc[row_name] if row_name else None
    return SchedulerRow(
        variant,
        runs,
        final_values(runs, checkpoint, "clean"),
        final_values(runs, checkpoint, "pgd"),
        row_name,
        None if claim is None else float(claim["clean"]),
        None if claim is None else float(claim["pgd20"]),
        compare,
    )


@dataclass(frozen=True)
class GainRow:
    """`variant` minus `base` in mean clean and PGD accuracy, beside the paper's gain where it claims one
    (learned minus static); per-seed columns are empty."""

    variant: Variant
    base: Variant
    gain: dict[str, float]  # clean / pgd -> points
    claimed: dict[str, float] | None  # the paper's gain (clean / pgd20); None: the paper claims none here

    @property
    def name(self) -> str:
        return f"{variant_label(self.variant)} - {variant_label(self.base)}"

    @property
    def shown_name(self) -> str:
        return f"{variant_label(self.variant)} − {variant_label(self.base)}"

    def paper_row_cell(self) -> str | Cell:
        return "MLP − static" if self.claimed else Cell("per-sample − curriculum", "muted")

    def seeds(self) -> float:
        return NO_VALUE

    def mean(self, metric: str) -> float:
        return self.gain[metric]

    def accuracy_cell(self, metric: str) -> str:
        return fmt(self.gain[metric], signed=True)

    def paper(self, metric: str) -> float | None:
        return self.claimed[PAPER_METRIC[metric]] if self.claimed else None

    def paper_cell(self, metric: str) -> Cell:
        return Cell(fmt(self.paper(metric), 1, signed=True) if self.claimed else "—", "claim")

    def std(self, metric: str) -> float:
        return NO_VALUE

    def spread(self) -> float:
        return NO_VALUE

    def seeds_cell(self) -> str:
        return ""

    def diff(self, metric: str) -> str:
        return ""

    def spread_cell(self) -> str:
        return ""

    def correlation_cell(self) -> str:
        return ""


NO_VALUE = math.nan  # a gain row's per-seed export cells: empty, as pandas fills a cell a row lacks
PAPER_METRIC = {"clean": "clean", "pgd": "pgd20"}  # our metric -> the paper's Table 2 column


def table2_columns(pgd_name: str) -> tuple[Column, ...]:
    """Table 2's columns in order, read from a SchedulerRow or a GainRow alike."""
    return (
        Column("Method", "method", lambda r: r.name, lambda r: Cell(r.shown_name, "method")),
        shown("Paper's row", lambda r: r.paper_row_cell()),
        Column("Seeds", "seeds", lambda r: r.seeds(), lambda r: r.seeds_cell()),
        Column("Clean", "clean_mean", lambda r: r.mean("clean"), lambda r: r.accuracy_cell("clean")),
        exported("clean_std", lambda r: r.std("clean")),
        shown("Paper clean (CIFAR-10)", lambda r: r.paper_cell("clean")),
        shown("Δ clean", lambda r: r.diff("clean")),
        Column(pgd_name, "pgd_mean", lambda r: r.mean("pgd"), lambda r: r.accuracy_cell("pgd")),
        exported("pgd_std", lambda r: r.std("pgd")),
        exported("paper_clean", lambda r: r.paper("clean")),
        exported("paper_pgd20", lambda r: r.paper("pgd")),
        shown("Paper PGD-20 (CIFAR-10)", lambda r: r.paper_cell("pgd")),
        shown("Δ PGD", lambda r: r.diff("pgd")),
        Column("eps spread (last pass)", "eps_std_rel_last_pass", lambda r: r.spread(), lambda r: r.spread_cell()),
        shown("r(eps, cue) within batch", lambda r: r.correlation_cell()),
    )


def _gain_rows(
    variants: dict[Variant, list[Run]], scheduled: list[Variant], controls: list[Variant], checkpoint: str
) -> list[GainRow]:
    """Learned minus static (the paper's gain) and per-sample minus curriculum."""
    baselines = [v for v in scheduled if v.defense == "static-des"][:1]
    baselines += [v for v in controls if v.defense == "cat"][:1]
    pairs = [(v, b) for v in scheduled for b in baselines if v != b and v.defense != "static-des"]
    return [_gain_row(variants, variant, base, checkpoint) for variant, base in pairs]


def _gain_row(variants: dict[Variant, list[Run]], variant: Variant, base: Variant, checkpoint: str) -> GainRow:
    gain = {
        m: np.mean(final_values(variants[variant], checkpoint, m))
        - np.mean(final_values(variants[base], checkpoint, m))
        for m in ("clean", "pgd")
    }
    claimed = reference.paper_ablation_gain() if base.defense == "static-des" else None
    return GainRow(variant, base, gain, claimed)


def _table2_notes(
    protocol: Protocol,
    checkpoint: str,
    variants: dict[Variant, list[Run]],
    scheduled: list[Variant],
    controls: list[Variant],
) -> list[str]:
    """The protocol, what each ADES row and control is, and which rows are missing or trained on less."""
    notes = [
        f"Protocol: {protocol.label()}. Checkpoint: {CHECKPOINT_LABELS[checkpoint]}.",
        seeds_note(),
        "ADES maximises the loss at a held mean eps, ADES-joint is the literal joint minimisation, "
        "ADES-bilevel minimises a held-out robust loss after a one-step look-ahead (docs/ades.md); all "
        "are set beside the paper's learnable-MLP row. PGD-AT and CAT are controls the paper lacks.",
        "eps spread: std of the per-example eps over the last training pass / (eps_max − eps_min); "
        "⚠ marks a collapse warning (onto a bound, or onto one value: then the run is PGD-AT). "
        "r(eps, cue): mean of per-batch Spearman coefficients with the gradient norm (g), the softmax "
        "entropy (H) and the head-dropout variance (v: dropout on the penultimate features only).",
    ]
    notes += held_out_notes(variants, scheduled + controls)
    if not any(v.defense == "static-des" for v in scheduled):
        notes.append("No Static-DES run under this protocol: the ablation difference is missing.")
    return notes


def held_out_notes(variants: dict[Variant, list[Run]], shown: list[Variant]) -> list[str]:
    """Say which rows trained the model on less than the protocol's training subset, and why."""
    notes = []
    for variant in shown:
        held = {int(r.record.get("protocol", {}).get("held_out_examples") or 0) for r in variants[variant]}
        if held - {0}:
            trained = sorted({r.record["protocol"]["train_examples"] for r in variants[variant]})
            notes.append(
                f"{variant_label(variant)} trained the model on {'/'.join(map(str, trained))} of these "
                f"examples and held out {'/'.join(map(str, sorted(held)))} for its scheduler's outer "
                "loss (carved from the training subset, not the validation split)."
            )
    return notes
