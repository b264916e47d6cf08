"""Reference numbers the report compares against, from the project's own data files.

harness/data/paper_claims.csv   the paper's Table 1 (clean, PGD-20, AutoAttack; CIFAR-10/100, WRN-34-10)
harness/data/paper_table2.csv   the paper's ablation (static fusion vs learnable MLP, CIFAR-10)
harness/data/paper_table3.csv   the paper's seconds per epoch on a V100 (CIFAR-10, WRN-34-10)
harness/data/paper_text_claims.csv  numbers the paper states in its text only (the ×1.12 cost ratio)
harness/data/robustbench.csv    RobustBench's published clean / AutoAttack accuracy of the official
                                checkpoints of the baselines (model_info JSONs, Linf)

The files are the project's own copies of the published numbers (tests/test_report_reference.py checks
their shape and that every paper row has a harness defense), so the report needs nothing outside the package.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pandas as pd

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

# the paper's row a harness defense is compared with; `ades-joint` is the literal reading of the
# paper's joint objective, `ades` the non-degenerate one: both are compared with the paper's ADES row
PAPER_ROW: dict[str, str] = {
    "pgd-at": "PGD-AT",
    "trades": "TRADES",
    "mma": "MMA",
    "free-at": "Free-AT",
    "static-des": "Static-DES",
    "ades": "ADES",
    "ades-joint": "ADES",
    "ades-bilevel": "ADES",
}
PAPER_BASELINES = ("pgd-at", "trades", "mma", "free-at", "static-des")
ADES_VARIANTS = ("ades", "ades-joint", "ades-bilevel")
# the paper's Table 2 rows by scheduler
TABLE2_ROWS = {
    "static-des": "Static Weighted Fusion",
    "ades": "Learnable MLP (ADES)",
    "ades-joint": "Learnable MLP (ADES)",
    "ades-bilevel": "Learnable MLP (ADES)",
}
# Table 2's controls, not in the paper: a fixed eps (PGD-AT) and a schedule dynamic over training but
# the same for every example (CAT), so "per-sample" and "dynamic" can be told apart
TABLE2_CONTROLS = ("pgd-at", "cat")
METHOD_ORDER = (
    "pgd-at",
    "trades",
    "mma",
    "free-at",
    "static-des",
    "ades",
    "ades-joint",
    "ades-bilevel",
    "iaat",
    "fat",
    "mart",
    "cat",
)


def method_label(name: str) -> str:
    """The label a defense declares (`Defense.label`, in methods/<name>.py); an unregistered name as is."""
    from harness.core.defense import DEFENSES

    return DEFENSES.get(name).label if name in DEFENSES else name


def method_sort_key(defense: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(defense) if defense in METHOD_ORDER else len(METHOD_ORDER), defense)


@cache
def _read(name: str) -> pd.DataFrame:
    return pd.read_csv(DATA_DIR / name, dtype={"eps": str})


def paper_table1() -> pd.DataFrame:
    """dataset, method (paper label), clean, pgd20, autoattack."""
    return _read("paper_claims.csv").copy()


def paper_table2() -> pd.DataFrame:
    return _read("paper_table2.csv").copy()


def paper_table3() -> pd.DataFrame:
    return _read("paper_table3.csv").copy()


ABLATION_ROWS = ("Learnable MLP (ADES)", "Static Weighted Fusion")  # (learned, static) rows of paper_table2.csv


def paper_ablation_gain() -> dict[str, float]:
    """The paper's learned-minus-static gain of Table 2 (clean and pgd20, points), from its two rows."""
    table = paper_table2().set_index("scheduler")
    learned, static = (table.loc[row] for row in ABLATION_ROWS)
    return {metric: round(float(learned[metric]) - float(static[metric]), 1) for metric in ("clean", "pgd20")}


def paper_text_claim(claim: str) -> float:
    """A number the paper states in its text (harness/data/paper_text_claims.csv)."""
    return float(_read("paper_text_claims.csv").set_index("claim").loc[claim, "value"])


def robustbench() -> pd.DataFrame:
    """dataset, threat, name, architecture, eps, clean, autoattack, reported, harness_method, note."""
    frame = _read("robustbench.csv").copy()
    frame["harness_method"] = frame["harness_method"].fillna("")
    frame["note"] = frame["note"].fillna("")
    return frame


def paper_claim(dataset: str, defense: str) -> dict[str, float] | None:
    """The paper's Table 1 numbers for the row a harness defense corresponds to, on that data set."""
    row_name = PAPER_ROW.get(defense)
    if row_name is None:
        return None
    table = paper_table1()
    hit = table[(table["dataset"] == dataset) & (table["method"] == row_name)]
    if hit.empty:
        return None
    row = hit.iloc[0]
    return {"clean": float(row["clean"]), "pgd": float(row["pgd20"]), "autoattack": float(row["autoattack"])}


def paper_seconds(defense: str) -> float | None:
    row_name = PAPER_ROW.get(defense)
    table = paper_table3()
    hit = table[table["method"] == row_name]
    return None if hit.empty else float(hit.iloc[0]["seconds_per_epoch"])
