"""FAT (for AT): friendly adversarial training with early-stopped PGD.

Paper: Zhang et al., "Attacks Which Do Not Kill Training Make Adversarial Learning Stronger", ICML 2020,
Algorithm 1 (early-stopped PGD-K-tau) inside the min-min objective of eq. (3): train on adversarial data
that is misclassified but only just, instead of the loss-maximising one.
Reference code: zjfheart/Friendly-Adversarial-Training, earlystop.py (`earlystop`) and FAT.py.

Facts from the reference, kept here:
- Early-stopped PGD: BatchNorm in eval mode; uniform random start in the eps ball, clamped to [0, 1];
  at most K = 10 signed CE steps of 0.007 at eps 0.031 (step_size_rel = 0.007 / 0.031). Before every
  step each example is classified at its current iterate (the same forward pass the gradient comes
  from): a misclassified example with budget 0 stops for good; a misclassified example with budget
  left spends one unit and steps on; a correctly classified one steps on. So an example stops tau
  steps after it is first misclassified (if it is classified correctly again in between, its
  countdown pauses, as in the reference). Each step adds omega * N(0, 1) noise (omega = 0.001) before
  projection. Loss: CE on the friendly adversarial examples, train mode.
- tau schedule (the reference's `dynamictau`): tau = 0 up to epoch 50, 1 up to epoch 90, 2 after
  (1-indexed, of 120). Here it is `taus` switched at `tau_milestones`, fractions of the run's epochs
  (50/120, 90/120), so short runs scale; the resolved schedule is in the run record
  (`defense.tau_schedule`, 1-indexed `from_epoch`) and each epoch's tau in its diagnostics. Every
  commit of FAT.py (f8c0cd6 to 9f80216) trains 120 epochs with these switches. A fixed tau:
  `--set taus=1 --set tau_milestones=`.
- Choice: stopped examples stay in the batch with a zero step (the reference removes them and runs
  the remaining steps on the smaller batch); results are identical since BatchNorm is in eval mode,
  but each remaining step costs a full batch. The attack ends as soon as every example has stopped.
  `mean_steps` in the epoch diagnostics is the reference's "BP average" (steps per example).
- Schedules: the `paper` preset trains FAT with the paper under test's schedule. The authors' is
  `FAT.reference_schedule` (FAT.py `adjust_learning_rate`): 120 epochs, SGD momentum 0.9, lr 0.1, 0.01
  from epoch 60, 0.001 from epoch 90, 0.0005 from epoch 110 (1-indexed; explicit `lr_values`),
  weight decay 2e-4, batch 128, WRN-32-10 (= WRN-34-10), raw [0, 1] input.
Shapes: x (B, C, H, W) in [0, 1], y (B,).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from harness.core.config import Schedule
from harness.core.defense import Defense, Perturbation, StepCost, adversarial_ce_step, register_defense
from harness.core.pgd import pgd
from harness.core.protocol import (
    INPUT_RAW,
    OUR_SELECTION,
    PAPER_EPS,
    PAPER_INPUT,
    PAPER_SCHEDULE,
    ReferenceProtocol,
    Setting,
    schedule_settings,
)
from harness.core.validation import DefenseConfig, at_least, between, increasing, non_negative, positive, require, rules
from harness.scale.distributed import sum_over_processes


@dataclass(frozen=True)
class FATConfig(DefenseConfig):
    steps: int = 10  # K, the most steps an example takes
    step_size_rel: float = 0.007 / 0.031  # step = step_size_rel * eps (0.007 at eps 0.031)
    taus: tuple[int, ...] = (0, 1, 2)  # tau in force before the first milestone, after it, ...
    tau_milestones: tuple[float, ...] = (50 / 120, 90 / 120)  # fractions of the run's epochs
    omega: float = 0.001  # std of the noise added to every step, in pixel units
    random_start: bool = True  # uniform in the eps ball, as the reference's FAT.py
    attack_bn: Literal["train", "eval"] = "eval"
    RULES = rules(
        steps=at_least(1),
        step_size_rel=positive,
        taus=non_negative,
        tau_milestones=(between(0, 1), increasing),
        omega=non_negative,
    )

    def validate(self) -> None:
        """One tau per stretch between milestones."""
        require(
            len(self.taus) == len(self.tau_milestones) + 1,
            "taus",
            "one more than tau_milestones",
            f"taus={self.taus} and tau_milestones={self.tau_milestones}",
        )

    def tau_at(self, epoch: int, epochs: int) -> int:
        """tau for 0-indexed `epoch` of `epochs` (120 epochs: 0 for 0..49, 1 for 50..89, 2 after)."""
        return self.taus[sum(epoch >= m * epochs for m in self.tau_milestones)]


class EarlyStop:
    """FAT's per-example stopping rule, as a `keep_stepping` filter for the shared `pgd`.

    Each call sees the logits at the current iterates; returns which examples take this step.
    """

    def __init__(self, y: torch.Tensor, tau: int):
        self.budget = torch.full_like(y, tau)
        self.stopped = torch.zeros_like(y, dtype=torch.bool)
        self.steps_taken = torch.zeros_like(y)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        wrong = (logits.argmax(1) != y) & ~self.stopped
        stop_now = wrong & (self.budget == 0)
        self.budget -= (wrong & ~stop_now).long()
        self.stopped |= stop_now
        moving = ~self.stopped
        self.steps_taken += moving.long()
        return moving


@register_defense("fat")
class FAT(Defense):
    """FAT for AT (Zhang et al. 2020): CE on early-stopped PGD examples, tau rising over training."""

    Config = FATConfig
    label = "FAT"

    @classmethod
    def step_cost(cls, config: Mapping[str, Any]) -> StepCost:
        return StepCost(
            5, "early-stopped PGD: at least one attack step + training step (a lower bound; at most 23 with PGD-10)"
        )

    # harness.scale.distributed: early stopping is per example and its loop ends on every rank together
    # (`any_rank`); the mean-steps diagnostic is summed over ranks. Step noise is drawn per rank.
    distributed_ready = True
    reference_schedule: ClassVar[Schedule] = Schedule(
        epochs=120,
        batch_size=128,
        lr=0.1,
        lr_milestones=(59 / 120, 89 / 120, 109 / 120),
        lr_values=(0.01, 0.001, 0.0005),
        momentum=0.9,
        weight_decay=2e-4,
    )
    reference_protocol: ClassVar[ReferenceProtocol] = ReferenceProtocol(
        "zjfheart/Friendly-Adversarial-Training FAT.py, earlystop.py",
        (
            Setting("spec.eps", "0.031", PAPER_EPS),
            Setting("config.steps", 10),
            Setting("config.step_size_rel", 0.007 / 0.031, "0.007 at 0.031"),
            Setting("config.random_start", True, "uniform_randominit, clamped to [0, 1]"),
            Setting("config.omega", 0.001),
            Setting("config.taus", (0, 1, 2)),
            Setting("config.tau_milestones", (50 / 120, 90 / 120)),
            Setting("config.attack_bn", "eval", "model.eval() in earlystop"),
            *schedule_settings(reference_schedule, PAPER_SCHEDULE),
            Setting("derived.input", INPUT_RAW, PAPER_INPUT),
            Setting("derived.architecture", "wrn-34-10", "WRN_madry depth 32 (Madry's name for WRN-34-10)"),
            Setting("derived.checkpoint", "last", OUR_SELECTION),
        ),
    )

    def __init__(self, config, context):
        super().__init__(config, context)
        self.tau = config.tau_at(0, context.epochs)
        self._steps_sum: torch.Tensor | int = 0  # on the device until the epoch ends
        self._examples = 0

    def start_epoch(self, epoch):
        self.tau = self.config.tau_at(epoch, self.context.epochs)
        self._steps_sum, self._examples = 0, 0

    def perturb(self, model, batch):
        cfg, eps = self.config, self.context.eps_float
        stopper = EarlyStop(batch.y, self.tau)
        x_adv = pgd(
            model,
            batch.x,
            batch.y,
            eps,
            steps=cfg.steps,
            step_size=cfg.step_size_rel * eps,
            random_start=cfg.random_start,
            mode=cfg.attack_bn,
            keep_stepping=stopper,
            step_noise=cfg.omega,
        )
        self._steps_sum = self._steps_sum + stopper.steps_taken.sum()
        self._examples += len(batch.y)
        return Perturbation(x_adv, batch.x.new_full((len(batch.y),), eps))

    def train_step(self, model, optimizer, batch):
        x_adv = self.perturb(model, batch).x_adv
        return adversarial_ce_step(model, optimizer, x_adv, batch.y)

    def end_epoch(self, epoch):
        steps, examples = sum_over_processes(
            torch.as_tensor([float(self._steps_sum), float(self._examples)], device=self.context.device)
        ).tolist()
        return {"tau": self.tau, "mean_steps": steps / max(examples, 1)}

    def record(self) -> dict[str, Any]:
        epochs = self.context.epochs
        first = [1] + [math.ceil(m * epochs) + 1 for m in self.config.tau_milestones]  # 1-indexed
        return {
            **super().record(),
            "epochs": epochs,
            "tau_schedule": [{"from_epoch": e, "tau": t} for e, t in zip(first, self.config.taus)],
        }
