"""Frozen run configuration: schedule, data, evaluation, presets; eps parsing with exact fractions.

Every hyperparameter of a run lives in one `RunSpec`, whose dictionary form is stored in the run
record and whose hash names the run directory (so an identical completed run is skipped).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from harness.core.errors import HarnessError
from harness.core.registry import Registry


def parse_eps(text: str | float | Fraction) -> Fraction:
    """'8/255', '0.031' or a number -> exact Fraction in [0, 1] (decimals are kept as written)."""
    try:
        value = Fraction(str(text).strip())
    except (ValueError, ZeroDivisionError):
        raise HarnessError(f"eps {text!r} is not a number or fraction like 8/255") from None
    if not 0 <= value <= 1:
        raise HarnessError(f"eps {text} is outside [0, 1]; inputs live in [0, 1], so use e.g. 8/255")
    return value


def fraction_str(value: Fraction) -> str:
    return f"{value.numerator}/{value.denominator}" if value.denominator != 1 else str(value.numerator)


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, Fractions and tuples -> plain JSON types (Fractions as 'n/d' strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Fraction):
        return fraction_str(obj)
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    return obj


@dataclass(frozen=True)
class Schedule:
    """SGD schedule; lr milestones are fractions of the run so `--epochs` rescales them."""

    epochs: int  # equivalent epochs (SGD steps / batches per pass)
    batch_size: int
    lr: float
    lr_milestones: tuple[float, ...] = (0.75, 0.9)  # fraction of epochs; paper: 75 and 90 of 100
    lr_decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_values: tuple[float, ...] = ()  # explicit lr after each milestone (MMA), instead of lr_decay
    # which parameters weight decay acts on: "all" (torch's default, the paper's) or only convolution
    # and linear weights (Free-AT's reference leaves BatchNorm parameters and biases undecayed)
    weight_decay_on: Literal["all", "conv-linear-weights"] = "all"

    def lr_at(self, equivalent_epoch: float) -> float:
        drops = sum(equivalent_epoch >= m * self.epochs for m in self.lr_milestones)
        if self.lr_values:
            return (self.lr, *self.lr_values)[drops]
        return self.lr * self.lr_decay**drops


@dataclass(frozen=True)
class DataSpec:
    train_subset: int | None  # training examples used after the validation split; None = all
    val_size: int  # held out from the training split for `best` selection
    val_seed: int = 0  # the same split for every method and run seed
    augment: bool = True  # the data set's standard augmentation, where it has one


@dataclass(frozen=True)
class EvalSpec:
    test_examples: int | None  # the first N test examples; None = the whole test set
    pgd_steps: int = 20
    pgd_restarts: int = 1
    val_pgd_steps: int = 10  # PGD used on the validation split each epoch to choose `best`
    batch_size: int = 256


@dataclass(frozen=True)
class RunSpec:
    defense: str
    defense_config: Any  # the defense's own frozen Config dataclass
    dataset: str
    model: str
    model_revision: int  # `ModelInfo.revision`: same weights, different function across revisions
    dropout: float
    preset: str
    eps: Fraction
    eval_step: Fraction  # PGD step size at evaluation
    schedule: Schedule
    data: DataSpec
    eval: EvalSpec
    seed: int
    precision: str = "fp32"  # autocast dtype of training and the training attack (`harness.training.precision`)
    batchnorm: str = (
        "global"  # BatchNorm statistics over the global batch, or "per-rank xN" (`harness.scale.distributed`)
    )
    # How the numbers were computed, so runs that differ in them never share a run id or a report cell:
    compile: str = "none"  # torch.compile backend of the training model ("inductor", "aot_eager"), or "none"
    world_size: int = 1  # processes training the run (torchrun): sharded random starts, reduction order

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    @property
    def digest(self) -> str:
        """Hash of the spec; fields added later are left out at their defaults, so the runs named
        before they existed keep their names."""
        data = self.to_dict()
        for key, default in LATER_FIELDS.items():
            if data.get(key) == default:
                del data[key]
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    @property
    def run_id(self) -> str:
        return f"{self.dataset}_{self.defense}_{self.model}_seed{self.seed}_{self.digest}"


DEFAULT_RESULTS = Path("results")  # where runs and evaluations are written unless told otherwise

LATER_FIELDS = {"precision": "fp32", "batchnorm": "global", "compile": "none", "world_size": 1}


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    schedule: Schedule
    data: DataSpec
    eval: EvalSpec
    model: str | None = None  # None: the data set's default model
    schedule_from_defense: bool = False  # use each defense's `reference_schedule` (its authors')
    dataset_models: tuple[tuple[str, str], ...] = field(default=())  # per-data-set overrides

    def model_for(self, dataset: str, default: str) -> str:
        return dict(self.dataset_models).get(dataset, self.model or default)


PRESETS: Registry[Preset] = Registry("preset")


def register_preset(preset: Preset) -> Preset:
    PRESETS.add(preset.name, preset)
    return preset


register_preset(
    Preset(
        name="paper",
        description="the paper's section 5.1: 100 epochs, SGD 0.9, lr 0.1 x0.1 at 75 and 90, batch 128, wd 5e-4",
        schedule=Schedule(epochs=100, batch_size=128, lr=0.1, lr_milestones=(0.75, 0.9), weight_decay=5e-4),
        data=DataSpec(train_subset=None, val_size=1000),
        eval=EvalSpec(test_examples=None),
    )
)
register_preset(
    Preset(
        name="reference",
        description="each defense with its authors' schedule (`reference_schedule`: epochs, lr, weight decay and "
        "what it decays) and input convention (raw-input model twin where the authors feed raw pixels)",
        schedule=Schedule(epochs=100, batch_size=128, lr=0.1, lr_milestones=(0.75, 0.9), weight_decay=5e-4),
        data=DataSpec(train_subset=None, val_size=1000),
        eval=EvalSpec(test_examples=None),
        schedule_from_defense=True,
    )
)
register_preset(
    Preset(
        name="quick",
        description="a real but small CPU run: Fashion-MNIST subset, small CNN, a few epochs",
        schedule=Schedule(epochs=2, batch_size=16, lr=0.05, lr_milestones=(2 / 3,), weight_decay=5e-4),
        data=DataSpec(train_subset=1000, val_size=100),
        eval=EvalSpec(test_examples=500),
        dataset_models=(("cifar10", "preact-resnet18"), ("cifar100", "preact-resnet18")),
    )
)
register_preset(
    Preset(
        name="smoke",
        description="seconds: a few batches, for CI and for checking an installation",
        schedule=Schedule(epochs=1, batch_size=64, lr=0.05, lr_milestones=()),
        data=DataSpec(train_subset=256, val_size=64),
        eval=EvalSpec(test_examples=64, pgd_steps=5, val_pgd_steps=3),
        model="small-cnn",
    )
)


# --------------------------------------------------------------------------- overrides


def _coerce(value: str, annotation: Any, name: str) -> Any:
    """Parse a `key=value` override into the field's declared type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    try:
        if annotation is bool:
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
            raise ValueError(value)
        if annotation is Fraction:
            return parse_eps(value)
        if origin is tuple:
            items = [v for v in value.split(",") if v]
            return tuple(_coerce(v, args[0], name) for v in items)
        if origin is typing.Literal:
            if value not in args:
                raise ValueError(f"choose one of {', '.join(map(str, args))}")
            return value
        if origin in (typing.Union, types.UnionType):
            if value.lower() == "none" and type(None) in args:
                return None
            return _coerce(value, next(a for a in args if a is not type(None)), name)
        return annotation(value)
    except (ValueError, TypeError, StopIteration) as exc:
        raise HarnessError(f"cannot set {name}={value}: {exc}") from None


def apply_overrides(config: Any, overrides: tuple[str, ...]) -> Any:
    """`("beta=6", "attack_bn=eval")` applied to a frozen config dataclass, with type checks."""
    fields = typing.get_type_hints(type(config))
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise HarnessError(f"--set takes key=value, got {item!r}")
        if key not in fields:
            raise HarnessError(f"{type(config).__qualname__} has no field {key!r} (fields: {', '.join(fields)})")
        changes[key] = _coerce(value, fields[key], key)
    return dataclasses.replace(config, **changes)
