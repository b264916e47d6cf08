"""Grid files: the shipped grids load, every bad key is named, and `run --grid` reruns to completion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.core.defense import DEFENSES
from harness.core.errors import HarnessError
from harness.scale.grid import load_grid, parse_grid

GRIDS = Path(__file__).resolve().parent.parent / "grids"
VALID = {"preset": "smoke", "methods": ["pgd-at", "trades"], "datasets": ["synthetic"], "seeds": [0, 1]}


def test_the_paper_grid_is_the_papers_protocol():
    grid = load_grid(GRIDS / "paper.toml")
    specs = grid.specs()
    assert len(specs) == 7 * 2 * 3 and len({s.run_id for s in specs}) == len(specs)
    assert set(grid.methods) == {"ades", "ades-joint", "static-des", "pgd-at", "trades", "mma", "free-at"}
    assert set(grid.datasets) == {"cifar10", "cifar100"} and grid.seeds == (0, 1, 2)
    for spec in specs:
        assert spec.preset == "paper" and spec.model == "wrn-34-10" and spec.schedule.epochs == 100
        assert spec.schedule.batch_size == 128 and spec.schedule.lr == 0.1 and str(spec.eps) == "8/255"


def test_every_shipped_grid_loads():
    for path in GRIDS.glob("*.toml"):
        assert load_grid(path).specs(), path
    assert load_grid(GRIDS / "quick.toml").methods == tuple(DEFENSES.names())


def test_grid_expands_in_order_with_options_and_overrides():
    grid = parse_grid(
        {
            **VALID,
            "epochs": 2,
            "eps": "4/255",
            "dropout": 0.1,
            "model": "small-cnn",
            "overrides": {"trades": {"beta": 3, "attack_bn": "eval"}},
        }
    )
    specs = grid.specs()
    assert [(s.defense, s.seed) for s in specs] == [("pgd-at", 0), ("pgd-at", 1), ("trades", 0), ("trades", 1)]
    assert all(s.schedule.epochs == 2 and str(s.eps) == "4/255" and s.dropout == 0.1 for s in specs)
    assert specs[2].defense_config.beta == 3.0 and specs[2].defense_config.attack_bn == "eval"
    assert specs[0].defense_config == DEFENSES.get("pgd-at").Config()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seed": [0]}, "grid: seed: unknown key; did you mean 'seeds'?"),
        ({"preset": None}, "grid: missing key 'preset'"),
        ({"preset": "slow"}, "grid: preset: unknown preset 'slow'"),
        ({"methods": ["pgd-at", "trade"]}, "grid: methods: unknown defense 'trade'; did you mean 'trades'"),
        ({"methods": "pgd-at"}, 'grid: methods: must be a list of defense names or "all"'),
        ({"methods": []}, "grid: methods: must be"),
        ({"datasets": ["mnist"]}, "grid: datasets: unknown data set 'mnist'"),
        ({"seeds": [0, 0]}, "grid: seeds: lists 0 more than once"),
        ({"seeds": [True]}, "grid: seeds: must be a non-empty list of non-negative integers"),
        ({"seeds": [-1]}, "grid: seeds: must be"),
        ({"epochs": 0}, "grid: epochs: must be a positive integer"),
        ({"eps": "2"}, "grid: eps: eps 2 is outside [0, 1]"),
        ({"model": "vgg"}, "grid: model: unknown model 'vgg'"),
        ({"dropout": 1.5}, "grid: dropout: must be a number in [0, 1)"),
        ({"overrides": {"mart": {"beta": 6}}}, "grid: overrides.mart: 'mart' is not one of the grid's methods"),
        ({"overrides": {"trades": {"betta": 6}}}, "grid: overrides.trades.betta: TRADES"),
        ({"overrides": {"trades": {"beta": "x"}}}, "grid: overrides.trades.beta: cannot set beta=x"),
        ({"overrides": {"trades": {"beta": {"a": 1}}}}, "grid: overrides.trades.beta: must be a number"),
        ({"overrides": {"trades": 6}}, "grid: overrides.trades: must be a table"),
    ],
)
def test_errors_name_the_bad_key(change, message):
    data = {k: v for k, v in {**VALID, **change}.items() if v is not None}
    with pytest.raises(HarnessError) as caught:
        parse_grid(data).specs()
    assert str(caught.value).startswith(message), str(caught.value)


def test_unreadable_or_invalid_file(tmp_path):
    with pytest.raises(HarnessError, match="cannot read the grid file"):
        load_grid(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('preset = "smoke"\nmethods = [pgd-at]\n')
    with pytest.raises(HarnessError, match=r"bad.toml: not valid TOML: .*line 2"):
        load_grid(bad)


def test_a_grid_file_that_is_not_utf8_is_one_line_and_writes_nothing(tmp_path, data_dir):
    """Issue 22: a binary file passed as --grid was a UnicodeDecodeError traceback."""
    grid = tmp_path / "grid.toml"
    grid.write_bytes(b'preset = "smoke"\n\xff\xfe methods = ["pgd-at"]\n')
    result = CliRunner().invoke(
        main,
        ["run", "--grid", str(grid), "-q", "--data-dir", str(data_dir), "--results", str(tmp_path / "r")],
        catch_exceptions=False,
    )
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: {grid}: not a text grid file (byte 0xff at offset 17 is not UTF-8); is it the TOML file?"
    ), result.output
    assert not (tmp_path / "r").exists()


def test_a_run_that_fails_its_defense_check_names_method_data_set_and_seed():
    grid = parse_grid({**VALID, "methods": ["ades"], "overrides": {"ades": {"mc_mode": "full"}}})
    with pytest.raises(HarnessError, match=r"^grid: ades on synthetic, seed 0: .*dropout"):
        grid.specs()


def test_grid_on_the_command_line_conflicts_and_reruns(tmp_path, data_dir):
    grid = tmp_path / "grid.toml"
    grid.write_text('preset = "smoke"\nmethods = ["pgd-at"]\ndatasets = ["synthetic"]\nseeds = [3]\n')

    def invoke(*args):
        command = ["run", "--grid", str(grid), "-q", "--data-dir", str(data_dir), "--results", str(tmp_path / "r")]
        return CliRunner().invoke(main, [*command, *args], catch_exceptions=False)

    clash = invoke("-m", "trades", "--seed", "1")
    assert clash.exit_code == 2 and clash.output.strip() == (
        f"error: --grid {grid} says which runs to do; drop --method, --seed (or write it into the grid file)"
    )
    assert invoke().exit_code == 0
    record_path = next((tmp_path / "r").glob("*/record.json"))
    complete = json.loads(record_path.read_text())
    interrupted = {k: v for k, v in complete.items() if k not in ("sha256", "checkpoint_sha256")}
    record_path.write_text(json.dumps({**interrupted, "status": "running", "final": {}}))  # as if interrupted
    rerun = invoke()  # no --resume needed: a grid is rerun until complete
    assert rerun.exit_code == 0, rerun.output
    again = json.loads(record_path.read_text())
    assert again["status"] == "complete" and again["final"]["last"] == {
        **complete["final"]["last"],
        "seconds": again["final"]["last"]["seconds"],
    }


def test_a_local_grid_with_a_failing_run_finishes_and_summarises(tmp_path, data_dir, monkeypatch):
    """A bug in one run (not a HarnessError) and a run held by another process: the others still run,
    the summary names each with its reason once, the exit status is 2, and `runs --grid` shows the state."""
    from harness.storage.locks import hold
    from harness.training import faults

    grid = tmp_path / "grid.toml"
    grid.write_text('preset = "smoke"\nmethods = ["pgd-at"]\ndatasets = ["synthetic"]\nseeds = [0, 1, 2]\n')
    results = tmp_path / "r"
    args = ["--results", str(results)]
    run_ids = [s.run_id for s in load_grid(grid).specs()]
    before = CliRunner().invoke(main, ["runs", "--grid", str(grid), *args, "--csv"], catch_exceptions=False)
    assert before.exit_code == 0 and before.output.count(",not started,") == 3, before.output

    reached, seen = faults.reached, []

    def bug_in_the_second_run(point: str) -> None:  # seed 1 crashes after training, its record still "running"
        seen.append(point)
        if point == "final-evaluation" and seen.count(point) == 2:
            raise RuntimeError("injected bug")
        reached(point)

    monkeypatch.setattr(faults, "reached", bug_in_the_second_run)
    with hold(results / run_ids[2], what=f"run {run_ids[2]}"):  # seed 2: another process trains it
        first = CliRunner().invoke(main, ["run", "--grid", str(grid), "-q", "--data-dir", str(data_dir), *args])
        during = CliRunner().invoke(main, ["runs", "--grid", str(grid), *args], catch_exceptions=False)
    monkeypatch.setattr(faults, "reached", reached)
    lines = first.output.splitlines()
    assert first.exit_code == 2, first.output
    assert "summary: 3 runs: 1 done, 1 failed, 1 still running in another process" in lines
    assert "  failed   pgd-at/synthetic/seed1: RuntimeError: injected bug" in lines
    assert any(
        line.startswith("  running  pgd-at/synthetic/seed2: run ") and "in use by another" in line for line in lines
    )
    # the reason once in the summary; the traceback (a bug's only trace) ends in it too
    assert [line for line in lines if line.endswith("RuntimeError: injected bug")] == [
        "[pgd-at/synthetic/seed1] RuntimeError: injected bug",
        "  failed   pgd-at/synthetic/seed1: RuntimeError: injected bug",
    ]
    assert lines[-1] == "error: 1 of 3 runs failed (reasons in the summary above): pgd-at/synthetic/seed1"
    assert "[pgd-at/synthetic/seed1] Traceback (most recent call last):" in lines
    assert "complete" in during.output.splitlines()[1] and "interrupted" in during.output.splitlines()[2]
    assert "starting (pid" in during.output.splitlines()[3], during.output
    assert during.output.splitlines()[-1] == f"{grid}: 3 runs: 1 complete, 1 interrupted, 1 starting"

    second = CliRunner().invoke(main, ["run", "--grid", str(grid), "-q", "--data-dir", str(data_dir), *args])
    assert second.exit_code == 0, second.output
    assert "summary: 3 runs: 2 done, 1 skipped (already complete), 0 failed" in second.output.splitlines()
    after = CliRunner().invoke(main, ["runs", "--grid", str(grid), *args], catch_exceptions=False)
    assert after.output.splitlines()[-1] == f"{grid}: 3 runs: 3 complete"


def test_precision_and_batchnorm_are_grid_keys(tmp_path):
    specs = parse_grid({**VALID, "precision": "bf16", "batchnorm": "per-rank"}).specs(ranks=2)
    assert all(s.precision == "bf16" and s.batchnorm == "per-rank x2" for s in specs)
    assert parse_grid(VALID).specs()[0].precision == "fp32"
    with pytest.raises(HarnessError, match=r"^grid: precision: must be one of 'fp32', 'bf16', 'fp16', got 'fp8'$"):
        parse_grid({**VALID, "precision": "fp8"})
    with pytest.raises(HarnessError, match=r"^grid: batchnorm: must be one of 'global', 'per-rank', got 1$"):
        parse_grid({**VALID, "batchnorm": 1})
    grid = tmp_path / "grid.toml"
    grid.write_text('preset = "smoke"\nmethods = ["pgd-at"]\ndatasets = ["synthetic"]\nseeds = [0]\n')
    clash = CliRunner().invoke(
        main, ["run", "--grid", str(grid), "--precision", "bf16", "--results", str(tmp_path / "r")]
    )
    assert clash.exit_code == 2 and clash.output.strip() == (
        f"error: --grid {grid} says which runs to do; drop --precision (or write it into the grid file)"
    )
