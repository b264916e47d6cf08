"""Config validation: one mechanism, and one message format, for every defense's frozen Config.

A defense's Config subclasses `DefenseConfig`. It declares every rule about one field in the class
attribute `RULES` (a mapping from field name to a `Rule`) and keeps `validate()` for the rules that
relate several fields (or a field and the config's class). On top of the declared rules, every float
field must be finite: a NaN or infinite hyperparameter is never meaningful, and NaN slips through
comparisons such as `x <= 0`. `validate_config` runs all three. Every violation, per-field or
cross-field, reads

    <defense>: <field> must be <condition>, got <value>[ (<why>)]

so a user sees which setting to change (`--set field=...`) and what was wrong with it.

    @dataclass(frozen=True)
    class PGDATConfig(DefenseConfig):
        steps: int = 10
        step_size_rel: float = 0.25
        RULES = rules(steps=at_least(1), step_size_rel=positive)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

from harness.core.errors import HarnessError

SEED_MAX = 2**32 - 1  # numpy's and most tools' seed range; torch generators get seed * 1_000_003 + epoch


@dataclass(frozen=True)
class Rule:
    description: str  # completes "must be ...": ">= 1", "> 0", "in [0, 1]"
    holds: Callable[[Any], bool]
    why: str = ""  # the reason, when the bound is not obvious (TRADES' init_noise > 0)
    each: bool = True  # a tuple-valued field: check each element (True) or the tuple as a whole


class ConfigViolation(HarnessError):
    """A rule a Config breaks; `validate_config` names the defense in front of it."""

    def __init__(self, field: str, must: str, got: Any, why: str = ""):
        self.field, self.must, self.got, self.why = field, must, got, why
        super().__init__(violation_message(None, field, must, got, why))


def violation_message(owner: str | None, field: str, must: str, got: Any, why: str = "") -> str:
    """The one format of every rule violation (see the module docstring)."""
    prefix = f"{owner}: " if owner else ""
    return f"{prefix}{field} must be {must}, got {got}" + (f" ({why})" if why else "")


def require(ok: bool, field: str, must: str, got: Any, why: str = "") -> None:
    """A cross-field rule in a Config's `validate()`: raise a `ConfigViolation` unless `ok`."""
    if not ok:
        raise ConfigViolation(field, must, got, why)


def at_least(low: float) -> Rule:
    return Rule(f">= {low:g}", lambda v: v >= low)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Rule:
    """low <= v <= high; an open end excludes its bound ("in (0, 1]")."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    return Rule(
        f"in {left}{low:g}, {high:g}{right}",
        lambda v: (low < v if low_open else low <= v) and (v < high if high_open else v <= high),
    )


def one_of(choices: tuple[str, ...], why: str = "") -> Rule:
    return Rule(f"one of {', '.join(choices)}", lambda v: v in choices, why)


positive = Rule("> 0", lambda v: v > 0)
non_negative = Rule(">= 0", lambda v: v >= 0)
increasing = Rule("in increasing order", lambda v: list(v) == sorted(v), each=False)
distinct = Rule("listed once each", lambda v: len(set(v)) == len(v), each=False)
not_empty = Rule("not empty", lambda v: len(v) > 0, each=False)


def rules(
    *inherited: Mapping[str, tuple[Rule, ...]], **by_field: Rule | tuple[Rule, ...]
) -> Mapping[str, tuple[Rule, ...]]:
    """Declare `RULES`: one rule or a tuple of rules per field, on top of a parent config's `RULES`
    (`rules(CueEpsConfig.RULES, hidden=at_least(1))`); a field named again replaces its parent's rules."""
    merged = {k: v for parent in inherited for k, v in parent.items()}
    merged.update({k: v if isinstance(v, tuple) else (v,) for k, v in by_field.items()})
    return MappingProxyType(merged)


class DefenseConfig:
    """The base of every defense's frozen Config dataclass: its two validation hooks and their defaults."""

    # per-field rules, checked by `validate_config` before `validate()`; default: none
    RULES: ClassVar[Mapping[str, tuple[Rule, ...]]] = rules()

    def validate(self) -> None:
        """Cross-field rules only (through `require`); default: none."""


def _values(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _check_field(config: DefenseConfig, field: str) -> None:
    value = getattr(config, field)
    for element in _values(value):
        if isinstance(element, float) and not math.isfinite(element):
            raise ConfigViolation(field, "a finite number", element)
    for rule in type(config).RULES.get(field, ()):
        checked = _values(value) if rule.each else (value,)
        for element in checked:  # None is "unset" (eps_min): nothing to check
            if element is not None and not rule.holds(element):
                raise ConfigViolation(field, rule.description, _shown(element), rule.why)


def _shown(value: Any) -> Any:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value


def validate_config(config: DefenseConfig, owner: str | None = None) -> DefenseConfig:
    """Check a Config dataclass: finite floats, its `RULES`, then its own `validate()`; return it."""
    if not isinstance(config, DefenseConfig) or not dataclasses.is_dataclass(config):
        raise TypeError(f"{type(config).__name__} is not a DefenseConfig dataclass")
    fields = [f.name for f in dataclasses.fields(config)]
    unknown = set(type(config).RULES) - set(fields)
    if unknown:  # a typo in a declaration must not silently disable a check
        raise TypeError(f"{type(config).__name__}.RULES names no field {', '.join(sorted(unknown))}")
    with violations_of(owner or type(config).__name__):
        for field in fields:
            _check_field(config, field)
        config.validate()
    return config


@contextmanager
def violations_of(owner: str) -> Iterator[None]:
    """Name `owner` in front of any `ConfigViolation` raised inside (also a defense's `check_spec`)."""
    try:
        yield
    except ConfigViolation as violation:
        raise HarnessError(
            violation_message(owner, violation.field, violation.must, violation.got, violation.why)
        ) from None


def check_seed(seed: int, option: str = "--seed") -> int:
    if not 0 <= seed <= SEED_MAX:
        raise HarnessError(f"{option} must be in 0..{SEED_MAX}, got {seed}")
    return seed
