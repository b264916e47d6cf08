"""The project's reference numbers (harness/data/) agree with the shared reference files they copy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from harness.report import reference

ROOT = Path(__file__).resolve().parent.parent


def _shared() -> Path | None:
    candidates = [os.environ.get("HARNESS_SHARED"), ROOT.parent / "shared", ROOT.parent.parent / "shared"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "reference").is_dir():
            return Path(candidate) / "reference"
    return None


SHARED = _shared()
needs_shared = pytest.mark.skipif(SHARED is None, reason="../shared/reference is not present")


@needs_shared
@pytest.mark.parametrize("name", ["paper_claims.csv", "paper_table2.csv", "paper_table3.csv"])
def test_paper_tables_match_shared(name):
    ours = pd.read_csv(reference.DATA_DIR / name)
    theirs = pd.read_csv(SHARED / name)
    pd.testing.assert_frame_equal(ours, theirs)


@needs_shared
def test_robustbench_numbers_match_model_info():
    table = reference.robustbench()
    assert len(table) >= 8
    for _, row in table.iterrows():
        info = json.loads((SHARED / "robustbench" / "model_info" / row["dataset"] / row["threat"]
                           / f"{row['name']}.json").read_text())
        assert (row["architecture"], row["eps"]) == (info["architecture"], info["eps"])
        assert float(row["clean"]) == float(info["clean_acc"])
        assert float(row["autoattack"]) == float(info["autoattack_acc"])


def test_every_paper_method_has_a_harness_name():
    labels = set(reference.METHOD_LABELS.values())
    assert set(reference.paper_table1()["method"]) <= labels
    assert {"Madry2018Towards", "Zhang2019Theoretically", "Ding2020MMA", "Shafahi2019Adversarial",
            "Rice2020Overfitting", "Wong2020Fast", "Zhang2020Attacks", "Wu2020Adversarial"} <= set(
        reference.robustbench()["name"])
