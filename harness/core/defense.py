"""The defense interface: the only place a training method acts.

A defense is one small class in `methods/<name>.py`, registered with `@register_defense("name")`,
holding a frozen `Config` dataclass of its hyperparameters (defaults from its authors). The runner
calls these methods and never asks which defense it holds:

    check_spec(spec)  [classmethod]         reject bad hyperparameter/run combinations before training
    setup(model)                            own parameters / per-example state (ADES, MMA, IAAT)
    start_epoch(epoch)                      schedules inside the defense (FAT's tau, IAAT warm-up)
    train_step(model, optimizer, batch)     its own forward/backward and optimiser step(s)
    perturb(model, batch)                   the adversarial examples it trains on (for tests, bench)
    end_epoch(epoch) -> dict                per-epoch diagnostics stored in the run record
    state_dict() / load_state_dict(state)   everything `--resume` needs
    replays                                 optimiser steps per minibatch (Free-AT's m; else 1)
    record() -> dict                        resolved choices for the run record (attack BN mode, ...)

Class-level hooks (read without an instance, by the runner, the report and `harness list`) are declared
here with their defaults: `label`, `Config` (a `DefenseConfig` with `RULES` and `validate()`),
`reference_schedule`, `reference_protocol`, `distributed_ready`, `held_out_size`, `check_spec` and
`step_cost`. docs/defenses.md lists every hook (tests/test_conformance.py checks the list against this class).
See docs/defenses.md for PGD-AT as a worked example.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.config import Schedule, to_jsonable
from harness.core.datasets import Batch, DatasetInfo
from harness.core.protocol import ReferenceProtocol
from harness.core.registry import Registry
from harness.core.validation import DefenseConfig
from harness.training import precision


@dataclass(frozen=True)
class DefenseContext:
    """What a defense may know about the run it is part of."""

    eps: Fraction  # the run's nominal L-inf budget
    dataset: DatasetInfo
    train_size: int  # examples in the training subset; Batch.index ranges over it
    epochs: int  # equivalent epochs of the schedule
    device: torch.device
    # examples carved out of the training subset for the defense's own use (ADES-bilevel's outer
    # loss), never trained on and distinct from the validation split that picks `best`
    held_out: Any = None  # harness.core.datasets.Split of float images on the device, or None

    @property
    def eps_float(self) -> float:
        return float(self.eps)


class Perturbation(NamedTuple):
    x_adv: torch.Tensor  # (B, C, H, W) in [0, 1]
    eps: torch.Tensor  # (B,) the budget each example was attacked within


StepStats = dict[str, torch.Tensor]  # batch means, detached; 'loss' always present


@dataclass(frozen=True)
class NoConfig(DefenseConfig):
    """A defense without hyperparameters."""


@dataclass(frozen=True)
class StepCost:
    """The compute model of one training step, per example (harness.reporting.compute turns it into a floor).

    Forward-equivalents count a forward pass as 1, a backward pass to the input only as 1 and a full
    backward (input and weights) as 2, so a clean SGD step is 3 and an attack step with input gradients
    only is 2 (docs/recipes.md, "Compute conventions"). `assumption` states the count's reasoning; where a
    method's cost varies, the count is a lower bound and says so."""

    forward_equivalents: float
    assumption: str


def configured_steps(config: Mapping[str, Any], default: int = 10) -> int:
    """A recorded config's attack steps (`steps`); `default` when the record does not hold a positive one."""
    value = config.get("steps")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


class Defense(abc.ABC):
    name: ClassVar[str] = ""  # the registry name, set by `register_defense`
    label: ClassVar[str] = ""  # the name the report shows (the paper's); default: `name`
    Config: ClassVar[type[DefenseConfig]] = NoConfig
    replays: int = 1
    reference_schedule: ClassVar[Schedule | None] = None  # the authors' schedule (`--preset reference`)
    # the authors' settings, compared with every run (harness.core.protocol); None: no published reference code
    reference_protocol: ClassVar[ReferenceProtocol | None] = None
    # Whether one run may train on several processes (`harness.scale.distributed`): the defense's losses are
    # batch means of per-example terms, its train-mode control flow agrees across ranks, and its only
    # cross-batch state is `per_example_state`. Opt-in, so a new defense is refused until checked.
    distributed_ready: ClassVar[bool] = False

    def __init__(self, config: Any, context: DefenseContext):
        self.config = config
        self.context = context

    @classmethod  # noqa: B027  (an optional hook: default accept)
    def check_spec(cls, spec: Any) -> None:
        """Reject hyperparameters that are wrong only together with the run (its eps, the model's
        dropout): raise `HarnessError`. `make_spec` calls this before any training; default: accept."""

    @classmethod
    def held_out_size(cls, config: Any, train_size: int) -> int:
        """Training examples the runner should withhold into `DefenseContext.held_out`; default none."""
        return 0

    @classmethod
    def step_cost(cls, config: Mapping[str, Any]) -> StepCost | None:
        """The forward-equivalents of one training step per example under `config` (a run record's
        `defense.config`, possibly missing keys), for the report's compute floor. Default None: no cost
        model, so the report shows "?" and computes no floor."""
        return None

    def setup(self, model: nn.Module) -> None:  # noqa: B027  (an optional hook: default nothing)
        """Create own parameters or per-example state; called once before training or resume."""

    def start_epoch(self, epoch: int) -> None:  # noqa: B027  (an optional hook: default nothing)
        """Called before each pass over the data."""

    @abc.abstractmethod
    def perturb(self, model: nn.Module, batch: Batch) -> Perturbation:
        """The adversarial examples this defense trains on for `batch` (no parameter update)."""

    @abc.abstractmethod
    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> StepStats:
        """One minibatch: attack, loss, backward, optimizer step(s). Returns detached batch means."""

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        return {}

    def per_example_state(self) -> list[torch.Tensor]:
        """Tensors whose row i belongs to training example i (merged across ranks after every pass)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state but the checkpoint has {sorted(state)}")

    def record(self) -> dict[str, Any]:
        """The resolved configuration stored in the run record."""
        return {"name": self.name, "config": to_jsonable(self.config), "replays": self.replays}


class PerExampleEps(Defense):
    """A defense that remembers each training example's eps across epochs (MMA, IAAT).

    The state is a (train_size,) tensor indexed by `Batch.index`, created in `setup` and saved in
    checkpoints so `--resume` continues with the same margins.
    """

    eps_state: torch.Tensor

    def setup(self, model: nn.Module) -> None:  # noqa: B027  (an optional hook: default nothing)
        self.eps_state = torch.zeros(self.context.train_size, device=self.context.device)

    def per_example_state(self) -> list[torch.Tensor]:
        return [self.eps_state]

    def state_dict(self) -> dict[str, Any]:
        return {"eps": self.eps_state.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        eps = state["eps"]
        if eps.shape != (self.context.train_size,):
            raise ValueError(
                f"{self.name}: checkpoint eps has shape {tuple(eps.shape)}, expected ({self.context.train_size},)"
            )
        self.eps_state = eps.to(self.context.device).clone()

    def eps_statistics(self, upper: float) -> dict[str, Any]:
        """Contract-A statistics of the remembered eps over [0, upper], and the share at zero."""
        from harness.training.eps_stats import eps_summary

        eps = self.eps_state.float()
        return {
            **eps_summary(eps, 0.0, upper),
            "eps_max": eps.max().item(),
            "frac_zero": (eps == 0).float().mean().item(),
        }


DEFENSES: Registry[type[Defense]] = Registry("defense", plugins="methods")  # methods/: the plugin list


def register_defense(name: str):
    def decorate(cls: type[Defense]) -> type[Defense]:
        cls.name = name
        if "label" not in vars(cls):  # not inherited: ades-joint is not "ADES"
            cls.label = name
        DEFENSES.add(name, cls)
        return cls

    return decorate


def sgd_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """zero_grad, backward, step: through `harness.training.precision` so fp16 runs get their loss scaling."""
    optimizer.zero_grad(set_to_none=True)
    precision.backward(loss)
    precision.step(optimizer)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == y).float().mean().detach()


def clean_then_adversarial_logits(
    model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train-mode logits on x, then on x_adv: the order of TRADES' and MART's reference code, so
    BatchNorm's running statistics see the clean batch first."""
    model.train()
    return model(x), model(x_adv)


def adversarial_ce_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x_adv: torch.Tensor, y: torch.Tensor
) -> StepStats:
    """The outer minimisation of PGD-AT and its relatives: CE on the adversarial batch, train mode."""
    model.train()
    logits = model(x_adv)
    loss = F.cross_entropy(logits, y)
    sgd_step(optimizer, loss)
    return {"loss": loss.detach(), "adv_acc": accuracy(logits, y)}
