"""`--seeds N` for `harness run` (methods, --all, grids) and the grid key `seeds = N` (issue 20).
The runner is replaced by a recorder: these tests check which runs are asked for, not training."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import harness.training.runner
from harness.cli import main
from harness.scale.grid import parse_grid

VALID = {"preset": "smoke", "methods": ["pgd-at"], "datasets": ["synthetic"], "seeds": 3}


@pytest.fixture
def asked(monkeypatch):
    specs = []

    def fake_run(spec, options):
        specs.append(spec)
        return {"final": {"last": {"clean": 0.0, "pgd": 0.0, "n": 1}}}

    monkeypatch.setattr(harness.training.runner, "run", fake_run)
    return specs


def _run(tmp_path, *args):
    return CliRunner().invoke(main, ["run", "-q", "--results", str(tmp_path / "r"), *args], catch_exceptions=False)


def test_seeds_n_runs_seeds_0_to_n_minus_1_for_every_method(tmp_path, asked):
    result = _run(tmp_path, "-m", "pgd-at", "-m", "trades", "-d", "synthetic", "--preset", "smoke", "--seeds", "3")
    assert result.exit_code == 0, result.output
    assert sorted((s.defense, s.seed) for s in asked) == [(m, k) for m in ("pgd-at", "trades") for k in range(3)]


def test_seeds_with_all_covers_every_defense(tmp_path, asked):
    import methods  # noqa: F401
    from harness.core.defense import DEFENSES

    assert _run(tmp_path, "--all", "-d", "synthetic", "--preset", "smoke", "--seeds", "2").exit_code == 0
    assert len(asked) == 2 * len(DEFENSES.names()) and {s.seed for s in asked} == {0, 1}


def test_seeds_and_seed_together_is_a_one_line_error(tmp_path, asked):
    result = _run(tmp_path, "-m", "pgd-at", "-d", "synthetic", "--seed", "4", "--seeds", "3")
    assert (
        result.exit_code == 2
        and result.output.strip() == "error: give either --seed (repeatable) or --seeds N, not both"
    )
    assert not asked
    assert _run(tmp_path, "-m", "pgd-at", "-d", "synthetic", "--seeds", "0").exit_code == 2


def test_grid_seed_count_and_seeds_option_replace_the_grid_seeds(tmp_path, asked):
    assert parse_grid(VALID).seeds == (0, 1, 2)
    with pytest.raises(Exception, match="seeds: must be"):
        parse_grid({**VALID, "seeds": 0})
    grid = tmp_path / "grid.toml"
    grid.write_text('preset = "smoke"\nmethods = ["pgd-at"]\ndatasets = ["synthetic"]\nseeds = [7]\n')
    assert _run(tmp_path, "--grid", str(grid), "--seeds", "2").exit_code == 0
    assert [s.seed for s in asked] == [0, 1]


def test_runs_shows_mean_and_std_over_seeds_with_the_count(tmp_path):
    import report_fixture as fx

    fx.build_results(
        tmp_path / "r",
        corrupt=False,
        runs=(
            fx.FakeRun("pgd-at", 0, 80.0, 40.0, None),
            fx.FakeRun("pgd-at", 1, 82.0, 44.0, None),
            fx.FakeRun("pgd-at", 2, 84.0, 42.0, None),
            fx.FakeRun("ades", 0, 85.0, 50.0, None),
        ),
    )
    result = CliRunner().invoke(main, ["runs", "--results", str(tmp_path / "r")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = result.output.split("over seeds")[1].splitlines()
    pgd_at = next(line for line in summary if " pgd-at " in f" {line} ")
    ades = next(line for line in summary if " ades " in f" {line} ")
    assert "82.00 ± 2.00" in pgd_at and "42.00 ± 2.00" in pgd_at and " 3 " in f" {pgd_at} " and "‡" not in pgd_at
    assert "1 ‡" in ades and "85.00" in ades
