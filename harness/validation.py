"""Config validation: one mechanism for every defense's frozen Config.

A Config declares per-field rules in a class attribute `RULES` (a mapping from field name to a
`Rule`), and may keep a `validate()` method for checks that relate several fields. On top of the
declared rules, every float field must be finite: a NaN or infinite hyperparameter is never
meaningful, and NaN slips through comparisons such as `x <= 0`. `validate_config` runs all three
and raises one HarnessError naming the defense, the field, the rule and the value.

    @dataclass(frozen=True)
    class PGDATConfig:
        steps: int = 10
        step_size_rel: float = 0.25
        RULES = rules(steps=at_least(1), step_size_rel=positive)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from harness.errors import HarnessError

SEED_MAX = 2**32 - 1  # numpy's and most tools' seed range; torch generators get seed * 1_000_003 + epoch


@dataclass(frozen=True)
class Rule:
    description: str  # completes "must be ...": ">= 1", "> 0", "in [0, 1]"
    holds: Callable[[Any], bool]


def at_least(low: float) -> Rule:
    return Rule(f">= {low:g}", lambda v: v >= low)


def between(low: float, high: float) -> Rule:
    return Rule(f"in [{low:g}, {high:g}]", lambda v: low <= v <= high)


positive = Rule("> 0", lambda v: v > 0)
non_negative = Rule(">= 0", lambda v: v >= 0)


def rules(**by_field: Rule) -> Mapping[str, Rule]:
    return MappingProxyType(by_field)


def _values(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def validate_config(config: Any, owner: str | None = None) -> Any:
    """Check a Config dataclass: finite floats, its `RULES`, then its own `validate()`; return it."""
    name = owner or type(config).__name__
    declared: Mapping[str, Rule] = getattr(type(config), "RULES", {})
    fields = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    unknown = set(declared) - fields
    if unknown:  # a typo in a declaration must not silently disable a check
        raise TypeError(f"{type(config).__name__}.RULES names no field {', '.join(sorted(unknown))}")
    for field in sorted(fields):
        for value in _values(getattr(config, field)):
            if isinstance(value, float) and not math.isfinite(value):
                raise HarnessError(f"{name}: {field} must be a finite number, got {value}")
            rule = declared.get(field)
            if rule is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and not rule.holds(value):
                raise HarnessError(f"{name}: {field} must be {rule.description}, got {value}")
    check = getattr(config, "validate", None)
    if check is not None:
        check()
    return config


def check_seed(seed: int, option: str = "--seed") -> int:
    if not 0 <= seed <= SEED_MAX:
        raise HarnessError(f"{option} must be in 0..{SEED_MAX}, got {seed}")
    return seed
