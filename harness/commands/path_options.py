"""The path options several subcommands share, declared once: each command passes only its own help text,
so `--results` means the same directory (default `results`) everywhere."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from harness.core.config import DEFAULT_RESULTS


def results_option(help: str) -> Callable:
    return click.option(
        "--results",
        "results_dir",
        type=click.Path(path_type=Path),
        default=DEFAULT_RESULTS,
        show_default=True,
        help=help,
    )


def data_dir_option(help: str) -> Callable:
    return click.option("--data-dir", type=click.Path(path_type=Path), default=None, help=help)
