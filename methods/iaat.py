"""IAAT: instance adaptive adversarial training, a per-example eps grown while the example stays robust.

Paper: Balaji, Goldstein, Hoffman, "Instance adaptive adversarial training: Improved accuracy
tradeoffs in neural nets", arXiv:1910.08051, 2019 (the adaptive-eps training algorithm).
Reference code: yogeshbalaji/Instance_Adaptive_Adversarial_Training, trainers/trainer_adaptive.py
(TrainerAdaptive.epsilon_select, train), attacks/pgd_adaptive.py, configs/train_adaptive.json.

Per minibatch (reference facts; `Config` holds each one):
- Warm-up epochs: eps_i = eps (8/255) if the example is classified correctly, else 0.
- Afterwards, from the remembered eps_prev: attack at eps_prev and at eps_prev + gamma
  (gamma = 1.9/255); the proposal is eps_prev + gamma if the example is still classified correctly
  there, eps_prev if only at eps_prev, else eps_prev - gamma; times 0 for a clean misclassification;
  clamped at 0; then smoothed: eps_i = beta * proposal + (1 - beta) * eps_prev, beta = 0.1. So a
  misclassified example's eps decays geometrically (x0.9 per visit) rather than jumping to 0.
- Training: CE on PGD-10 examples at eps_i, step max(eps_i / 5, 2/255), uniform random start.
  Every forward pass (correctness check, the two probing attacks, the training attack) runs in
  train mode: the reference never switches the model to eval during training (`attack_bn`).
  Cost after warm-up: three PGD-10 attacks per batch, about 3x PGD-AT.
- The eps memory starts at 0 and is saved with the checkpoint (the reference does the same).

Choices made here: step sizes relative to the run's eps (2/255 = eps / 4, gamma = 1.9/255 =
0.2375 * eps); warm-up as a fraction of the run's epochs, 10/110 (the reference warms up 10 of its
110 epochs), resolved to max(1, round(fraction * epochs)) epochs and recorded; our PGD projects
its random start into [0, 1] before the first step (the reference clamps only after each step).
Reference schedule (differs from the paper under test's): models.WRN(depth=32, width=10), 110 epochs, batch 256,
lr 0.1 x0.2 at epochs 70, 90 and 100, wd 5e-4, momentum 0.9. See `IAAT.reference_schedule`.
Shapes: x (B, C, H, W) in [0, 1], y (B,), index (B,).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from harness.core.config import Schedule, to_jsonable
from harness.core.defense import (
    PerExampleEps,
    Perturbation,
    StepCost,
    adversarial_ce_step,
    configured_steps,
    register_defense,
)
from harness.core.pgd import model_mode, pgd
from harness.core.protocol import (
    INPUT_RAW,
    OUR_SELECTION,
    PAPER_INPUT,
    PAPER_SCHEDULE,
    ReferenceProtocol,
    Setting,
    schedule_settings,
)
from harness.core.validation import DefenseConfig, at_least, between, non_negative, positive, rules


@dataclass(frozen=True)
class IAATConfig(DefenseConfig):
    eps_rel: float = 1.0  # warm-up budget = eps_rel * eps (attack_eps 8/255)
    gamma_rel: float = 0.2375  # eps step = 1.9/255 at 8/255
    beta: float = 0.1  # eps <- beta * proposal + (1 - beta) * eps_prev
    warmup_frac: float = 10 / 110  # warm-up epochs as a fraction of the run (10 of 110)
    steps: int = 10
    step_per_eps: float = 0.2  # step = max(step_per_eps * eps_i, step_min_rel * eps); eps_i / (0.5 steps)
    step_min_rel: float = 0.25  # 2/255 at 8/255 (attack_lr)
    attack_bn: Literal["train", "eval"] = "train"
    RULES = rules(
        eps_rel=positive,
        gamma_rel=positive,
        beta=between(0, 1, low_open=True),
        warmup_frac=between(0, 1),
        steps=at_least(1),
        step_per_eps=non_negative,
        step_min_rel=positive,
    )


@register_defense("iaat")
class IAAT(PerExampleEps):
    """IAAT (Balaji et al. 2019): per-example eps raised while robust, lowered when not, PGD-10 CE."""

    Config = IAATConfig
    label = "IAAT"

    @classmethod
    def step_cost(cls, config: Mapping[str, Any]) -> StepCost:
        k = configured_steps(config)
        return StepCost(3 * 2 * k + 3, f"about 3 PGD-{k} attacks per batch (docs/recipes.md) + training step")

    distributed_ready = True  # harness.scale.distributed: batch-mean losses, rank-agreeing control flow
    # yogeshbalaji/Instance_Adaptive_Adversarial_Training configs/train_adaptive.json and
    # trainers/trainer_adaptive.py: WRN (depth 32, width 10 as named there), 110 epochs, batch 256,
    # lr 0.1 x0.2 at epochs 70, 90 and 100, wd 5e-4.
    reference_schedule: ClassVar[Schedule] = Schedule(
        epochs=110,
        batch_size=256,
        lr=0.1,
        lr_milestones=(70 / 110, 90 / 110, 100 / 110),
        lr_decay=0.2,
        weight_decay=5e-4,
    )
    reference_protocol: ClassVar[ReferenceProtocol] = ReferenceProtocol(
        "yogeshbalaji/Instance_Adaptive_Adversarial_Training trainers/trainer_adaptive.py, configs/train_adaptive.json",
        (
            Setting("spec.eps", "8/255"),
            Setting("config.gamma_rel", 0.2375, "gamma 1.9/255"),
            Setting("config.beta", 0.1),
            Setting("config.warmup_frac", 10 / 110),
            Setting("config.steps", 10),
            Setting("config.attack_bn", "train", "the model is never switched to eval while training"),
            *schedule_settings(reference_schedule, PAPER_SCHEDULE),
            Setting("derived.input", INPUT_RAW, PAPER_INPUT + " (the reference transforms add no Normalize)"),
            Setting("derived.architecture", "wrn-34-10", "models.WRN(depth=32, width=10)"),
            Setting("derived.checkpoint", "last", OUR_SELECTION),
        ),
    )

    def __init__(self, config: IAATConfig, context):
        super().__init__(config, context)
        self.epoch = 0

    # ---------------------------------------------------------------- resolved values

    @property
    def warmup_epochs(self) -> int:
        return max(1, round(self.config.warmup_frac * self.context.epochs))

    @property
    def gamma(self) -> float:
        return self.config.gamma_rel * self.context.eps_float

    @property
    def in_warmup(self) -> bool:
        return self.epoch < self.warmup_epochs

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # ---------------------------------------------------------------- eps selection

    def _attack(self, model, x, y, eps: torch.Tensor) -> torch.Tensor:
        cfg, nominal = self.config, self.context.eps_float
        step = (cfg.step_per_eps * eps).clamp(min=cfg.step_min_rel * nominal)
        return pgd(model, x, y, eps, steps=cfg.steps, step_size=step, mode=cfg.attack_bn)

    @torch.no_grad()
    def _correct(self, model, x, y) -> torch.Tensor:
        with model_mode(model, self.config.attack_bn):
            return (model(x).argmax(1) == y).float()

    def select_eps(self, model, batch) -> torch.Tensor:
        """Each example's eps for this visit (not stored: `train_step` stores it)."""
        x, y = batch.x, batch.y
        correct = self._correct(model, x, y)
        if self.in_warmup:
            return self.config.eps_rel * self.context.eps_float * correct
        prev = self.eps_state[batch.index]
        high = prev + self.gamma
        robust_cur = self._correct(model, self._attack(model, x, y, prev), y)
        robust_high = self._correct(model, self._attack(model, x, y, high), y)
        proposal = torch.where(robust_high.bool(), high, torch.where(robust_cur.bool(), prev, prev - self.gamma))
        proposal = (proposal * correct).clamp(min=0)
        return self.config.beta * proposal + (1 - self.config.beta) * prev

    def perturb(self, model, batch):
        """PGD-10 at the eps this visit would select; the eps memory is left untouched."""
        eps = self.select_eps(model, batch)
        return Perturbation(self._attack(model, batch.x, batch.y, eps), eps)

    # ---------------------------------------------------------------- training

    def train_step(self, model, optimizer, batch):
        eps = self.select_eps(model, batch)
        self.eps_state[batch.index] = eps
        x_adv = self._attack(model, batch.x, batch.y, eps)
        stats = adversarial_ce_step(model, optimizer, x_adv, batch.y)
        return {**stats, "eps_mean": eps.mean(), "eps_zero": (eps == 0).float().mean()}

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        upper = max(self.eps_state.max().item(), self.config.eps_rel * self.context.eps_float)
        return {**self.eps_statistics(upper=upper), "warmup": epoch < self.warmup_epochs}

    def record(self) -> dict[str, Any]:
        return {
            **super().record(),
            "attack_bn": self.config.attack_bn,
            "warmup_epochs": self.warmup_epochs,
            "gamma": self.gamma,
            "warmup_eps": self.config.eps_rel * self.context.eps_float,
            "reference_schedule": to_jsonable(self.reference_schedule),
        }
