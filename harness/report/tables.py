"""Tables 1-3 and the RobustBench comparison, one table per protocol, never averaged across protocols.

Each table keeps two forms: `export` (numbers, for CSV and LaTeX) and `display` (formatted cells, for HTML).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pandas as pd

from harness.resources import CONTENTION_CORES, contended

from harness.report import compute, protocol_cards, reference
from harness.report.loading import Evaluation, Protocol, Results, Run
from harness.report.stats import MIN_SEEDS, bootstrap_ratio, mean_std
from harness.report.variant import Variant, defense_of

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

    @property
    def columns(self) -> list[str]:
        return list(self.display[0]) if self.display else []

    def cells(self) -> list[list[Cell]]:
        return [[value if isinstance(value, Cell) else Cell("" if value is None else str(value))
                 for value in row.values()] for row in self.display]


# ----------------------------------------------------------------------------------------- grouping

Groups = dict[Protocol, dict[str, list[Run]]]


def group_runs(runs: Iterable[Run]) -> Groups:
    """protocol -> method variant -> runs (seeds). Two configs of one defense become two variants."""
    by_protocol: dict[Protocol, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        by_protocol[run.protocol][run.defense].append(run)
    groups: Groups = {}
    for protocol in sorted(by_protocol, key=lambda p: p.label()):
        variants: dict[str, list[Run]] = {}
        for defense, members in by_protocol[protocol].items():
            digests = sorted({r.config_digest() for r in members})
            for digest in digests:
                chosen = sorted((r for r in members if r.config_digest() == digest), key=lambda r: r.seed)
                variants[Variant(defense, "" if len(digests) == 1 else digest).format()] = chosen
        groups[protocol] = dict(sorted(variants.items(), key=lambda kv: reference.method_sort_key(kv[0])))
    return groups


def variant_label(variant: str) -> str:
    parsed = Variant.parse(variant)
    return reference.method_label(parsed.defense) + (f" (config {parsed.digest})" if parsed.digest else "")


# ----------------------------------------------------------------------------------------- values

def final_values(runs: list[Run], checkpoint: str, metric: str) -> list[float]:
    return [float(r.record["final"][checkpoint][metric]) for r in runs
            if isinstance(r.record["final"].get(checkpoint, {}).get(metric), (int, float))]


AUTOATTACK_PREFERENCE = ("autoattack-standard", "autoattack-plus", "autoattack-rand", "autoattack")


def best_evaluation(results: Results, run: Run, checkpoint: str, attack: str, eps: str
                    ) -> tuple[Evaluation, dict[str, Any]] | None:
    """The evaluation of this run's checkpoint with `attack` at `eps` on the most test examples;
    for AutoAttack the standard version first, then plus, rand, and any other (e.g. a custom list)."""
    evaluations = [e for e in results.evaluations_of(run.run_id) if e.label == checkpoint]
    for name in (AUTOATTACK_PREFERENCE if attack == "autoattack" else (attack,)):
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
    return Cell(f"✓ {count} checks passed" + (f", {len(skipped)} skipped" if skipped else ""), "good",
                ("not run: " + ", ".join(skipped)) if skipped else "")


def fmt(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


FEW_SEEDS_MARK = "‡"


def seeds_note() -> str:
    return (f"{FEW_SEEDS_MARK}: fewer than {MIN_SEEDS} seeds; the number is shown, but no verdict rests on it "
            "(mean ± std over seeds, n = seeds).")


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
    return Cell(f"{cell.text} {FEW_SEEDS_MARK}", cell.cls or "muted",
                f"{seeds} seed(s): fewer than {MIN_SEEDS}, so no verdict rests on this number")


def diff_cell(measured: list[float], claim: float | None) -> Cell:
    if not measured or claim is None:
        return Cell("—", "muted")
    delta = float(np.mean(measured)) - claim
    return Cell(fmt(delta, signed=True), "good" if delta >= 0 else "bad")


# ----------------------------------------------------------------------------------------- Table 1

def _published(results: Results, dataset: str, defense: str) -> str:
    """RobustBench's numbers for the official checkpoints of this baseline, and ours where evaluated."""
    table = reference.robustbench()
    hits = table[(table["dataset"] == dataset) & (table["harness_method"] == defense_of(defense))]
    parts = []
    for _, r in hits.iterrows():
        text = f"{r['name']}: {r['clean']} / {r['autoattack']} ({r['architecture']}, eps {r['eps']}" + (
            f"; {r['note']})" if r.get("note") else ")")
        ours = external_match(results, dataset, r["name"])
        if ours is not None:
            aa = next((ours.result(a, r["eps"]) for a in AUTOATTACK_PREFERENCE if ours.result(a, r["eps"])), None)
            text += (f"; ours {float(ours.data['clean_accuracy']):.2f} / "
                     + (f"{float(aa['robust_accuracy']):.2f} (n={aa['n']})" if aa else "no AutoAttack"))
        parts.append(text)
    return "; ".join(parts)


def table1(results: Results, groups: Groups) -> list[Table]:
    tables = []
    for index, (protocol, variants) in enumerate(groups.items(), 1):
        with_paper = not reference.paper_table1().query("dataset == @protocol.dataset").empty
        steps = next(iter(variants.values()))[0].pgd_steps
        pgd_name = f"PGD-{steps}"
        export_rows, display_rows = [], []
        for variant, runs in variants.items():
            claim = reference.paper_claim(protocol.dataset, variant) if with_paper else None
            for checkpoint in CHECKPOINTS:
                clean = final_values(runs, checkpoint, "clean")
                pgd = final_values(runs, checkpoint, "pgd")
                if not clean:
                    continue
                n_test = sorted({int(r.record["final"][checkpoint]["n"]) for r in runs})
                aa = autoattack_values(results, runs, checkpoint, protocol.eps)
                aa_mixed = aa.mixed
                aa_vals = [] if aa_mixed else aa.values
                row_export = {
                    "method": variant_label(variant), "defense": variant, "checkpoint": checkpoint,
                    "seeds": len(runs), "test_examples": ",".join(map(str, n_test)),
                    "clean_mean": mean_std(clean)[0], "clean_std": mean_std(clean)[1],
                    "pgd_mean": mean_std(pgd)[0] if pgd else None, "pgd_std": mean_std(pgd)[1] if pgd else None,
                    "autoattack_mean": mean_std(aa_vals)[0] if aa_vals else None,
                    "autoattack_std": mean_std(aa_vals)[1] if aa_vals else None,
                    "autoattack_seeds": len(aa_vals), "autoattack_n": ",".join(map(str, sorted(aa.n))),
                    "autoattack_version": ",".join(sorted(aa.attacks)),
                }
                aa_cell = fmt_mean_std(aa_vals)
                if aa_mixed:
                    aa_cell = Cell("not averaged: mixed " + ", ".join(map(str, sorted(aa.n))) + " examples / "
                                   + ", ".join(sorted(aa.attacks)))
                else:
                    extra = f" ({len(aa_vals)} of {len(runs)} seeds)" if aa.missing and aa_vals else ""
                    if aa.attacks and aa.attacks != {"autoattack-standard"}:
                        extra += f" [{', '.join(sorted(aa.attacks))}]"
                    aa_cell = Cell(aa_cell.text + extra, aa_cell.cls, aa_cell.title)
                row = {
                    "Method": Cell(variant_label(variant), "method"),
                    "Checkpoint": CHECKPOINT_LABELS[checkpoint], "Seeds": seed_count_mark(Cell(str(len(runs))), len(runs)),
                    "Test n": ", ".join(map(str, n_test)),
                    "Clean": fmt_mean_std(clean),
                }
                if with_paper:
                    row["Paper clean"] = Cell(fmt(claim and claim["clean"], 1), "claim")
                    row["Δ clean"] = diff_cell(clean, claim and claim["clean"])
                row[pgd_name] = fmt_mean_std(pgd)
                if with_paper:
                    row["Paper PGD-20"] = Cell(fmt(claim and claim["pgd"], 1), "claim")
                    row["Δ PGD"] = diff_cell(pgd, claim and claim["pgd"]) if steps == 20 else Cell(
                        "n/a", "muted", f"{pgd_name} is not PGD-20")
                row["AutoAttack"] = aa_cell
                row["AA n"] = ", ".join(map(str, sorted(aa.n))) or "—"
                if with_paper:
                    row["Paper AA"] = Cell(fmt(claim and claim["autoattack"], 1), "claim")
                    row["Δ AA"] = diff_cell(aa_vals, claim and claim["autoattack"])
                    row_export.update(paper_clean=claim and claim["clean"], paper_pgd20=claim and claim["pgd"],
                                      paper_autoattack=claim and claim["autoattack"])
                _mark_departures(row, row_export, runs, (pgd_name, "Clean", "AutoAttack"))
                row["Reliability"] = reliability_cell(aa.evaluations or [
                    e for r in runs for e in results.evaluations_of(r.run_id) if e.label == checkpoint])
                published = _published(results, protocol.dataset, variant) if with_paper else ""
                if with_paper:
                    row["RobustBench official (clean / AA)"] = Cell(published or "—", "claim" if published else "muted")
                    row_export["robustbench"] = published
                export_rows.append(row_export)
                display_rows.append(row)
        notes = [f"Protocol: {protocol.label()}.", seeds_note(),
                 f"{protocol_cards.MARK}: the row's runs depart from the method's published protocol (hover the "
                 f"number; the protocol cards list every setting).",
                 f"Clean and {pgd_name} from the run records (test examples {protocol.test_indices}); AutoAttack "
                 f"from `harness eval` records at eps {protocol.eps}, with its own test-example count (AA n)."]
        if not with_paper:
            notes.append(f"The paper reports CIFAR-10/100 only; its numbers are not compared with {protocol.dataset}.")
        elif steps != 20:
            notes.append(f"The runs were evaluated with {pgd_name}, not the paper's PGD-20: that difference is "
                         f"not computed.")
        tables.append(Table(f"table1_{protocol.slug()}", f"Table 1.{index}: accuracy (%) — {protocol.dataset}, "
                            f"{protocol.model}, eps {protocol.eps}", protocol.label(),
                            pd.DataFrame(export_rows), display_rows, notes))
    return tables


def _mark_departures(row: dict[str, Any], row_export: dict[str, Any], runs: list[Run],
                     columns: tuple[str, ...]) -> None:
    """Mark the row's numbers when its runs depart from the authors' protocol, and say in what."""
    departures = protocol_cards.departure_settings(runs)
    row_export["protocol_departures"] = "; ".join(departures)
    title = "departs from the authors' protocol in: " + "; ".join(departures) if departures else ""
    for column in columns:
        value = row.get(column)
        text = value.text if isinstance(value, Cell) else str(value)
        if departures and text not in ("—", ""):
            row[column] = Cell(f"{text} {protocol_cards.MARK}", getattr(value, "cls", ""), title)
    row["Authors' protocol"] = (Cell(f"{protocol_cards.MARK} {len(departures)} setting(s) differ", "muted", title)
                                if departures else Cell("as published", "good"))


# ----------------------------------------------------------------------------------------- Table 2

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
    return Cell(f"{np.mean(values):.3f}" + (" ⚠" if warning else ""), "bad" if warning else "",
                warning or "std of the per-example eps over the last pass, as a share of eps_max - eps_min")


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
    title = ("pooled over the pass (record predates within-batch correlations)" if pooled_only else
             "mean of per-batch Spearman r(eps, cue): g grad-norm, H entropy, v head-dropout variance")
    return Cell(" ".join(parts) or "—", "muted" if pooled_only else "", title)


def table2(groups: Groups, checkpoint: str) -> list[Table]:
    """The paper's ablation (learned vs static fusion) plus two controls the paper lacks: PGD-AT (one eps)
    and CAT (dynamic over training, not per sample); with each run's eps spread and cue correlations."""
    paper = reference.paper_table2().set_index("scheduler")
    claimed_gain = reference.paper_ablation_gain()  # learned minus static, the paper's Table 2
    tables = []
    for protocol, variants in groups.items():
        scheduled = [v for v in variants if defense_of(v) in reference.TABLE2_ROWS]
        if not scheduled:
            continue
        controls = [v for v in variants if defense_of(v) in reference.TABLE2_CONTROLS]
        compare = protocol.dataset == "cifar10"
        export_rows, display_rows = [], []
        for variant in scheduled + controls:
            runs = variants[variant]
            clean, pgd = final_values(runs, checkpoint, "clean"), final_values(runs, checkpoint, "pgd")
            row_name = reference.TABLE2_ROWS.get(defense_of(variant))
            claim = paper.loc[row_name] if row_name else None
            claim_clean = None if claim is None else float(claim["clean"])
            claim_pgd = None if claim is None else float(claim["pgd20"])
            diags = last_pass_diagnostics(runs)
            export_rows.append({"method": variant_label(variant), "seeds": len(runs),
                                "clean_mean": mean_std(clean)[0], "clean_std": mean_std(clean)[1],
                                "pgd_mean": mean_std(pgd)[0], "pgd_std": mean_std(pgd)[1],
                                "paper_clean": claim_clean, "paper_pgd20": claim_pgd,
                                "eps_std_rel_last_pass": float(np.mean([d["eps_std_rel"] for d in diags]))
                                if diags and all(isinstance(d.get("eps_std_rel"), (int, float)) for d in diags)
                                else None})
            display_rows.append({
                "Method": Cell(variant_label(variant), "method"),
                "Paper's row": row_name or Cell("control (not in the paper)", "muted"),
                "Seeds": seed_count_mark(Cell(str(len(runs))), len(runs)),
                "Clean": fmt_mean_std(clean), "Paper clean (CIFAR-10)": Cell(fmt(claim_clean, 1), "claim"),
                "Δ clean": diff_cell(clean, claim_clean) if compare else Cell("n/a", "muted"),
                f"PGD-{runs[0].pgd_steps}": fmt_mean_std(pgd),
                "Paper PGD-20 (CIFAR-10)": Cell(fmt(claim_pgd, 1), "claim"),
                "Δ PGD": diff_cell(pgd, claim_pgd) if compare and runs[0].pgd_steps == 20
                else Cell("n/a", "muted"),
                "eps spread (last pass)": spread_cell(runs), "r(eps, cue) within batch": correlation_cell(runs),
            })
        baselines = [v for v in scheduled if defense_of(v) == "static-des"][:1] + \
            [v for v in controls if defense_of(v) == "cat"][:1]
        for variant in scheduled:
            for base in baselines:
                if variant == base or defense_of(variant) == "static-des":
                    continue
                gain = {m: np.mean(final_values(variants[variant], checkpoint, m))
                        - np.mean(final_values(variants[base], checkpoint, m)) for m in ("clean", "pgd")}
                paper_gain = defense_of(base) == "static-des"
                display_rows.append({
                    "Method": Cell(f"{variant_label(variant)} − {variant_label(base)}", "method"),
                    "Paper's row": "MLP − static" if paper_gain else Cell("per-sample − curriculum", "muted"),
                    "Seeds": "", "Clean": fmt(gain["clean"], signed=True),
                    "Paper clean (CIFAR-10)": Cell(fmt(claimed_gain["clean"], 1, signed=True) if paper_gain else "—", "claim"), "Δ clean": "",
                    f"PGD-{variants[variant][0].pgd_steps}": fmt(gain["pgd"], signed=True),
                    "Paper PGD-20 (CIFAR-10)": Cell(fmt(claimed_gain["pgd20"], 1, signed=True) if paper_gain else "—", "claim"), "Δ PGD": "",
                    "eps spread (last pass)": "", "r(eps, cue) within batch": "",
                })
                export_rows.append({"method": f"{variant_label(variant)} - {variant_label(base)}",
                                    "clean_mean": gain["clean"], "pgd_mean": gain["pgd"],
                                    "paper_clean": claimed_gain["clean"] if paper_gain else None,
                                    "paper_pgd20": claimed_gain["pgd20"] if paper_gain else None})
        notes = [f"Protocol: {protocol.label()}. Checkpoint: {CHECKPOINT_LABELS[checkpoint]}.", seeds_note(),
                 "ADES maximises the loss at a held mean eps, ADES-joint is the literal joint minimisation, "
                 "ADES-bilevel minimises a held-out robust loss after a one-step look-ahead (docs/ades.md); all "
                 "are set beside the paper's learnable-MLP row. PGD-AT and CAT are controls the paper lacks.",
                 "eps spread: std of the per-example eps over the last training pass / (eps_max − eps_min); "
                 "⚠ marks a collapse warning (onto a bound, or onto one value: then the run is PGD-AT). "
                 "r(eps, cue): mean of per-batch Spearman coefficients with the gradient norm (g), the softmax "
                 "entropy (H) and the head-dropout variance (v: dropout on the penultimate features only)."]
        notes += held_out_notes(variants, scheduled + controls)
        if not any(defense_of(v) == "static-des" for v in scheduled):
            notes.append("No Static-DES run under this protocol: the ablation difference is missing.")
        tables.append(Table(f"table2_{protocol.slug()}", f"Table 2: ablation — {protocol.dataset}, {protocol.model}",
                            protocol.label(), pd.DataFrame(export_rows), display_rows, notes))
    return tables


def held_out_notes(variants: dict[str, list[Run]], shown: list[str]) -> list[str]:
    """Say which rows trained the model on less than the protocol's training subset, and why."""
    notes = []
    for variant in shown:
        held = {int(r.record.get("protocol", {}).get("held_out_examples") or 0) for r in variants[variant]}
        if held - {0}:
            trained = sorted({r.record["protocol"]["train_examples"] for r in variants[variant]})
            notes.append(f"{variant_label(variant)} trained the model on {'/'.join(map(str, trained))} of these "
                         f"examples and held out {'/'.join(map(str, sorted(held)))} for its scheduler's outer "
                         "loss (carved from the training subset, not the validation split).")
    return notes


# ----------------------------------------------------------------------------------------- Table 3

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


def table3(groups: Groups) -> list[Table]:
    tables = []
    for protocol, variants in groups.items():
        by_device: dict[str, dict[str, list[Run]]] = defaultdict(dict)
        for variant, runs in variants.items():
            for device in sorted({r.device for r in runs}):
                by_device[device][variant] = [r for r in runs if r.device == device]
        for device, members in by_device.items():
            tables.append(_table3_one(protocol, device, members))
    return tables


def _table3_one(protocol: Protocol, device: str, variants: dict[str, list[Run]]) -> Table:
    peak = compute.device_peak(device)
    first = next(iter(variants.values()))[0]
    flops = compute.forward_flops(first.spec["model"], protocol.dataset)
    examples = protocol.train_examples
    variants = {v: runs for v, runs in variants.items() if epoch_seconds(runs)}  # a record without epochs: no time
    baseline = variants.get("pgd-at")
    paper_pgd = reference.paper_seconds("pgd-at")
    export_rows, display_rows = [], []
    for variant, runs in variants.items():
        seconds = epoch_seconds(runs)
        ratio = bootstrap_ratio(seconds, epoch_seconds(baseline)) if baseline and variant != "pgd-at" else None
        paper_s = reference.paper_seconds(variant)
        cost = compute.step_cost(variant, runs[0].record["defense"].get("config"))
        floors = {}
        if peak and flops and cost and examples:
            floors = {kind: compute.floor_seconds(flops, cost.forward_equivalents, examples, tflops)
                      for kind, tflops in (("fp32", peak.fp32_tflops), ("tensor", peak.tensor_tflops))}
        mean, std = mean_std(seconds)
        export_rows.append({
            "method": variant_label(variant), "seconds_per_epoch": mean, "seconds_std": std,
            "epochs_timed": len(seconds), "seeds": len({r.seed for r in runs}), "ratio_to_pgd_at": ratio.value if ratio else None,
            "ratio_low": ratio.interval.low if ratio and ratio.interval else None,
            "ratio_high": ratio.interval.high if ratio and ratio.interval else None,
            "paper_seconds": paper_s, "paper_ratio": paper_s / paper_pgd if paper_s else None, "device": device,
            "forward_equivalents": cost.forward_equivalents if cost else None, "forward_flops": flops,
            "floor_seconds_fp32": floors.get("fp32"), "floor_seconds_tensor": floors.get("tensor")})
        ratio_text = "—"
        if variant == "pgd-at":
            ratio_text = "×1.00 (reference)"
        elif ratio:
            ratio_text = f"×{ratio.value:.2f}" + (f" [{ratio.interval.low:.2f}, {ratio.interval.high:.2f}]"
                                                  if ratio.interval else "")
        display_rows.append({
            "Method": Cell(variant_label(variant), "method"),
            "s / epoch": f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else ""),
            "Seeds": seed_count_mark(Cell(str(len({r.seed for r in runs}))), len({r.seed for r in runs})),
            "Epochs timed": str(len(seconds)), "× PGD-AT [95%]": Cell(ratio_text, title=ratio.interval.method
                                                                      if ratio and ratio.interval else ""),
            "Paper s / epoch (V100)": Cell(fmt(paper_s, 0), "claim"),
            "Paper ×": Cell(f"×{paper_s / paper_pgd:.2f}" if paper_s else "—", "claim"),
            "Fwd-equiv / example": Cell(fmt(cost.forward_equivalents, 0) if cost else "?",
                                        title=cost.assumption if cost else "no cost model for this method"),
            "Floor s (fp32 peak)": fmt(floors.get("fp32")) if floors else "—",
            "Floor s (fp16 tensor peak)": fmt(floors.get("tensor")) if floors else "—",
        })
    notes = [f"Protocol: {protocol.label()}. Device: {device}.",
             "Seconds are training time per equivalent epoch (a pass's time over the epochs of SGD steps it made; "
             "Free-AT: a full pass / m) from the same runs' records, "
             "averaged over every epoch of every seed; validation is excluded.", seeds_note()]
    notes.append(f"Forward FLOPs of {first.spec['model']} on one {protocol.dataset} input: "
                 + (f"{flops / 1e9:.4g} GFLOP (FlopCounterMode)." if flops else "unknown (model not registered)."))
    if peak is None:
        notes.append(f"Peak FLOP/s of “{device}” is unknown to the harness (known: "
                     + ", ".join(p.match for p in compute.DEVICE_PEAKS) + "), so no floor is computed for it.")
    else:
        notes.append(f"{peak.match} peak: {peak.fp32_tflops} TFLOP/s fp32, {peak.tensor_tflops} TFLOP/s dense "
                     f"fp16/bf16 tensor ({peak.source}).")
    if baseline is None:
        notes.append("No PGD-AT run on this device under this protocol: ratios are missing.")
    busy = sorted({variant_label(v) for v, runs in variants.items() for r in runs
                   for entry in r.record["epochs"] if contended(entry.get("resources"))})
    if busy:
        notes.append("Timed on a busy machine (other processes kept more than "
                     f"{CONTENTION_CORES} CPU cores busy): {', '.join(busy)}; their seconds and ratios "
                     "are shown but carry no verdict.")
    notes.extend(sorted({f"{variant_label(v)}: {c.assumption}." for v, runs in variants.items()
                         if (c := compute.step_cost(v, runs[0].record["defense"].get("config")))}))
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_")
    return Table(f"table3_{protocol.slug()}_{slug}", f"Table 3: cost per epoch — {protocol.dataset}, "
                 f"{protocol.model}, {device}", protocol.label(), pd.DataFrame(export_rows), display_rows, notes)


PAPER_SETTING = {"model": "wrn-34-10", "dataset": "cifar10", "examples": 50000, "device": "Tesla V100"}


def paper_floor_table() -> Table:
    """The paper's Table 3 against what a V100 can compute for WRN-34-10 on CIFAR-10."""
    flops = compute.forward_flops(PAPER_SETTING["model"], PAPER_SETTING["dataset"])
    peak = compute.device_peak(PAPER_SETTING["device"])
    table = reference.paper_table3()
    name_of = {v: k for k, v in reference.PAPER_ROW.items() if k not in ("ades-joint", "ades-bilevel")}
    export_rows, display_rows = [], []
    for _, row in table.iterrows():
        defense = name_of.get(row["method"], row["method"])
        cost = compute.step_cost(defense)
        fp32 = compute.floor_seconds(flops, cost.forward_equivalents, PAPER_SETTING["examples"], peak.fp32_tflops)
        tensor = compute.floor_seconds(flops, cost.forward_equivalents, PAPER_SETTING["examples"], peak.tensor_tflops)
        possible = float(row["seconds_per_epoch"]) >= tensor
        export_rows.append({"method": row["method"], "paper_seconds": float(row["seconds_per_epoch"]),
                            "forward_equivalents": cost.forward_equivalents, "floor_seconds_fp32": fp32,
                            "floor_seconds_tensor": tensor, "possible": possible})
        display_rows.append({
            "Method": Cell(row["method"], "method"), "Paper s / epoch": Cell(f"{row['seconds_per_epoch']:.0f}", "claim"),
            "Fwd-equiv / example": Cell(f"{cost.forward_equivalents:.0f}", title=cost.assumption),
            "Floor s (fp32, 15.7 TFLOP/s)": f"{fp32:.0f}", "Floor s (fp16 tensor, 125 TFLOP/s)": f"{tensor:.0f}",
            "Physically possible?": Cell("yes" if possible else "no: below the floor", "good" if possible else "bad"),
        })
    notes = [f"WRN-34-10 forward on one 32×32 input: {flops / 1e9:.2f} GFLOP (measured with FlopCounterMode); "
             f"{PAPER_SETTING['examples']:,} training examples per epoch; V100 peaks from {peak.source}.",
             "The floor assumes every FLOP runs at the device's peak with no data loading, memory traffic or "
             "kernel overhead: real epochs take longer."]
    return Table("table3_paper_floor", "Table 3b: the paper's timings against the V100 compute floor",
                 "CIFAR-10, WRN-34-10, V100", pd.DataFrame(export_rows), display_rows, notes)


# ----------------------------------------------------------------------------------------- RobustBench

def external_match(results: Results, dataset: str, name: str) -> Evaluation | None:
    hits = [e for e in results.external if e.data.get("dataset") == dataset
            and (e.name == name or e.name.endswith(f"-{name}") or e.name.endswith(f"/{name}"))]
    return max(hits, key=lambda e: e.data["n"]) if hits else None


def robustbench_table(results: Results) -> Table:
    table = reference.robustbench()
    export_rows, display_rows = [], []
    for _, row in table.iterrows():
        ours = external_match(results, row["dataset"], row["name"])
        aa = next((ours.result(a, row["eps"]) for a in AUTOATTACK_PREFERENCE if ours.result(a, row["eps"])),
                  None) if ours else None
        clean_ours = float(ours.data["clean_accuracy"]) if ours else None
        aa_ours = float(aa["robust_accuracy"]) if aa else None
        method = reference.method_label(row["harness_method"]) if row["harness_method"] else "—"
        export_rows.append({"dataset": row["dataset"], "name": row["name"], "architecture": row["architecture"],
                            "eps": row["eps"], "harness_method": row["harness_method"],
                            "published_clean": float(row["clean"]), "published_autoattack": float(row["autoattack"]),
                            "ours_clean": clean_ours, "ours_autoattack": aa_ours,
                            "ours_n": aa["n"] if aa else (ours.data["n"] if ours else None)})
        ours_aa_text = "—"
        if ours and aa:
            ours_aa_text = f"{aa_ours:.2f} (n={aa['n']})"
        elif ours:
            ours_aa_text = f"no AutoAttack at eps {row['eps']}"
        display_rows.append({
            "Data set": row["dataset"], "RobustBench model": Cell(row["name"], "method", row["note"]),
            "Method": method, "Architecture": row["architecture"], "eps": row["eps"],
            "Published clean": Cell(f"{float(row['clean']):.2f}", "claim"),
            "Published AA": Cell(f"{float(row['autoattack']):.2f}", "claim"),
            "Our clean": fmt(clean_ours), "Our AA": ours_aa_text,
            "Δ AA (ours − published)": diff_cell([aa_ours], float(row["autoattack"])) if aa_ours is not None
            else Cell("—", "muted"),
            "Reliability": reliability_cell([ours]) if ours else Cell("not evaluated", "muted",
                                                                      "run `harness eval robustbench:...`"),
        })
    notes = ["Published numbers: RobustBench model_info (Linf leaderboard), copied into harness/data/robustbench.csv.",
             "“Our” columns come from `harness eval` records under results/external/ (same attack code as our runs).",
             "Zhang2019Theoretically was evaluated at eps 0.031 (≈7.9/255), the others at 8/255."]
    return Table("robustbench", "Official checkpoints: RobustBench's published numbers and ours",
                 "RobustBench Linf", pd.DataFrame(export_rows), display_rows, notes)
