"""The Python API (harness.train, harness.report): same records as the CLI, the CLI's rules, a light
`import harness`, documented examples that run, and an import graph with no arrow into the commands."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

import harness
from harness import api
from harness.core.errors import HarnessError
from harness.training.specs import make_spec

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {"method": "pgd-at", "dataset": "synthetic", "preset": "smoke"}


def test_train_writes_the_record_harness_run_writes(run_dir, data_dir, tmp_path):
    made = harness.train(**SMOKE, results=tmp_path, data_dir=data_dir)
    cli = json.loads((run_dir / "record.json").read_text())
    ours = json.loads((made.run_dir / "record.json").read_text())
    assert made.run_dir == tmp_path / run_dir.name and made.record.run_id == cli["run_id"]
    assert ours["spec"] == cli["spec"] and ours.keys() == cli.keys()  # same identity, same fields
    for label in ("last", "best"):  # same (seeded) result; only the measured seconds differ
        assert {k: v for k, v in ours["final"][label].items() if k != "seconds"} == {
            k: v for k, v in cli["final"][label].items() if k != "seconds"
        }
    assert made.record.status == "complete" and made.checkpoint.is_file() and made.best_checkpoint.is_file()
    last = made.record.final["last"]
    assert (last.clean, last.pgd, last.n) == (
        cli["final"]["last"]["clean"],
        cli["final"]["last"]["pgd"],
        cli["final"]["last"]["n"],
    )
    assert api.load_run(run_dir).record == made.record  # the typed view compares by its fields


def test_train_skips_a_complete_run_and_refuses_resume_with_force(run_dir, data_dir):
    before = (run_dir / "record.json").read_text()
    again = harness.train(**SMOKE, results=run_dir.parent, data_dir=data_dir)
    assert (run_dir / "record.json").read_text() == before  # skipped: nothing rewritten
    assert again.record.raw["created"] == json.loads(before)["created"] and again.run_dir == run_dir
    with pytest.raises(HarnessError, match="contradict"):
        harness.train(**SMOKE, results=run_dir.parent / "new", data_dir=data_dir, resume=True, force=True)
    assert not (run_dir.parent / "new").exists()  # refused before anything is created
    with pytest.raises(HarnessError, match="either a RunSpec or method"):
        harness.train(results=run_dir.parent)
    spec = make_spec("pgd-at", "synthetic", "smoke")
    assert harness.train(spec, results=run_dir.parent, data_dir=data_dir).run_dir == run_dir  # a RunSpec: the same run
    with pytest.raises(HarnessError, match="already says epochs"):
        harness.train(spec, results=run_dir.parent, epochs=2)


def test_train_resumes_an_interrupted_run_only_when_asked(run_dir, data_dir, tmp_path, monkeypatch):
    """Interrupted after training, before the test evaluation (the faults seam): train() refuses to
    redo it silently, and resume=True finishes it to the record an uninterrupted run wrote."""
    from harness.training import faults

    def interrupt(point: str) -> None:
        if point == "final-evaluation":
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(faults, "reached", interrupt)
        with pytest.raises(KeyboardInterrupt):
            harness.train(**SMOKE, results=tmp_path, data_dir=data_dir)
    assert json.loads((tmp_path / run_dir.name / "record.json").read_text())["status"] == "running"
    with pytest.raises(HarnessError, match="--resume"):
        harness.train(**SMOKE, results=tmp_path, data_dir=data_dir)
    resumed = harness.train(**SMOKE, results=tmp_path, data_dir=data_dir, resume=True)
    assert resumed.record.status == "complete" and resumed.record == api.load_run(run_dir).record


@pytest.mark.parametrize(
    "resume, force, grid, expected",
    [
        (False, False, False, False),
        (True, False, False, True),
        (False, True, False, False),
        (False, False, True, True),
        (False, True, True, False),
        (True, False, True, True),
    ],
)
def test_resume_policy(resume, force, grid, expected):
    """Resume as asked; a grid resumes unless forced (it is rerun until complete)."""
    assert api.resume_mode(resume, force, grid=grid) is expected


def test_report_reads_the_results_it_is_given(run_dir, tmp_path):
    import harness.reporting.render  # noqa: F401  (importing the report package leaves `harness.report` the call)

    made = harness.report(results=run_dir.parent, out=tmp_path / "report")
    assert made.html == tmp_path / "report" / "report.html" and made.html.is_file()
    assert [r.run_id for r in made.report.results.runs] == [run_dir.name]
    assert sum(made.verdict_counts.values()) == len(made.report.verdicts)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HarnessError, match=f"no complete run or evaluation records in {empty}"):
        harness.report(results=empty, out=tmp_path / "none")
    assert not (tmp_path / "none").exists()  # nothing half-written


def test_complete_runs_are_counted_as_skipped_unless_forced(run_dir):
    """The label set train_specs (so `harness run`) hands the summary as "skipped (already complete)"."""
    spec = make_spec("pgd-at", "synthetic", "smoke")
    assert api.complete_labels([spec], run_dir.parent, force=False) == {"pgd-at/synthetic/seed0"}
    assert api.complete_labels([spec], run_dir.parent, force=True) == frozenset()


def _fresh_python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    return out.stdout.strip()


def test_import_harness_is_light_and_the_registry_loads_its_plugins():
    code = (
        "import sys, harness\n"
        "print('torch' in sys.modules, 'methods' in sys.modules, callable(harness.train))\n"
        "from harness.core.defense import DEFENSES\n"
        "print('methods' in sys.modules, 'ades' in DEFENSES, 'methods' in sys.modules, len(DEFENSES))"
    )
    light, registry = _fresh_python(code).splitlines()
    assert light == "False False True"
    before, found, after, count = registry.split()
    assert (before, found, after) == ("False", "True", "True") and int(count) >= 12


def test_no_harness_module_imports_the_plugins_for_their_side_effect():
    """The defense registry loads methods/ on its first lookup: an `import methods` in harness/ is a
    second, scattered way to fill it (and makes `import harness.x` pay for every defense)."""
    sites = [
        f"{path.relative_to(ROOT).as_posix()}:{node.lineno}"
        for path in sorted((ROOT / "harness").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Import) and any(a.name == "methods" for a in node.names)
    ]
    assert sites == []


def _examples(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def test_documented_examples_run(data_dir, tmp_path, monkeypatch):
    """Every ```python block of docs/api.md and the README's Python API section, in order, in one folder."""
    import harness.core.datasets

    monkeypatch.setattr(harness.core.datasets, "DEFAULT_DATA_DIR", data_dir)  # the docs rely on the default data folder
    monkeypatch.chdir(tmp_path)
    readme = ROOT / "README.md"
    section = readme.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = _examples(ROOT / "docs" / "api.md") + re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    lines = [len([line for line in b.splitlines() if line.strip()]) for b in blocks]
    assert (
        len(blocks) == 4 and max(lines[:3]) <= 5 and lines[3] <= 7
    )  # five lines per entry point; the README's all three
    for block in blocks:
        exec(compile(block, "example", "exec"), {})  # noqa: S102  (the documented examples, verbatim)
    assert len(list((tmp_path / "results").glob("*/record.json"))) == 1  # the README's train() skipped it
    assert (tmp_path / "reports" / "mine" / "report.html").is_file()


# --------------------------------------------------------------------------- the import graph

COMMAND_LAYER = {"harness/cli.py", "harness/__main__.py"}  # the click group that loads the commands, `python -m`


def _imports(path: Path) -> list[str]:
    """Every module a file imports, statically or by a string naming a harness module."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("harness."):
            names.append(node.value.partition(":")[0])
    return names


def _reaches_commands(module: str) -> bool:
    return module == "harness.cli" or module == "harness.commands" or module.startswith("harness.commands.")


def test_nothing_below_the_commands_imports_them():
    """No arrow from the library (or the executors, benchmarks, report) to the click commands: a
    worker or a notebook never needs click's parsing, and the CLI is only a shell over the library."""
    offenders = []
    for path in sorted((ROOT / "harness").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith("harness/commands/") or relative in COMMAND_LAYER:
            continue
        offenders += [f"{relative} -> {m}" for m in _imports(path) if _reaches_commands(m)]
    assert offenders == []


def test_the_import_graph_check_sees_each_kind_of_arrow(tmp_path):
    """The rule catches `import`, `from ... import` and a module named in a string (a job key)."""
    samples = {
        "from harness.commands.run import run_jobs": True,
        "import harness.commands.eval": True,
        "from harness import cli": True,
        "KEY = 'harness.commands.eval:eval_command'": True,
        "from harness.api import run_jobs": False,
        "import harness.commandsx": False,
    }
    for source, caught in samples.items():
        path = tmp_path / "sample.py"
        path.write_text(source + "\n")
        assert any(_reaches_commands(m) for m in _imports(path)) is caught, source


# --------------------------------------------------------------------------- harness.evaluate

EVAL = {"attacks": ["pgd-20"], "eps": ["0", "8/255"], "n": 64, "batch_size": 64}


def test_evaluate_writes_the_evaluation_harness_eval_writes(run_dir, data_dir):
    """The same target and options through the library and the CLI: one evaluation directory (the
    CLI finds the library's and skips it), and the result's numbers are its record's."""
    from click.testing import CliRunner

    from harness.cli import main

    result = harness.evaluate(run_dir, data_dir=data_dir, results=run_dir.parent, **EVAL)
    record = json.loads((result.directory / "evaluation.json").read_text())
    assert result.directory.parent == run_dir / "eval" and not result.already_done
    assert result.clean == record["clean_accuracy"] and result.checks == record["checks"]
    worst = {r["eps"]: r["robust_accuracy"] for r in record["results"] if r["attack"] == "worst-case"}
    assert {str(e) if e else "0": a for e, a in result.robust.items()} == worst
    assert result.flags["worst-case@8/255"].mean() * 100 == pytest.approx(result.robust[Fraction(8, 255)])
    out = CliRunner().invoke(
        main,
        [
            "eval",
            str(run_dir),
            "-a",
            "pgd-20",
            "--eps",
            "0,8/255",
            "--n",
            "64",
            "--batch-size",
            "64",
            "--data-dir",
            str(data_dir),
            "-q",
        ],
    )
    assert out.exit_code == 0, out.output
    assert out.output.startswith("already evaluated: ") and str(result.directory) in out.output


def test_evaluate_takes_any_module_bound_by_its_weights(trained_model, data_dir, tmp_path):
    options = {**EVAL, "probes": False}  # the binding is under test here, not the probes
    first = harness.evaluate(trained_model, dataset="synthetic", data_dir=data_dir, results=tmp_path, **options)
    assert first.directory.parent == tmp_path / "external" / f"module-{type(trained_model).__name__}" / "eval"
    assert 0 <= first.robust[Fraction(8, 255)] <= first.robust[Fraction(0)] == first.clean
    assert harness.evaluate(
        trained_model, dataset="synthetic", data_dir=data_dir, results=tmp_path, **options
    ).already_done  # the same weights and config: skipped, not redone
    with torch.no_grad():
        next(trained_model.parameters()).add_(0.01)  # other weights: a new evaluation, never the old one
    other = harness.evaluate(trained_model, dataset="synthetic", data_dir=data_dir, results=tmp_path, **options)
    assert not other.already_done and other.directory != first.directory
    with pytest.raises(HarnessError, match="needs dataset"):
        harness.evaluate(trained_model, results=tmp_path, **options)
    with pytest.raises(HarnessError, match="no option 'attack'; did you mean 'attacks'"):
        harness.evaluate(trained_model, dataset="synthetic", attack=["pgd-20"])
