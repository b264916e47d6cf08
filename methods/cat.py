"""CAT: Curriculum Adversarial Training (Cai, Liu & Song, IJCAI 2018, arXiv 1805.04807).

The control the ADES paper cites ([4]) but never separates from per-sample scheduling: the attack
grows over training, identically for every example. Attack class A_k = PGD with k iterations at the
run's eps (A_0: the clean input). Algorithm (curriculum with batch mixing):

  for lesson l = 0, 1, ..., K:
      train on batches whose examples are split into l + 1 equal parts, part j attacked by A_j
      (batch mixing, the paper's remedy for forgetting weaker attacks) until the lesson ends.

Reference code: none found (docs/recipes.md: "curriculum over the number of PGD steps k (0..7), not over
eps; k grows when validation robustness stops improving"). Recorded choices:
- K = 7 (`max_steps`), step 2/255 at 8/255 (eps / 4), uniform random start, BatchNorm in train mode
  during the attack (as PGD-AT here). K and the step follow docs/recipes.md; the paper's own K could not be
  re-read here.
- Lesson boundaries: the paper moves to lesson l + 1 when the l-accuracy on validation data stops
  improving. Here the K + 1 lessons split the run's epochs evenly (lesson of epoch e =
  floor(e (K + 1) / epochs)): every defense gets the same SGD-step budget, and the validation split
  is reserved for choosing `best`. With fewer than K + 1 epochs some lessons are skipped (recorded
  per pass as `lesson`).
- One learning-rate schedule over the whole run (the harness protocol), not one per lesson.
- The paper's inference-time input quantization is not used: it changes the evaluated model and can
  mask gradients; CAT here is the training curriculum only.
Shapes: x (B, C, H, W) in [0, 1], y (B,).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from harness.core.defense import Defense, Perturbation, adversarial_ce_step, register_defense
from harness.core.pgd import pgd
from harness.core.validation import DefenseConfig, at_least, positive, rules


@dataclass(frozen=True)
class CATConfig(DefenseConfig):
    max_steps: int = 7  # K: the last lesson attacks with PGD-K
    step_size_rel: float = 0.25  # step = step_size_rel * eps (2/255 at 8/255)
    batch_mixing: bool = True  # lesson l: parts attacked by A_0..A_l; False: the whole batch by A_l
    random_start: bool = True
    attack_bn: Literal["train", "eval"] = "train"
    RULES = rules(max_steps=at_least(1), step_size_rel=positive)


def lesson_for(epoch: int, epochs: int, max_steps: int) -> int:
    """The lesson of (0-based) epoch `epoch`: K + 1 lessons over `epochs`, evenly."""
    return min(max_steps, epoch * (max_steps + 1) // max(epochs, 1))


def mixed_steps(batch_size: int, lesson: int, mixing: bool) -> torch.Tensor:
    """(B,) PGD iterations per example: l + 1 near-equal parts with 0..l iterations, or all l."""
    if not mixing:
        return torch.full((batch_size,), lesson, dtype=torch.long)
    return torch.arange(batch_size) * (lesson + 1) // batch_size


@register_defense("cat")
class CAT(Defense):
    """CAT (Cai et al. 2018): PGD-k adversarial training, k growing by lessons 0..K, batch mixing."""

    Config = CATConfig
    label = "CAT"

    @classmethod
    def step_cost(cls, config: Mapping[str, Any]) -> None:
        """No cost model: the attack's steps grow lesson by lesson and, with batch mixing, differ within a
        batch, so no single count is stated (the report shows "?")."""
        return None

    def __init__(self, config: CATConfig, context):
        super().__init__(config, context)
        self.lesson = 0

    def start_epoch(self, epoch: int) -> None:
        self.lesson = lesson_for(epoch, self.context.epochs, self.config.max_steps)

    def perturb(self, model, batch):
        cfg = self.config
        eps = self.context.eps_float
        steps = mixed_steps(len(batch.y), self.lesson, cfg.batch_mixing).to(batch.y.device)
        x_adv = batch.x.clone()
        for k in steps.unique().tolist():
            part = steps == k
            if k > 0:  # A_0 is the clean input
                x_adv[part] = pgd(
                    model,
                    batch.x[part],
                    batch.y[part],
                    eps,
                    steps=k,
                    step_size=cfg.step_size_rel * eps,
                    random_start=cfg.random_start,
                    mode=cfg.attack_bn,
                )
        return Perturbation(x_adv, eps * (steps > 0).to(batch.x.dtype))  # A_0's part is not attacked: eps 0

    def train_step(self, model, optimizer, batch):
        return adversarial_ce_step(model, optimizer, self.perturb(model, batch).x_adv, batch.y)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        top = self.lesson
        return {"lesson": top, "pgd_steps": list(range(top + 1)) if self.config.batch_mixing else [top]}
