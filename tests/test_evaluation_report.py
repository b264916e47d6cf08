"""The report shows what the evaluation checked, what failed and what did not run (with the command),
and a RobustBench target evaluated at its published eps fills its AutoAttack cell; `harness export`
writes model_info JSON that robustbench itself reads."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import report_fixture as fx
from click.testing import CliRunner

from harness.cli import main
from harness.core.datasets import DATASETS
from harness.evaluation.checkpoints import RobustBenchName, import_robustbench, published_eps
from harness.evaluation.flags import EvaluationStore
from harness.evaluation.pipeline import sweep_eps
from harness.reporting import build, load_results, render, table_robustbench

# two published model_info JSONs (RobustBench, cifar10/Linf), between them every field the published files use
PUBLISHED_MODEL_INFO = Path(__file__).resolve().parent / "data" / "robustbench_model_info"


def external_evaluation(
    results: Path,
    eps_list: list[Fraction],
    checks: list[dict],
    skipped: list[dict],
    name: str = "cifar10-Linf-Zhang2019Theoretically",
) -> Path:
    import numpy as np

    directory = results / "external" / f"robustbench-{name}" / "eval" / "published-abc"
    store = EvaluationStore.create(
        directory,
        {
            "checkpoint": {
                "source": "robustbench",
                "run_id": None,
                "label": "published",
                "name": name,
                "path": "x",
                "defense": None,
            },
            "dataset": "cifar10",
            "model": "WideResNet",
            "n": 100,
            "test_indices": "0..99",
            "config": {"eps": [str(e) for e in eps_list], "nested_balls": True},
            "environment": {},
        },
    )
    store.set_clean(np.arange(100) < 85)
    for e in eps_list:
        store.add_cell("autoattack-standard", e, np.arange(100) < (85 if e == 0 else 53), 1.0)
    store.finish(checks, skipped)
    return directory


def test_zhang2019_is_evaluated_at_its_published_eps_and_the_report_fills_the_cell(tmp_path):
    eps_list = sweep_eps(
        None,
        DATASETS.get("cifar10").eps_sweep,
        published_eps(RobustBenchName("cifar10", "Linf", "Zhang2019Theoretically")),
    )
    external_evaluation(tmp_path, eps_list, [{"name": "square-probe", "passed": True, "detail": "ok"}], [])
    table = table_robustbench.robustbench_table(load_results(tmp_path))
    row = next(r for r in table.display if str(r["RobustBench model"].text) == "Zhang2019Theoretically")
    assert row["Our AA"] == "53.00 (n=100)"


@pytest.mark.slow
def test_failed_and_skipped_checks_are_shown_with_the_command(tmp_path):
    fx.build_results(tmp_path, corrupt=False)
    command = "harness eval robustbench:cifar10/Linf/Zhang2019Theoretically -a pgd-20 -a autoattack-standard"
    external_evaluation(
        tmp_path,
        [Fraction(0), Fraction(8, 255)],
        [{"name": "square-probe", "passed": False, "detail": "square-200q breaks 40 at 8/255"}],
        [{"name": "pgd20-autoattack-gap", "reason": "needs pgd-20", "needs": ["pgd-20"], "command": command}],
    )
    wong = "harness eval robustbench:cifar10/Linf/Wong2020Fast -a square"  # all passed, one not run
    external_evaluation(
        tmp_path,
        [Fraction(0), Fraction(8, 255)],
        [{"name": "more-steps", "passed": True, "detail": ""}],
        [{"name": "square-vs-white-box", "reason": "needs square", "needs": ["square"], "command": wong}],
        name="cifar10-Linf-Wong2020Fast",
    )
    report = build(load_results(tmp_path))
    html = render.render_html(report)
    assert f"<code>{wong}</code>" in html
    assert "FAILED square-probe: square-200q breaks 40 at 8/255" in html
    assert "not run: pgd20-autoattack-gap" in html and f"<code>{command}</code>" in html
    row = next(r for r in report.evaluations.display if "Zhang" in r["Checkpoint"].text)
    assert row["Not run"].text == "pgd20-autoattack-gap" and "unreliable" in row["Reliability"].text
    assert report.check_details[0].failed  # failed checks are listed first


# --------------------------------------------------------------------------- export


@pytest.mark.slow
def test_export_without_autoattack_says_which_command_to_run(run_dir, data_dir, tmp_path):
    results, run = run_dir.parent, run_dir  # the module's smoke run (conftest)
    out = CliRunner().invoke(
        main, ["export", "--format", "robustbench", "--results", str(results), "--out", str(tmp_path / "mi")]
    )
    assert out.exit_code == 2 and "no run" in out.output
    assert f"harness eval {run} --checkpoint last -a autoattack --eps 0,8/255" in out.output


def test_export_writes_model_info_that_robustbench_reads(run_dir, data_dir, tmp_path):
    utils, *_ = import_robustbench()
    ModelInfo = utils.ModelInfo

    results, run = run_dir.parent, run_dir  # the module's smoke run (conftest)
    runner = CliRunner()
    out = runner.invoke(
        main,
        [
            "eval",
            str(run),
            "--n",
            "24",
            "-a",
            "pgd-20",
            "-a",
            "autoattack-custom",
            "--autoattack-attacks",
            "apgd-ce",
            "--eps",
            "0,8/255",
            "--data-dir",
            str(data_dir),
            "-q",
        ],
    )
    assert out.exit_code == 0, out.output
    out = runner.invoke(
        main, ["export", "--format", "robustbench", "--results", str(results), "--out", str(tmp_path / "mi")]
    )
    assert out.exit_code == 0, out.output
    (path,) = (tmp_path / "mi" / "synthetic" / "Linf").glob("*.json")
    info = json.loads(path.read_text())
    ModelInfo(**info)  # robustbench's own dataclass: an unknown field raises TypeError
    record = json.loads(next(run.glob("eval/last-*/evaluation.json")).read_text())
    aa = next(r for r in record["results"] if r["attack"] == "autoattack-custom" and r["eps"] == "8/255")
    assert info["autoattack_acc"] == f"{aa['robust_accuracy']:.2f}"
    assert info["clean_acc"] == f"{record['clean_accuracy']:.2f}" and info["eps"] == "8/255"
    assert info["architecture"] == "small-cnn" and run.name in info["footnote"] and "pgd-at" in info["footnote"]
    published = set().union(*(json.loads(p.read_text()).keys() for p in PUBLISHED_MODEL_INFO.glob("*.json")))
    assert set(info) <= published  # the published files use the same field names


def test_model_info_has_the_fields_robustbench_ranks_by(tmp_path):
    """robustbench ranks a Linf leaderboard by ACC_FIELDS[Linf] parsed as a float, shows clean_acc, and
    rebuilds ModelInfo from the JSON (a cifar10 run, written by hand)."""
    from harness.evaluation.model_info import model_info

    utils, _, _, ThreatModel = import_robustbench()
    run = {
        "run_id": "cifar10_trades_wrn_seed0_x",
        "spec": {
            "defense": "trades",
            "model": "wrn-34-10",
            "dataset": "cifar10",
            "seed": 0,
            "eps": "8/255",
            "preset": "paper",
            "schedule": {"epochs": 100},
        },
        "environment": {"git": {"commit": "abc", "dirty": False}},
    }
    evaluation = {
        "checkpoint": {"label": "last"},
        "checks": [{"name": "square-probe", "passed": False, "detail": ""}],
        "test_indices": "0..9999",
        "clean_accuracy": 84.9,
        "config": {"attacks": {"autoattack-standard": {"version": "standard"}}},
        "results": [{"attack": "autoattack-standard", "eps": "8/255", "robust_accuracy": 53.1, "n": 10000}],
    }
    item = model_info(run, evaluation, "8/255")
    info = json.loads(json.dumps(item.info))
    utils.ModelInfo(**info)
    acc_field = utils.ACC_FIELDS[ThreatModel("Linf")][-1]
    assert float(info[acc_field]) == 53.1 and float(info["clean_acc"]) == 84.9 and "reported" not in info
    assert "Potentially unreliable: failed checks square-probe" in info["footnote"] and item.warnings
    assert model_info(run, {**evaluation, "results": []}, "8/255") is None
