"""The project's reference numbers (harness/data/) cover every method the paper reports."""

from __future__ import annotations

from harness.core.defense import DEFENSES
from harness.reporting import reference


def test_every_paper_method_has_a_harness_name():
    labels = {reference.method_label(name) for name in DEFENSES.names()}
    assert set(reference.paper_table1()["method"]) <= labels
    assert {
        "Madry2018Towards",
        "Zhang2019Theoretically",
        "Ding2020MMA",
        "Shafahi2019Adversarial",
        "Rice2020Overfitting",
        "Wong2020Fast",
        "Zhang2020Attacks",
        "Wu2020Adversarial",
    } <= set(reference.robustbench()["name"])
