"""From names to a complete RunSpec: the preset's schedule (or the defense's reference one), the data set's eps
and model, overrides validated, and how this command executes it (compile backend, process count). Unknown
names and bad values fail here, in one line, before anything runs."""

from __future__ import annotations

import dataclasses

from harness.core.config import PRESETS, RunSpec, apply_overrides, parse_eps
from harness.core.datasets import DATASETS
from harness.core.defense import DEFENSES
from harness.core.errors import HarnessError
from harness.core.models import MODELS
from harness.core.protocol import preset_model
from harness.core.validation import check_seed, validate_config
from harness.scale import distributed
from harness.training import precision


def _schedule(preset, defense_cls, epochs: int | None):
    """The preset's schedule (or the defense's reference one, where the preset says so), --epochs applied."""
    schedule = preset.schedule
    if preset.schedule_from_defense and defense_cls.reference_schedule is not None:
        schedule = defense_cls.reference_schedule
    if epochs is None:
        return schedule
    if epochs < 1:
        raise HarnessError(f"--epochs must be at least 1, got {epochs}")
    return type(schedule)(**{**schedule.__dict__, "epochs": epochs})


def make_spec(
    defense: str,
    dataset: str,
    preset: str = "quick",
    seed: int = 0,
    *,
    epochs: int | None = None,
    eps: str | None = None,
    model: str | None = None,
    dropout: float = 0.0,
    overrides: tuple[str, ...] = (),
    precision_name: str = "fp32",
    batchnorm: str = "global",
    ranks: int = 1,
    compile_model: bool = False,
) -> RunSpec:
    """Resolve names, preset and overrides into a complete RunSpec (unknown names fail here)."""
    defense_cls = DEFENSES.get(defense)
    info = DATASETS.get(dataset)
    p = PRESETS.get(preset)
    model_name = model or preset_model(p, defense_cls, p.model_for(dataset, info.default_model))
    MODELS.get(model_name)
    schedule = _schedule(p, defense_cls, epochs)
    if not 0 <= dropout < 1:
        raise HarnessError(f"--dropout must be in [0, 1), got {dropout}")
    check_seed(seed)
    config = validate_config(apply_overrides(defense_cls.Config(), overrides), defense)
    precision.check_precision(precision_name)
    if batchnorm not in distributed.BATCHNORM_MODES:
        raise HarnessError(f"unknown --batchnorm {batchnorm!r}; use one of {', '.join(distributed.BATCHNORM_MODES)}")
    spec = RunSpec(
        defense=defense,
        defense_config=config,
        dataset=dataset,
        model=model_name,
        model_revision=MODELS.get(model_name).revision,
        dropout=dropout,
        preset=preset,
        eps=parse_eps(eps) if eps is not None else info.eps,
        eval_step=info.eval_step,
        schedule=schedule,
        data=type(p.data)(**{**p.data.__dict__, "augment": p.data.augment and info.augment}),
        eval=p.eval,
        seed=seed,
        precision=precision_name,
        batchnorm=f"per-rank x{ranks}" if batchnorm == "per-rank" and ranks > 1 else "global",
    )
    spec = with_execution(spec, compile_model, ranks)
    defense_cls.check_spec(spec)
    return spec


def with_execution(spec: RunSpec, compile_model: bool, world_size: int) -> RunSpec:
    """`spec` as this command executes it: compile backend and process count are part of its identity
    (a grid file's specs get them here too). fp32 eager single-process specs keep their run ids."""
    return dataclasses.replace(
        spec, compile=precision.compile_backend() if compile_model else "none", world_size=world_size
    )
