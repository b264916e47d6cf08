"""One default results directory: every command that takes --results, and every library entry point, writes to
and reads from the same place, so a `harness.train(...)` in a notebook is found by a later `harness report`."""

from __future__ import annotations

import inspect
from pathlib import Path

import harness
from harness.cli import main
from harness.core.config import DEFAULT_RESULTS
from harness.evaluation.checkpoints import load_checkpoint
from harness.evaluation.pipeline import EvalRequest


def test_the_default_results_directory_is_results_as_the_readme_says():
    assert DEFAULT_RESULTS == Path("results")


def test_every_command_taking_results_defaults_to_the_same_directory_and_shows_it():
    taking = {name: p for name, cmd in main.commands.items() for p in cmd.params if p.name == "results_dir"}
    assert {"run", "eval", "report", "runs", "export"} <= set(taking)
    for name, param in taking.items():
        assert Path(param.default) == DEFAULT_RESULTS, name
        assert param.show_default, name


def test_the_library_entry_points_default_to_the_same_directory():
    assert Path(inspect.signature(harness.train).parameters["results"].default) == DEFAULT_RESULTS
    assert Path(inspect.signature(harness.report).parameters["results"].default) == DEFAULT_RESULTS
    assert EvalRequest().results == DEFAULT_RESULTS
    assert inspect.signature(load_checkpoint).parameters["results_dir"].default == DEFAULT_RESULTS
