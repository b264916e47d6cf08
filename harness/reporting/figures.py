"""Figures as base64 PNG, drawn with matplotlib's object API on the Agg canvas (no pyplot state).

Each function returns a `Figure`, or None when the records hold nothing to draw; the report says
what is missing instead.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure

from harness.reporting import reference
from harness.reporting.loading import Protocol, Results, Run, eps_key
from harness.reporting.tables import Groups, variant_label
from harness.reporting.variant import Variant

DPI = 110
CUES = ("grad_norm", "entropy", "mc_variance")


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    caption: str
    png_base64: str

    @property
    def src(self) -> str:
        return f"data:image/png;base64,{self.png_base64}"


def eps_scale(protocol: Protocol) -> tuple[float, str]:
    """Plot eps in units of 1/255 where the protocol's eps is a multiple of 1/255 (CIFAR), else as is."""
    if Fraction(protocol.eps).denominator in (1, 3, 5, 15, 17, 51, 85, 255):
        return 255.0, "eps (× 1/255)"
    return 1.0, "eps"


def _encode(fig: MplFigure) -> str:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _color(variant: Variant):
    palette = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    ]
    return palette[reference.method_sort_key(variant.defense)[0] % len(palette)]


def eps_curve(
    results: Results, protocol: Protocol, variants: dict[Variant, list[Run]], checkpoint: str, index: int
) -> Figure | None:
    """PGD-20 accuracy against eps for every method (the paper's section 5.4), from `harness eval`."""
    fig = MplFigure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    scale, unit = eps_scale(protocol)
    drawn = 0
    for variant, runs in variants.items():
        per_eps: dict[str, list[float]] = {}
        for run in runs:
            for evaluation in results.evaluations_of(run.run_id):
                if evaluation.label != checkpoint:
                    continue
                for item in evaluation.data["results"]:
                    if item["attack"] == "pgd-20":
                        per_eps.setdefault(eps_key(item["eps"]), []).append(float(item["robust_accuracy"]))
        if len(per_eps) < 2:
            continue
        budgets = sorted(per_eps, key=lambda e: Fraction(e))
        x = [float(Fraction(e)) * scale for e in budgets]
        mean = [np.mean(per_eps[e]) for e in budgets]
        seeds = max(len(per_eps[e]) for e in budgets)
        ax.plot(x, mean, marker="o", label=f"{variant_label(variant)} (n={seeds})", color=_color(variant))
        seed_spread(ax, x, [per_eps[e] for e in budgets], _color(variant))
        drawn += 1
    if not drawn:
        return None
    ax.axvline(float(Fraction(protocol.eps)) * scale, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(unit)
    ax.set_ylabel("PGD-20 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return Figure(
        f"eps_curve_{index}",
        f"PGD-20 accuracy against eps — {protocol.dataset}, {protocol.model}",
        f"{protocol.label()}; checkpoint {checkpoint}; line: mean over seeds (n in the legend); "
        f"points: each seed; band: the seeds' range; dotted line: training eps.",
        _encode(fig),
    )


def seed_spread(ax, x: list[float], values: list[list[float]], color: str) -> None:
    """Each seed as a point and the seeds' range as a band, so training noise is seen, not averaged away."""
    for xi, ys in zip(x, values):
        ax.scatter([xi] * len(ys), ys, s=10, color=color, alpha=0.6, linewidths=0)
    if any(len(ys) > 1 for ys in values):
        ax.fill_between(x, [min(ys) for ys in values], [max(ys) for ys in values], color=color, alpha=0.12)


def _epoch_values(runs: list[Run], section: str, key: str) -> dict[float, list[float]]:
    """equivalent epoch -> one value per seed."""
    by_epoch: dict[float, list[float]] = {}
    for run in runs:
        for entry in run.record["epochs"]:
            value = entry.get(section, {}).get(key)
            if isinstance(value, (int, float)):
                by_epoch.setdefault(float(entry.get("equivalent_epoch", entry.get("pass", 0))), []).append(value)
    return by_epoch


def _epoch_series(runs: list[Run], section: str, key: str) -> tuple[list[float], list[float]]:
    by_epoch = _epoch_values(runs, section, key)
    xs = sorted(by_epoch)
    return xs, [float(np.mean(by_epoch[x])) for x in xs]


def training_curves(protocol: Protocol, variants: dict[Variant, list[Run]], index: int) -> Figure | None:
    panels = (
        ("train", "loss", "training loss", 1),
        ("train", "adv_acc", "training adversarial accuracy (%)", 100),
        ("val", "clean", "validation clean accuracy (%)", 1),
        ("val", "pgd", "validation PGD accuracy (%)", 1),
    )
    fig = MplFigure(figsize=(10, 6.4), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    drawn = 0
    for ax, (section, key, title, scale) in zip(axes, panels):
        for variant, runs in variants.items():
            xs, ys = _epoch_series(runs, section, key)
            if xs:
                ax.plot(
                    xs,
                    np.asarray(ys) * scale,
                    marker="o",
                    markersize=3,
                    label=variant_label(variant),
                    color=_color(variant),
                )
                per_seed = _epoch_values(runs, section, key)
                seed_spread(ax, xs, [[v * scale for v in per_seed[x]] for x in xs], _color(variant))
                drawn += 1
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("equivalent epoch")
        ax.grid(alpha=0.3)
    if not drawn:
        return None
    axes[0].legend(fontsize=8)
    return Figure(
        f"training_{index}",
        f"Training curves — {protocol.dataset}, {protocol.model}",
        f"{protocol.label()}; line: mean over seeds per epoch; points: each seed; band: the seeds' range.",
        _encode(fig),
    )


def _number(value) -> float:
    """A diagnostic value, or NaN (a gap in the line) when the record holds none or null."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def cue_labels(mc_mode: str | None) -> dict[str, str]:
    """What each cue is, in words: `mc_variance` in head mode is dropout on the penultimate features only."""
    variance = {"head": "head-dropout variance", "full": "MC-dropout variance (full model)"}
    return {
        "grad_norm": "input-gradient norm",
        "entropy": "softmax entropy",
        "mc_variance": variance.get(mc_mode or "", "MC-dropout variance"),
    }


def ades_diagnostics(protocol: Protocol, variant: Variant, runs: list[Run], index: int) -> Figure | None:
    """eps distribution per epoch and the eps-cue rank correlations (contract A diagnostics)."""
    run = runs[0]
    entries = [(e.get("equivalent_epoch", e.get("pass")), e.get("defense") or {}) for e in run.record["epochs"]]
    entries = [(x, d) for x, d in entries if isinstance(d.get("eps_mean"), (int, float))]
    if not entries:
        return None
    fig = MplFigure(figsize=(11, 3.8), layout="constrained")
    ax_band, ax_hist, ax_cue = fig.subplots(1, 3)
    _plot_eps_band(ax_band, protocol, entries)
    _plot_eps_histogram(ax_hist, protocol, entries)
    _plot_cue_correlations(ax_cue, run, entries)
    for ax in (ax_band, ax_hist, ax_cue):
        ax.grid(alpha=0.3)
    return Figure(
        f"ades_{index}_{variant.slug()}",
        f"{variant_label(variant)}: eps distribution and cues — {protocol.dataset}, {protocol.model}",
        _ades_caption(variant, run, entries),
        _encode(fig),
    )


DiagnosticEntries = list[tuple[Any, dict[str, Any]]]  # (equivalent epoch, the pass's contract A diagnostics)


def _plot_eps_band(ax, protocol: Protocol, entries: DiagnosticEntries) -> None:
    xs = [x for x, _ in entries]
    scale, unit = eps_scale(protocol)

    def series(key):
        return np.asarray([_number(d.get(key)) for _, d in entries]) * scale

    ax.fill_between(xs, series("eps_p05"), series("eps_p95"), alpha=0.25, label="5–95th percentile")
    ax.plot(xs, series("eps_p50"), marker="o", markersize=3, label="median")
    ax.plot(xs, series("eps_mean"), linestyle="--", label="mean")
    ax.axhline(float(Fraction(protocol.eps)) * scale, color="grey", linestyle=":", linewidth=1)
    ax.set_title("per-example eps over training", fontsize=10)
    ax.set_xlabel("equivalent epoch")
    ax.set_ylabel(unit)
    ax.legend(fontsize=7)


def _plot_eps_histogram(ax, protocol: Protocol, entries: DiagnosticEntries) -> None:
    scale, unit = eps_scale(protocol)
    last = entries[-1][1].get("eps_hist") or {}
    edges, counts = last.get("edges"), last.get("counts")
    if edges and counts and len(edges) == len(counts) + 1:
        edges_ = np.asarray(edges, float) * scale
        ax.stairs(np.asarray(counts, float), edges_, fill=True, alpha=0.6)
    ax.set_title(f"eps histogram, epoch {entries[-1][0]}", fontsize=10)
    ax.set_xlabel(unit)


def _plot_cue_correlations(ax, run: Run, entries: DiagnosticEntries) -> None:
    xs = [x for x, _ in entries]
    labels = cue_labels((run.record.get("defense") or {}).get("mc_mode"))
    for cue in CUES:
        ys = [_number((d.get("spearman") or {}).get(cue)) for _, d in entries]
        ax.plot(xs, ys, marker="o", markersize=3, label=labels[cue])
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_ylim(-1.05, 1.05)
    pooled_only = "spearman_pooled" not in entries[-1][1]
    ax.set_title(
        "Spearman r(eps, cue), " + ("pooled over the pass (older record)" if pooled_only else "mean within batch"),
        fontsize=10,
    )
    ax.set_xlabel("equivalent epoch")
    ax.legend(fontsize=7)


def _ades_caption(variant: Variant, run: Run, entries: DiagnosticEntries) -> str:
    warnings = sorted({str(d["collapse_warning"]) for _, d in entries if d.get("collapse_warning")})
    caption = f"{variant_label(variant)}, run {run.run_id} (seed {run.seed}). "
    spread = [_number(d.get("eps_std_rel")) for _, d in entries]
    if not all(np.isnan(spread)):
        caption += (
            "Spread (eps std / (eps_max − eps_min)) per pass: "
            + ", ".join("—" if np.isnan(v) else f"{v:.3f}" for v in spread)
            + ". "
        )
    if warnings:
        caption += "Collapse warning: " + "; ".join(warnings)
    return caption


def all_figures(results: Results, groups: Groups, checkpoint: str) -> tuple[list[Figure], list[str]]:
    """Every figure the records allow, and a sentence for each one that could not be drawn."""
    figures, missing = [], []
    for index, (protocol, variants) in enumerate(groups.items(), 1):
        curve = eps_curve(results, protocol, variants, checkpoint, index)
        if curve:
            figures.append(curve)
        else:
            missing.append(
                f"PGD-20 vs eps for {protocol.dataset}/{protocol.model}: no `harness eval` records with "
                f"an eps sweep for checkpoint '{checkpoint}' (run `harness eval` on these runs)"
            )
        curves = training_curves(protocol, variants, index)
        if curves:
            figures.append(curves)
        for variant, runs in variants.items():
            if variant.defense in ("ades", "ades-joint", "ades-bilevel", "static-des"):
                diag = ades_diagnostics(protocol, variant, runs, index)
                if diag:
                    figures.append(diag)
                else:
                    missing.append(
                        f"eps diagnostics of {variant_label(variant)} ({protocol.dataset}): the records "
                        f"hold no per-epoch eps statistics"
                    )
    return figures, missing
