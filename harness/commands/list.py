"""`harness list`: every registered defense, data set, model, preset, attack and benchmark."""

from __future__ import annotations

import click

from harness.cli import main


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if text else ""


def registry_rows() -> dict[str, list[tuple[str, str]]]:
    from harness.benchmarks.timing import BENCHMARKS
    from harness.core.config import PRESETS
    from harness.core.datasets import DATASETS
    from harness.core.defense import DEFENSES
    from harness.core.models import MODELS
    from harness.evaluation.attacks import ATTACKS

    return {
        "defenses": [(n, _first_line(c.__doc__)) for n, c in DEFENSES.items()],
        "datasets": [
            (
                n,
                f"{i.channels}x{i.image_size}x{i.image_size}, {i.num_classes} classes, eps {i.eps}, "
                f"default model {i.default_model}",
            )
            for n, i in DATASETS.items()
        ],
        "models": [(n, m.description) for n, m in MODELS.items()],
        "presets": [(n, p.description) for n, p in PRESETS.items()],
        "attacks": [(n, a.description) for n, a in ATTACKS.items()],
        "benchmarks": [(n, b.description) for n, b in BENCHMARKS.items()],
    }


@main.command("list")
@click.argument(
    "kind", required=False, type=click.Choice(["defenses", "datasets", "models", "presets", "attacks", "benchmarks"])
)
def list_command(kind: str | None) -> None:
    """List what is registered (all kinds, or one KIND)."""
    for section, rows in registry_rows().items():
        if kind and section != kind:
            continue
        click.secho(section, bold=True)
        width = max((len(n) for n, _ in rows), default=0)
        for name, text in rows:
            click.echo(f"  {name:<{width}}  {text}")
