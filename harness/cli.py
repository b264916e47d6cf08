"""`harness` command line. Each subcommand lives in its own module under `harness/commands/`,
which registers itself on the `main` group when imported.

Errors the user can fix (`HarnessError`) print one line and exit with status 2.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import click

from harness.core.errors import HarnessError
from harness.training.allocator import keep_freed_memory


class HarnessGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HarnessError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo(
                "error: interrupted; the last completed epoch is checkpointed: rerun the same "
                "command with --resume to continue",
                err=True,
            )
            sys.exit(2)


@click.group(cls=HarnessGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="harness")
def main() -> None:
    """Benchmark and reproduction harness for adversarial-training defenses.

    \b
    Typical use:
      harness list                                   what can be run
      harness run --all --dataset fashion-mnist      train + evaluate every defense
      harness run --method pgd-at --dataset cifar10 --preset paper
      harness bench                                  cost of an AT step on this machine
    """
    keep_freed_memory()


def _load_commands() -> None:
    from harness import commands

    for module in pkgutil.iter_modules(commands.__path__):
        importlib.import_module(f"{commands.__name__}.{module.name}")


_load_commands()
