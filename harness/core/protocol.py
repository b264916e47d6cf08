"""Each defense's reference protocol (its authors' settings) as data, and where a run departs from it.

Results in this field are lost to settings that silently differ: eps 0.031 against 8/255, weight
decay and what it acts on, BatchNorm mode in the attack, the attack's start, input normalisation,
the lr schedule, which checkpoint is reported. A defense declares its authors' values as a
`reference_protocol` class attribute (`ReferenceProtocol`); `protocol_diff` compares a run with it,
setting by setting, and the runner stores the result in every run record (`reference_protocol`).
The report turns it into a protocol card per method and marks Table 1 cells of departing runs.

A setting names what it compares by a path into the run record:
    spec.<field>[.<field>]   the RunSpec (eps, schedule.weight_decay, ...)
    config.<field>           the defense's own Config
    derived.<name>           computed from the record (`DERIVED`: lr profile, input, architecture, ...)
A defense without a declaration (ADES, Static-DES: the paper under test has no public code) gets a
record saying so, not an empty diff.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from harness.core.config import Schedule, to_jsonable
from harness.core.errors import UnknownNameError

NO_REFERENCE = "no published reference code"
INPUT_RAW = "raw [0, 1]"
INPUT_MEAN_STD = "mean/std normalisation"
INPUT_PER_IMAGE = "per-image standardisation"
OUR_CHECKPOINTS = "last and best validation PGD (both reported)"
_MISSING = object()  # a value the record does not hold (an older or hand-written record)


@dataclass(frozen=True)
class Setting:
    path: str  # what is compared (see the module docstring)
    reference: Any  # the authors' value, JSON-able, in the form `path` yields for a run
    why: str = ""  # where the reference value comes from and why the harness default may differ


@dataclass(frozen=True)
class ReferenceProtocol:
    source: str  # repository and file(s) the values were read from
    settings: tuple[Setting, ...]


LABELS = {
    "spec.eps": "eps (L-inf)",
    "spec.schedule.weight_decay": "weight decay",
    "spec.schedule.weight_decay_on": "weight decay applied to",
    "spec.schedule.epochs": "epochs",
    "spec.schedule.batch_size": "batch size",
    "derived.lr_profile": "lr schedule",
    "derived.input": "input normalisation",
    "derived.architecture": "architecture",
    "derived.checkpoint": "checkpoint reported",
    "config.attack_bn": "BatchNorm mode in the attack",
    "config.search_bn": "BatchNorm mode in the bisection",
    "config.random_start": "uniform random start",
    "config.init_noise": "Gaussian start, std",
    "config.steps": "attack steps",
    "config.step_size_rel": "attack step / eps",
    "config.beta": "beta",
}


def label(path: str) -> str:
    return LABELS.get(path, path.split(".", 1)[-1].replace("_", " "))


# ------------------------------------------------------------------------------------------ derived values


def lr_profile(schedule: Schedule | dict[str, Any]) -> str:
    """'0.1; 0.01 from 50%; 0.001 from 75%': the lr and where it changes, in fractions of the run."""
    s = schedule if isinstance(schedule, dict) else to_jsonable(schedule)
    lrs = list(s.get("lr_values") or [])
    if not lrs:
        lrs = [s["lr"] * s.get("lr_decay", 0.1) ** (i + 1) for i in range(len(s.get("lr_milestones", [])))]
    parts = [f"{s['lr']:g}"] + [f"{lr:.3g} from {m:.1%}" for lr, m in zip(lrs, s.get("lr_milestones", []))]
    return "; ".join(parts)


def _architecture(record: dict[str, Any]) -> str:
    from harness.core.models import RAW_INPUT_SUFFIX

    model = record["spec"]["model"]
    return model[: -len(RAW_INPUT_SUFFIX)] if model.endswith(RAW_INPUT_SUFFIX) else model


def _input(record: dict[str, Any]) -> str:
    from harness.core.models import RAW_INPUT_SUFFIX

    return INPUT_RAW if record["spec"]["model"].endswith(RAW_INPUT_SUFFIX) else INPUT_MEAN_STD


DERIVED: dict[str, Callable[[dict[str, Any]], Any]] = {
    "lr_profile": lambda record: (
        lr_profile(record["spec"]["schedule"]) if "lr" in record["spec"].get("schedule", {}) else _MISSING
    ),
    "input": _input,
    "architecture": _architecture,
    "checkpoint": lambda record: OUR_CHECKPOINTS,
}


def schedule_settings(schedule: Schedule, why: str = "") -> tuple[Setting, ...]:
    """The settings of an authors' schedule (`reference_schedule`), compared with the run's schedule."""
    return (
        Setting("spec.schedule.epochs", schedule.epochs, why),
        Setting("spec.schedule.batch_size", schedule.batch_size, why),
        Setting("derived.lr_profile", lr_profile(schedule), why),
        Setting("spec.schedule.weight_decay", schedule.weight_decay, why),
        Setting(
            "spec.schedule.weight_decay_on",
            schedule.weight_decay_on,
            "torch decays every parameter it is given; --preset reference uses the authors' choice",
        ),
    )


PAPER_SCHEDULE = "the paper under test trains every method on its own 100-epoch schedule (--preset paper)"
PAPER_EPS = "the paper under test reports every method at 8/255; 0.031 is about 7.9/255"
PAPER_INPUT = "ours normalise inside the model; --preset reference uses the raw-input twin (<model>-raw)"
OUR_SELECTION = "the harness reports the last and the best-on-validation checkpoint, never selects on test"


# What a record written before a field existed ran with (the only behaviour there was then).
LEGACY_DEFAULTS = {"spec.schedule.weight_decay_on": "all"}


def value_at(record: dict[str, Any], path: str) -> Any:
    """The run's value for `path`; `_MISSING` when the record does not have it."""
    value = _lookup(record, path)
    return LEGACY_DEFAULTS.get(path, value) if value is _MISSING else value


def _lookup(record: dict[str, Any], path: str) -> Any:
    root, _, rest = path.partition(".")
    if root == "derived":
        return DERIVED[rest](record)
    node: Any = record["spec"] if root == "spec" else record.get("defense", {}).get("config", {})
    for part in rest.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def same(ours: Any, reference: Any) -> bool:
    """Equal as the setting means it: eps as exact numbers (0.031 is not 8/255), floats to 1e-9."""
    if isinstance(ours, (list, tuple)) and isinstance(reference, (list, tuple)):
        return len(ours) == len(reference) and all(same(a, b) for a, b in zip(ours, reference))
    if isinstance(ours, bool) or isinstance(reference, bool):
        return ours == reference
    if isinstance(ours, (int, float, str)) and isinstance(reference, (int, float, str)):
        try:
            a, b = Fraction(str(ours)), Fraction(str(reference))
        except (ValueError, ZeroDivisionError):
            return str(ours) == str(reference)
        return a == b or math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return ours == reference


# ------------------------------------------------------------------------------------------ the diff


def protocol_diff(reference: ReferenceProtocol | None, record: dict[str, Any]) -> dict[str, Any]:
    """{source, settings: [{path, setting, reference, ours, departs, why}], deviations} for one run
    record (needs its `spec` and `defense.config`)."""
    if reference is None:
        return {"source": NO_REFERENCE, "settings": [], "deviations": None}
    rows = []
    for s in reference.settings:
        ours = value_at(record, s.path)
        known = ours is not _MISSING
        rows.append(
            {
                "path": s.path,
                "setting": label(s.path),
                "reference": to_jsonable(s.reference),
                "ours": to_jsonable(ours) if known else None,
                "departs": (not same(ours, s.reference)) if known else None,
                "why": s.why,
            }
        )
    return {"source": reference.source, "settings": rows, "deviations": sum(bool(r["departs"]) for r in rows)}


def reference_of(defense_name: str) -> ReferenceProtocol | None:
    """The declared protocol of a registered defense; None for one without (or an unknown name)."""
    from harness.core.defense import DEFENSES

    try:
        cls = DEFENSES.get(defense_name)
    except UnknownNameError:  # an old record's defense that is no longer registered: no card, no crash
        return None
    return cls.reference_protocol


def run_protocol(record: dict[str, Any]) -> dict[str, Any]:
    """The diff stored in the record, else computed now from its spec (records from before this field)."""
    stored = record.get("reference_protocol")
    if isinstance(stored, dict) and "settings" in stored:
        return stored
    return protocol_diff(reference_of(record["spec"]["defense"]), record)


def departures(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for row in run_protocol(record)["settings"] if row.get("departs")]


def record_field(defense: Any, spec_dict: dict[str, Any], defense_record: dict[str, Any]) -> dict[str, Any]:
    """The `reference_protocol` entry of a new run record."""
    declared = type(defense).reference_protocol
    return protocol_diff(declared, {"spec": spec_dict, "defense": defense_record})


def preset_model(preset: Any, defense_cls: Any, model_name: str) -> str:
    """Under a preset that follows the authors (`schedule_from_defense`), a defense whose authors feed
    raw [0, 1] pixels trains the raw-input twin of the chosen model."""
    from harness.core.models import RAW_INPUT_SUFFIX

    declared = defense_cls.reference_protocol
    wants_raw = declared is not None and any(
        s.path == "derived.input" and s.reference == INPUT_RAW for s in declared.settings
    )
    if preset.schedule_from_defense and wants_raw and not model_name.endswith(RAW_INPUT_SUFFIX):
        return model_name + RAW_INPUT_SUFFIX
    return model_name
