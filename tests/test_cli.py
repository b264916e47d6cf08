"""The command line: help, listing, and a one-line error with exit status 2 for bad input."""

from __future__ import annotations

import json
import platform

import pytest
from click.testing import CliRunner

from harness.cli import main


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("run", "list", "bench"):
        assert command in result.output


def test_list_shows_every_registry():
    result = invoke("list")
    assert result.exit_code == 0
    for heading in ("defenses", "datasets", "models", "presets", "attacks", "benchmarks"):
        assert heading in result.output
    assert "pgd-at" in result.output and "fashion-mnist" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "-m", "pgd-att"], "did you mean 'pgd-at'"),
        (["run", "-m", "pgd-at", "--dataset", "mnist"], "unknown data set 'mnist'"),
        (["run", "-m", "pgd-at", "--preset", "slow"], "unknown preset"),
        (["run", "-m", "pgd-at", "--model", "vgg"], "unknown model"),
        (["run", "-m", "pgd-at", "--eps", "-0.1"], "outside [0, 1]"),
        (["run", "-m", "pgd-at", "--eps", "2"], "outside [0, 1]"),
        (["run"], "nothing to run"),
        (["run", "--all", "--set", "beta=1"], "--set"),
        (["run", "-m", "pgd-at", "--resume", "--force"], "contradict"),
        (["run", "-m", "trades", "--set", "steps=0"], "error: trades: steps must be >= 1, got 0"),  # RULES
        (
            ["run", "-m", "fat", "--set", "taus=0,1"],
            "error: fat: taus must be one more than tau_milestones",
        ),  # validate()
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output


def test_missing_data_dir(tmp_path, smoke_run_args):
    result = invoke(*smoke_run_args(tmp_path / "r", data=tmp_path / "absent"))
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: --data-dir directory {tmp_path / 'absent'} does not exist; create it or pass an existing --data-dir"
    )
    assert not (tmp_path / "r").exists()  # checked before the results directory is created


def test_a_file_given_as_a_directory_is_called_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    file = str(tmp_path / "file")
    for args, option in (
        (
            ["run", "-m", "pgd-at", "--preset", "smoke", "--data-dir", file, "--results", str(tmp_path / "r")],
            "--data-dir",
        ),
        (["runs", "--results", file], "--results"),
        (["report", "--results", file, "--out", str(tmp_path / "out")], "--results"),
    ):
        result = invoke(*args)
        assert result.exit_code == 2 and result.output.strip() == (
            f"error: {option} {file} is a file, not a directory; pass a directory as {option}"
        ), result.output
    assert not (tmp_path / "r").exists()


def test_unwritable_results_dir(tmp_path, smoke_run_args):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = invoke(*smoke_run_args(blocker / "results"))
    assert result.exit_code == 2 and "not writable" in result.output


def test_run_then_interrupted_rerun_needs_resume(tmp_path, smoke_run_args):
    args = smoke_run_args(tmp_path / "r")
    first = invoke(*args)
    assert first.exit_code == 0 and "PGD-5" in first.output
    record = next((tmp_path / "r").glob("*/record.json"))
    edited = {k: v for k, v in json.loads(record.read_text()).items() if k != "sha256"}  # hand-edited: unsealed
    record.write_text(json.dumps({**edited, "status": "running"}))
    again = invoke(*args)
    assert again.exit_code == 2 and "--resume" in again.output


def test_runs_table_after_a_run(tmp_path, smoke_run_args):
    assert invoke("runs", "--results", str(tmp_path / "none")).exit_code == 2
    invoke(*smoke_run_args(tmp_path / "r"))
    result = invoke("runs", "--results", str(tmp_path / "r"), "--csv")
    assert result.exit_code == 0
    header, row = result.output.strip().splitlines()
    assert header.startswith("defense,dataset") and row.startswith("pgd-at,synthetic")
    columns = dict(zip(header.split(","), row.split(",")))
    assert (columns["precision"], columns["compile"], columns["world_size"], columns["status"]) == (
        "fp32",
        "none",
        "1",
        "complete",
    )


def test_run_records_the_allocator_setting(tmp_path, smoke_run_args):
    invoke(*smoke_run_args(tmp_path / "r"))
    record = json.loads(next((tmp_path / "r").glob("*/record.json")).read_text())
    expected = platform.libc_ver()[0] == "glibc"
    assert record["environment"]["device"]["keep_freed_memory"] is expected
