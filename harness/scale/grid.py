"""Grid files: a grid of runs written down once in TOML, checked before anything runs, rerun to completion.

    preset = "paper"                        # required
    methods = ["pgd-at", "trades"]          # required; or "all" (every registered defense)
    datasets = ["cifar10", "cifar100"]      # required
    seeds = [0, 1, 2]                       # required; or a count, seeds = 3 (seeds 0..2)
    epochs = 100                            # optional, as `harness run --epochs`; also eps, model, dropout,
    precision = "bf16"                      #   precision and batchnorm

    [overrides.trades]                      # optional: one method's hyperparameters, as --set
    beta = 6

Every (data set, method, seed) becomes one `RunSpec`; an error names the file and the bad key.
`harness run --grid FILE` skips the finished runs and resumes the interrupted ones, so the same
command is rerun until the grid is complete.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.config import RunSpec
from harness.core.errors import HarnessError

REQUIRED = ("preset", "methods", "datasets", "seeds")
OPTIONAL = ("epochs", "eps", "model", "dropout", "precision", "batchnorm", "overrides")


class GridError(HarnessError):
    """A grid file that cannot be read or names something that does not exist."""


@dataclass(frozen=True)
class Grid:
    source: str  # the file, for messages
    preset: str
    methods: tuple[str, ...]
    datasets: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int | None = None
    eps: str | None = None
    model: str | None = None
    dropout: float = 0.0
    overrides: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (method, ("key=value", ...))
    precision: str = "fp32"
    batchnorm: str = "global"

    def specs(self, ranks: int = 1) -> list[RunSpec]:
        """Every run of the grid, data set by data set, then method, then seed; the first bad one fails.

        `ranks`: the torchrun world size the grid runs under (per-rank BatchNorm names it)."""
        from harness.training.specs import make_spec

        sets = dict(self.overrides)
        specs = []
        for dataset in self.datasets:
            for method in self.methods:
                for seed in self.seeds:
                    try:
                        specs.append(
                            make_spec(
                                method,
                                dataset,
                                self.preset,
                                seed,
                                epochs=self.epochs,
                                eps=self.eps,
                                model=self.model,
                                dropout=self.dropout,
                                overrides=sets.get(method, ()),
                                precision_name=self.precision,
                                batchnorm=self.batchnorm,
                                ranks=ranks,
                            )
                        )
                    except HarnessError as exc:
                        raise GridError(f"{self.source}: {method} on {dataset}, seed {seed}: {exc}") from None
        return specs


def load_grid(path: Path) -> Grid:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise GridError("grid files need Python 3.11 or later (tomllib)") from None
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise GridError(f"{path}: cannot read the grid file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise GridError(
            f"{path}: not a text grid file (byte {exc.object[exc.start]:#04x} at offset {exc.start} "
            f"is not UTF-8); is it the TOML file?"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise GridError(f"{path}: not valid TOML: {exc}") from None
    return parse_grid(data, str(path))


def parse_grid(data: dict[str, Any], source: str = "grid") -> Grid:
    """Check every key and value of a parsed grid file and resolve its names against the registries."""
    from harness.core.config import PRESETS
    from harness.core.datasets import DATASETS
    from harness.core.defense import DEFENSES
    from harness.scale.distributed import BATCHNORM_MODES
    from harness.training.precision import PRECISIONS

    def fail(key: str, message: str) -> GridError:
        return GridError(f"{source}: {key}: {message}")

    _check_keys(data, source, fail)
    preset = _string(data["preset"], "preset", fail)
    _resolve(PRESETS, preset, "preset", fail)
    methods_ = (
        tuple(DEFENSES.names())
        if data["methods"] == "all"
        else _names(data["methods"], "methods", fail, DEFENSES, 'a list of defense names or "all"')
    )
    datasets = _names(data["datasets"], "datasets", fail, DATASETS, "a list of data set names")
    return Grid(
        source=source,
        preset=preset,
        methods=methods_,
        datasets=datasets,
        seeds=_seeds(data["seeds"], fail),
        **_run_settings(data, fail),
        overrides=_overrides(data.get("overrides", {}), methods_, fail),
        precision=_choice(data.get("precision", "fp32"), "precision", fail, PRECISIONS),
        batchnorm=_choice(data.get("batchnorm", "global"), "batchnorm", fail, BATCHNORM_MODES),
    )


def _check_keys(data: dict[str, Any], source: str, fail) -> None:
    """Every key known (with a "did you mean"), every required key present."""
    for key in data:
        if key not in REQUIRED + OPTIONAL:
            close = difflib.get_close_matches(key, REQUIRED + OPTIONAL, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise fail(key, f"unknown key{hint} (keys: {', '.join(REQUIRED + OPTIONAL)})")
    for key in REQUIRED:
        if key not in data:
            raise GridError(f"{source}: missing key {key!r} (a grid needs {', '.join(REQUIRED)})")


def _seeds(seeds: Any, fail) -> tuple[int, ...]:
    """A list of distinct non-negative seeds, or a count N meaning seeds 0..N-1."""
    if type(seeds) is int and seeds >= 1:
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int and s >= 0 for s in seeds):
        raise fail(
            "seeds",
            f"must be a non-empty list of non-negative integers or a count N >= 1 (seeds 0..N-1), got {seeds!r}",
        )
    _no_repeats(seeds, "seeds", fail)
    return tuple(seeds)


def _run_settings(data: dict[str, Any], fail) -> dict[str, Any]:
    """The optional scalars every run of the grid shares: epochs, eps, model, dropout."""
    from harness.core.config import parse_eps
    from harness.core.models import MODELS

    epochs = data.get("epochs")
    if epochs is not None and (type(epochs) is not int or epochs < 1):
        raise fail("epochs", f"must be a positive integer, got {epochs!r}")
    eps = data.get("eps")
    if eps is not None:
        if type(eps) not in (str, int, float):
            raise fail("eps", f'must be a fraction such as "8/255" or a number, got {eps!r}')
        eps = str(eps)
        _check(lambda: parse_eps(eps), "eps", fail)
    model = _string(data["model"], "model", fail) if "model" in data else None
    if model is not None:
        _resolve(MODELS, model, "model", fail)
    dropout = data.get("dropout", 0.0)
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise fail("dropout", f"must be a number in [0, 1), got {dropout!r}")
    return {"epochs": epochs, "eps": eps, "model": model, "dropout": float(dropout)}


def _overrides(overrides: Any, methods_: tuple[str, ...], fail) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """[overrides.<method>] tables as `--set` items per method, each checked against the method's Config."""
    from harness.core.config import apply_overrides
    from harness.core.defense import DEFENSES

    if not isinstance(overrides, dict):
        raise fail("overrides", "must be a table of tables, e.g. [overrides.trades] with beta = 6")
    sets = []
    for method, values in overrides.items():
        if method not in methods_:
            raise fail(f"overrides.{method}", f"{method!r} is not one of the grid's methods ({', '.join(methods_)})")
        if not isinstance(values, dict):
            raise fail(f"overrides.{method}", "must be a table of hyperparameters, e.g. beta = 6")
        items = []
        for name, value in values.items():
            key = f"overrides.{method}.{name}"
            items.append(f"{name}={_set_value(value, key, fail)}")
            _check(functools.partial(apply_overrides, DEFENSES.get(method).Config(), items[-1:]), key, fail)
        sets.append((method, tuple(items)))
    return tuple(sets)


def _choice(value: Any, key: str, fail, choices) -> str:
    if value not in choices:
        raise fail(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _string(value: Any, key: str, fail) -> str:
    if not isinstance(value, str) or not value:
        raise fail(key, f"must be a name (a string), got {value!r}")
    return value


def _check(action, key: str, fail) -> None:
    try:
        action()
    except HarnessError as exc:
        raise fail(key, str(exc)) from None


def _resolve(registry, name: str, key: str, fail) -> None:
    _check(lambda: registry.get(name), key, fail)


def _names(value: Any, key: str, fail, registry, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise fail(key, f"must be {what}, got {value!r}")
    for name in value:
        _resolve(registry, name, key, fail)
    _no_repeats(value, key, fail)
    return tuple(value)


def _no_repeats(values: list, key: str, fail) -> None:
    repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
    if repeated:
        raise fail(key, f"lists {', '.join(map(str, repeated))} more than once")


def _set_value(value: Any, key: str, fail) -> str:
    """A TOML value in the `--set key=value` text that the defense's typed config parses."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value):
        return ",".join(map(str, value))
    raise fail(key, f"must be a number, string, boolean or list of numbers, got {value!r}")
