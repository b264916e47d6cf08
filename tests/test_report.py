"""`harness report`: loading and validation, per-protocol aggregation, intervals, verdicts, FLOPs, exports."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import report_fixture as fx
import torch
from click.testing import CliRunner
from scipy import stats as scipy_stats

from harness.cli import main
from harness.core.errors import HarnessError
from harness.reporting import (
    build,
    claims_accuracy,
    claims_cost,
    claims_published,
    compute,
    load_results,
    make_report,
    stats,
    table2,
    tables,
    verdicts,
)
from harness.reporting.loading import eps_key
from harness.reporting.variant import Variant


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    fx.build_results(root)
    return root


@pytest.fixture(scope="module")
def report(results_dir):
    return build(load_results(results_dir))


# ------------------------------------------------------------------------------------- bad input


def test_missing_and_empty_results_dir_exit_2(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["report", "--results", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(main, ["report", "--results", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert empty.exit_code == 2 and "no complete run" in empty.output


def test_only_corrupt_records_is_an_error_naming_them(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "record.json").write_text("[]")
    with pytest.raises(HarnessError, match="bad/record.json"):
        load_results(tmp_path)


def test_corrupt_records_are_named_skipped_and_shown(report, tmp_path):
    problems = report.results.problems
    assert len(problems) == 1 and "broken_run/record.json" in problems[0]
    assert len(report.results.runs) == len(fx.RUNS)
    fx.build_results(tmp_path / "small", runs=fx.RUNS[:1])
    result = CliRunner().invoke(main, ["report", "--results", str(tmp_path / "small"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "broken_run/record.json" in result.output
    assert "broken_run/record.json" in (tmp_path / "r" / "report.html").read_text()


def test_corrupt_evaluation_is_skipped(tmp_path):
    fx.build_results(tmp_path, runs=fx.RUNS[:1], corrupt=False)
    evaluation = next(tmp_path.glob("*/eval/*/evaluation.json"))
    data = json.loads(evaluation.read_text())
    del data["results"]
    evaluation.write_text(json.dumps(data))
    results = load_results(tmp_path)
    assert any("missing field 'results'" in p for p in results.problems)
    assert all(e.source != "harness" for e in results.evaluations)


def test_running_evaluation_is_listed_not_read(tmp_path):
    fx.build_results(tmp_path, runs=fx.RUNS[:1], corrupt=False)
    evaluation = next(tmp_path.glob("*/eval/*/evaluation.json"))
    data = json.loads(evaluation.read_text())
    data.update(status="running", clean_accuracy=None)
    evaluation.write_text(json.dumps(data))
    results = load_results(tmp_path)
    assert results.problems == [] and results.incomplete_evaluations == [str(evaluation)]
    assert all(e.source != "harness" for e in results.evaluations)


def test_null_diagnostics_and_custom_autoattack(tmp_path):
    """A cue the ADES run did not compute is null (contract A); a custom AutoAttack is labelled as such."""
    fx.build_results(tmp_path, runs=(fx.FakeRun("ades", 0, 80, 45, 40),), corrupt=False)
    path = next(tmp_path.glob("*/record.json"))
    record = json.loads(path.read_text())
    record.pop("sha256", None)  # edited by hand: unsealed, as docs/integrity.md says
    for epoch in record["epochs"]:
        epoch["defense"]["spearman"]["mc_variance"] = None
    path.write_text(json.dumps(record))
    evaluation = next(tmp_path.glob("*/eval/*/evaluation.json"))
    data = json.loads(evaluation.read_text())
    data.pop("sha256", None)
    for item in data["results"]:
        item["attack"] = item["attack"].replace("autoattack-standard", "autoattack-custom")
    data.pop("flags_sha256", None)
    evaluation.write_text(json.dumps(data))
    flags = dict(np.load(evaluation.parent / "flags.npz"))  # its flags renamed too, or the report refuses it
    np.savez(
        evaluation.parent / "flags.npz",
        **{k.replace("autoattack-standard", "autoattack-custom"): v for k, v in flags.items()},
    )
    result = build(load_results(tmp_path))
    assert any(f.key.startswith("ades_") for f in result.figures)
    row = result.table1[0].display[0]
    assert "autoattack-custom" in row["AutoAttack"].text


def test_eps_key_equates_spellings():
    assert eps_key("8/255") == eps_key(str(8 / 255)) == eps_key("16/510")
    assert eps_key("0.031") != eps_key("8/255")


# ------------------------------------------------------------------------------------- aggregation


def test_protocols_are_never_averaged(report):
    assert len(report.protocols) == 2
    assert len(report.table1) == 2
    by_dataset = {t.key.split("_")[1]: t.export for t in report.table1}
    cifar = by_dataset["cifar10"].query("defense == 'pgd-at' and checkpoint == 'last'").iloc[0]
    fashion = by_dataset["fashion"].query("defense == 'pgd-at' and checkpoint == 'last'").iloc[0]
    expected = [r.clean for r in fx.RUNS if r.defense == "pgd-at" and r.dataset == "cifar10"]
    assert cifar["seeds"] == 2 and cifar["clean_mean"] == pytest.approx(np.mean(expected))
    assert cifar["clean_std"] == pytest.approx(np.std(expected, ddof=1))
    assert fashion["seeds"] == 1 and fashion["clean_mean"] == pytest.approx(70.0)


def test_table1_claims_autoattack_and_reliability(report):
    table = next(t for t in report.table1 if "cifar10" in t.key)
    ades = table.export.query("defense == 'ades' and checkpoint == 'last'").iloc[0]
    assert ades["paper_clean"] == 85.0 and ades["paper_autoattack"] == 53.3
    aa = [r.autoattack for r in fx.RUNS if r.defense == "ades"]
    assert ades["autoattack_mean"] == pytest.approx(np.mean(aa), abs=0.5)  # flags round to 1/200
    rows = {(r["Method"].text, r["Checkpoint"]): r for r in table.display}
    assert "potentially unreliable" in rows[("ADES", "last")]["Reliability"].text
    assert "checks passed" in rows[("PGD-AT", "last")]["Reliability"].text
    assert "Zhang2019Theoretically" in rows[("TRADES", "last")]["RobustBench official (clean / AA)"].text
    fashion = next(t for t in report.table1 if "fashion" in t.key)
    assert "Paper clean" not in fashion.columns  # the paper has no Fashion-MNIST numbers


def test_mixed_autoattack_subsets_are_not_averaged(tmp_path):
    runs = (fx.FakeRun("pgd-at", 0, 80, 45, 42, aa_n=200), fx.FakeRun("pgd-at", 1, 80, 45, 30, aa_n=100))
    fx.build_results(tmp_path, runs=runs, corrupt=False)
    result = build(load_results(tmp_path))
    row = result.table1[0].export.query("checkpoint == 'last'").iloc[0]
    assert pd.isna(row["autoattack_mean"]) and row["autoattack_n"] == "100,200"


def test_two_configs_of_one_defense_are_separate_variants(tmp_path):
    fx.build_results(tmp_path, runs=fx.RUNS[:1], corrupt=False)
    record = fx.run_record(fx.FakeRun("pgd-at", 5, 10.0, 1.0), tmp_path)
    record["defense"]["config"] = {"steps": 3}
    record["run_id"] += "x"
    fx.write_record(tmp_path / record["run_id"] / "record.json", record)
    groups = tables.group_runs(load_results(tmp_path).runs)
    (variants,) = groups.values()
    assert len(variants) == 2 and all(isinstance(v, Variant) for v in variants)
    assert {v.defense for v in variants} == {"pgd-at"} and all(v.digest for v in variants)
    assert len({v.digest for v in variants}) == 2


def test_table3_ratio_and_floor(report):
    table = next(t for t in report.table3 if "V100" in t.key)
    rows = table.export.set_index("method")
    pgd = [r.epoch_seconds for r in fx.RUNS if r.defense == "pgd-at" and r.dataset == "cifar10"]
    ades = [r.epoch_seconds for r in fx.RUNS if r.defense == "ades"]
    assert rows.loc["ADES", "ratio_to_pgd_at"] == pytest.approx(np.mean(ades) / np.mean(pgd), rel=0.02)
    assert rows.loc["ADES", "ratio_low"] < rows.loc["ADES", "ratio_to_pgd_at"] < rows.loc["ADES", "ratio_high"]
    flops = compute.forward_flops("preact-resnet18", "cifar10")
    assert rows.loc["PGD-AT", "floor_seconds_fp32"] == pytest.approx(flops * 23 * 5000 / 15.7e12)
    assert rows.loc["PGD-AT", "seconds_per_epoch"] == pytest.approx(np.mean(pgd), rel=0.03)
    cpu = next(t for t in report.table3 if "CPU" in t.key)
    assert cpu.export["floor_seconds_fp32"].isna().all()
    assert any("unknown to the harness" in n for n in cpu.notes)


def test_epoch_seconds_count_the_equivalent_epochs_each_pass_made():
    """A full Free-AT pass (m = 8) is 8 equivalent epochs; the quick preset's truncated pass is 3."""

    def run(replays, epochs):
        record = {
            "defense": {"replays": replays},
            "epochs": [{"train_seconds": s, "equivalent_epoch": e} for s, e in epochs],
        }
        return SimpleNamespace(record=record, replays=replays)

    assert tables.epoch_seconds([run(1, [(10.0, 1.0), (12.0, 2.0)])]) == [10.0, 12.0]
    assert tables.epoch_seconds([run(8, [(80.0, 8.0), (40.0, 12.0)])]) == [10.0, 10.0]
    assert tables.epoch_seconds([run(8, [(4.8, 3.0)])]) == [pytest.approx(1.6)]


def test_paper_floor_flags_pgd_at_claim_as_impossible(report):
    rows = report.paper_floor.export.set_index("method")
    assert 115 < rows.loc["PGD-AT", "floor_seconds_tensor"] < 130  # 13.3 GFLOP x 23 x 50k / 125 TFLOP/s
    assert not rows.loc["PGD-AT", "possible"]


# ------------------------------------------------------------------------------------- FLOPs, stats


def test_forward_flops_match_a_hand_count():
    """FlopCounterMode's count equals 2 x multiply-adds of small-cnn's convolutions and linear layers."""
    from harness.core.datasets import DATASETS
    from harness.core.models import build_model

    info = DATASETS.get("synthetic")
    model = build_model("small-cnn", info).eval()
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += 2 * k * output.numel()
        elif isinstance(module, torch.nn.Linear):
            total += 2 * module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(1, info.channels, info.image_size, info.image_size))
    for h in hooks:
        h.remove()
    assert compute.forward_flops("small-cnn", "synthetic") == total
    assert compute.forward_flops("no-such-model", "synthetic") is None


def test_device_peaks():
    assert compute.device_peak("Tesla V100-SXM2-16GB").tensor_tflops == 125.0
    assert compute.device_peak("CPU (x86_64)") is None


def test_welch_interval_matches_scipy():
    """The unpaired fallback of the seed comparison (no shared seeds, no test-set term) is scipy's Welch t."""
    a, b = [50.0, 52.0, 51.0], [47.0, 49.5, 48.0, 46.0]
    est = stats.compare_seeds(dict(enumerate(a)), dict(enumerate(b, start=10)), 0.0, 500, "test").interval()
    ci = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert est.low == pytest.approx(ci.low) and est.high == pytest.approx(ci.high)
    assert stats.compare_seeds({0: 50.0}, dict(enumerate(b, start=10)), 0.0, 500, "test").interval() is None


def test_paired_bootstrap_covers_the_difference_and_narrows():
    rng = np.random.default_rng(1)
    small = stats.paired_bootstrap(rng.random(100) < 0.6, rng.random(100) < 0.5)
    big_a, big_b = rng.random(5000) < 0.6, rng.random(5000) < 0.5
    big = stats.paired_bootstrap(big_a, big_b)
    assert big.interval.low < big.value < big.interval.high
    assert big.interval.low < 10 < big.interval.high  # the true difference: 60% - 50%
    assert (big.interval.high - big.interval.low) < (small.interval.high - small.interval.low)


# ------------------------------------------------------------------------------------- verdicts


def test_verdicts_follow_the_interval(report):
    by_test = {v.test: v for v in report.verdicts}
    pgd_vs_pgdat = verdicts.decide(stats.Estimate(5.0, stats.Interval(2.0, 8.0, "x")))
    assert pgd_vs_pgdat == verdicts.SUPPORTED
    assert verdicts.decide(stats.Estimate(-5.0, stats.Interval(-8.0, -2.0, "x"))) == verdicts.CONTRADICTED
    assert verdicts.decide(stats.Estimate(1.0, stats.Interval(-1.0, 3.0, "x"))) == verdicts.INCONCLUSIVE
    assert verdicts.decide(stats.Estimate(1.0, None, "one seed")) == verdicts.INCONCLUSIVE
    floor = next(v for v in report.verdicts if v.claim == claims_cost.CLAIM_FLOOR)
    assert floor.verdict == verdicts.SUPPORTED
    trades = next(v for v in report.verdicts if v.claim == claims_published.CLAIM_TRADES)
    assert "our AutoAttack" in trades.details[0]  # the external evaluation in the fixture is used
    for v in report.verdicts:
        assert v.verdict in (verdicts.SUPPORTED, verdicts.CONTRADICTED, verdicts.INCONCLUSIVE)
    assert any(t.startswith("ADES − strongest baseline") for t in by_test)


def test_clear_win_is_supported_and_clear_loss_contradicted(tmp_path):
    """Three seeds per side decide; one seed per side (formerly decided by a test-set bootstrap) does not."""
    win = tmp_path / "win"
    fx.build_results(
        win,
        corrupt=False,
        runs=(
            fx.FakeRun("pgd-at", 0, 80, 40, 38),
            fx.FakeRun("pgd-at", 1, 80.5, 40.5, 38.5),
            fx.FakeRun("pgd-at", 2, 79.5, 41, 37.5),
            fx.FakeRun("ades", 0, 85, 55, 50),
            fx.FakeRun("ades", 1, 85.5, 55.5, 50.5),
            fx.FakeRun("ades", 2, 86, 54, 49),
        ),
    )
    result = build(load_results(win))
    beats = [v for v in result.verdicts if v.claim == claims_accuracy.CLAIM_BEATS]
    assert {v.verdict for v in beats} == {verdicts.SUPPORTED}
    lose = tmp_path / "lose"
    fx.build_results(
        lose,
        corrupt=False,
        runs=(
            fx.FakeRun("pgd-at", 0, 85, 55, 50),
            fx.FakeRun("pgd-at", 1, 85.5, 54, 50.5),
            fx.FakeRun("pgd-at", 2, 84, 56, 49),
            fx.FakeRun("ades", 0, 65, 40, 35),
            fx.FakeRun("ades", 1, 66, 41, 36),
            fx.FakeRun("ades", 2, 64.5, 39, 34),
        ),
    )
    result = build(load_results(lose))
    beats = [v for v in result.verdicts if v.claim == claims_accuracy.CLAIM_BEATS]
    assert {v.verdict for v in beats} == {verdicts.CONTRADICTED}
    one = tmp_path / "one"
    fx.build_results(one, corrupt=False, runs=(fx.FakeRun("pgd-at", 0, 85, 55, 50), fx.FakeRun("ades", 0, 65, 40, 35)))
    beats = [v for v in build(load_results(one)).verdicts if v.claim == claims_accuracy.CLAIM_BEATS]
    assert {v.label for v in beats} == {"inconclusive: 1 seed"}
    assert all("bootstrap" in v.interval and "test-set noise only" in v.interval for v in beats)


def test_bilevel_shares_table2_with_the_runs_of_its_training_subset(tmp_path):
    """ADES-bilevel trains on 90% of the subset and uses 10% for phi: same protocol, and Table 2 says so."""
    fx.build_results(
        tmp_path,
        corrupt=False,
        runs=(
            fx.FakeRun("static-des", 0, 80, 45, None),
            fx.FakeRun("ades", 0, 81, 46, None),
            fx.FakeRun("ades-bilevel", 0, 79, 44, None, held_out=500),
        ),
    )
    result = build(load_results(tmp_path))
    [table] = result.table2
    methods = list(table.export["method"])
    assert "ADES-bilevel" in methods and "ADES" in methods and "ADES-bilevel - Static-DES" in methods
    assert "5000 training examples" in table.caption
    assert any("trained the model on 4500 of these examples and held out 500" in n for n in table.notes)
    assert not any(
        "held out" in n
        for n in table2.held_out_notes({"ades": [r for r in result.results.runs if r.defense == "ades"]}, ["ades"])
    )


# ------------------------------------------------------------------------------------- output


def test_exports_and_escaping(tmp_path):
    runs = (fx.FakeRun("pgd-at", 0, 80, 45, 42), fx.FakeRun("<img src=x onerror=alert(1)>", 0, 80, 45, None))
    fx.build_results(tmp_path / "res", runs=runs, corrupt=False)
    html_path, result = make_report(tmp_path / "res", tmp_path / "out")
    html = html_path.read_text()
    assert "<img src=x onerror" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert html.count("data:image/png;base64,") == len(result.figures) >= 2
    for table in result.all_tables:
        csv = tmp_path / "out" / "tables" / f"{table.key}.csv"
        tex = tmp_path / "out" / "tables" / f"{table.key}.tex"
        assert csv.is_file() and tex.read_text().lstrip().startswith("\\begin{table}")
        assert len(pd.read_csv(csv)) == max(len(table.export), 1)
    caption = (tmp_path / "out" / "tables" / f"{result.table1[0].key}.tex").read_text().splitlines()[1]
    assert caption.startswith("\\caption{") and "(\\%)" in caption  # a bare % would start a LaTeX comment
