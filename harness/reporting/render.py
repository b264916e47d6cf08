"""Assemble tables, figures and verdicts into one self-contained HTML file (jinja2, autoescaped)
plus every table as CSV and LaTeX."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import pandas as pd

from harness.reporting import (
    claims,
    reference,
    reliability,
    table1,
    table2,
    table3,
    table_robustbench,
    tables,
    verdicts,
)
from harness.reporting.figures import Figure, all_figures
from harness.reporting.loading import Results
from harness.reporting.protocol_cards import ProtocolCard, protocol_cards
from harness.reporting.tables import Table
from harness.storage.atomic import atomic_write

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
TEMPLATE_NAME = "report.html"


@dataclass
class Report:
    results: Results
    checkpoint: str
    table1: list[Table]
    table2: list[Table]
    table3: list[Table]
    paper_floor: Table
    robustbench: Table
    evaluations: Table | None
    check_details: list[reliability.EvaluationChecks]
    figures: list[Figure]
    missing: list[str]
    verdicts: list[verdicts.Verdict]
    protocols: list[str]
    protocol_cards: list[ProtocolCard] = field(default_factory=list)

    @property
    def verdict_groups(self) -> list[tuple[str, list[verdicts.Verdict]]]:
        """Verdicts grouped by claim, in the order of docs/paper.md's list."""
        groups: dict[str, list[verdicts.Verdict]] = {}
        for verdict in self.verdicts:
            groups.setdefault(verdict.claim, []).append(verdict)
        return list(groups.items())

    @property
    def all_tables(self) -> list[Table]:
        extra = [self.evaluations] if self.evaluations else []
        return self.table1 + self.table2 + self.table3 + [self.paper_floor, self.robustbench] + extra


def build(results: Results, checkpoint: str = "last") -> Report:
    groups = tables.group_runs(results.runs)
    figures, missing = all_figures(results, groups, checkpoint)
    present = {v.defense for variants in groups.values() for v in variants}
    expected = list(reference.PAPER_BASELINES) + list(reference.ADES_VARIANTS)
    absent = [reference.method_label(m) for m in expected if m not in present]
    if absent:
        missing.insert(0, "methods with no complete run: " + ", ".join(absent))
    if not results.evaluations:
        missing.insert(
            0,
            "no `harness eval` records: AutoAttack columns, the eps curve, reliability badges and "
            "bootstrap intervals for single-seed runs are unavailable",
        )
    return Report(
        results=results,
        checkpoint=checkpoint,
        table1=table1.table1(results, groups),
        table2=table2.table2(groups, checkpoint),
        table3=table3.table3(groups),
        paper_floor=table3.paper_floor_table(),
        robustbench=table_robustbench.robustbench_table(results),
        evaluations=reliability.evaluations_table(results),
        check_details=reliability.check_details(results),
        figures=figures,
        missing=missing,
        verdicts=claims.all_verdicts(results, groups, checkpoint),
        protocols=[p.label() for p in groups],
        protocol_cards=protocol_cards(results),
    )


def render_html(report: Report) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    counts = {
        name: sum(v.verdict == name for v in report.verdicts)
        for name in (verdicts.SUPPORTED, verdicts.CONTRADICTED, verdicts.INCONCLUSIVE)
    }
    return env.get_template(TEMPLATE_NAME).render(
        report=report,
        results=report.results,
        counts=counts,
        generated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def export_table(table: Table, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, tex_path = folder / f"{table.key}.csv", folder / f"{table.key}.tex"
    frame = table.export if not table.export.empty else pd.DataFrame({"note": ["no rows"]})
    atomic_write(csv_path, lambda f: f.write(frame.to_csv(index=False, float_format="%.4f").encode()))
    latex = frame.to_latex(
        index=False,
        float_format="%.2f",
        na_rep="--",
        escape=True,
        caption=latex_escape(table.title),
        label=f"tab:{table.key}",
    )
    atomic_write(tex_path, lambda f: f.write(latex.encode()))
    return [csv_path, tex_path]


def export_verdicts(items: list[verdicts.Verdict], path: Path) -> None:
    """The verdict table as CSV: claim, seeds per side, difference, interval, P(A>B), resolution, seeds needed."""
    frame = pd.DataFrame(
        [
            {
                "claim": v.claim,
                "measured": v.test,
                "seeds": v.seeds,
                "difference": v.measured,
                "interval": v.interval,
                "verdict": v.label,
                "p_a_gt_b": v.prob,
                "resolves": v.resolvable,
                "seeds_needed": v.needed,
                "warning": v.warning,
            }
            for v in items
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(frame.to_csv(index=False).encode()))


def write(report: Report, out_dir: Path) -> Path:
    """report.html and tables/*.csv, *.tex under `out_dir`; returns the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for table in report.all_tables:
        export_table(table, out_dir / "tables")
    export_verdicts(report.verdicts, out_dir / "tables" / "verdicts.csv")
    html_path = out_dir / "report.html"
    html = render_html(report)
    atomic_write(html_path, lambda f: f.write(html.encode("utf-8")))
    return html_path
