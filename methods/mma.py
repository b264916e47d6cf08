"""MMA: max-margin adversarial training with a per-example eps found by AN-PGD and bisection.

Paper: Ding, Sharma, Lui, Huang, "MMA Training: Direct Input Space Margin Maximization through
Adversarial Training", ICLR 2020. The MMA loss L^MMA = sum over correctly classified examples whose
margin is below d_max of CE(x + delta*, y) + sum over misclassified examples of CE(x, y), where
delta* is the shortest successful perturbation found by AN-PGD (adaptive-norm PGD); trained with the
combined loss L^CB = (1/3) CE(clean) + (2/3) L^MMA.
Reference code: BorealisAI/mma_training, anpgd.py (AN-PGD, bisection_search), trainer.py
(Trainer.train_one_batch, get_eps/update_eps), config.py and train.py (defaults).

Per minibatch (reference facts; `Config` holds each one):
1. Clean forward in train mode; "correct" means soft logit margin < 0 (logsumexp of the other
   logits minus the true logit), which is stricter than argmax correctness.
2. Correct examples: eps_prev = max(min_eps, eps remembered from the example's last visit);
   PGD-10 on the soft logit margin at eps_prev (step 2.5 * eps_prev / 10, uniform random start,
   BatchNorm in eval mode, `attack_bn`); the unit direction u = (x_adv - x) / eps_prev.
3. 10 bisection steps along u over [0, 1.05 * d_max], starting from eps_prev and the margin at
   x_adv; the result is the last midpoint (the reference does not re-check it). The reference runs
   the bisection with the model still in train mode (`search_bn = "train"`: batch statistics of
   the bisection inputs, running statistics updated), so that is the default here.
4. Loss: (sum of CE(x + eps* u) over correct examples with eps* < d_max  +  sum of CE(x) over
   misclassified ones) / B, mixed (2/3) with (1/3) mean clean CE. The reference adds the two
   weighted gradients; one backward through the weighted sum of losses gives the same gradient.
5. The example's eps becomes eps* (0 if misclassified); stored per training index.

Defaults: d_max = 1.5 * eps (MMA-12 at the CIFAR budget 8/255; the paper also trains MMA-20
and MMA-32: `--set d_max_rel=2.5` / `4.0`); min_eps = 0.005 at 8/255, i.e. 0.159375 * eps.
Choices made here: x + eps* u is clamped to [0, 1] (the reference feeds it unclamped; its L-inf
distance never exceeds eps*); eps is remembered in a tensor indexed by `Batch.index` and saved
with the checkpoint (the reference keeps a Python dict, lost on restart).
Reference schedule (differs from the paper under test's 100 epochs, lr 0.1): WRN-28-4,
45k/5k train/validation split, 50,000 SGD steps of batch 128 (about 142 epochs), lr 0.3 -> 0.09 ->
0.03 -> 0.009 at steps 20k/30k/40k, wd 2e-4, momentum 0.9; checkpoint chosen by the best average
validation eps (not validation PGD accuracy). See `MMA.reference_schedule`.
Shapes: x (B, C, H, W) in [0, 1], y (B,), index (B,).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from harness.core.config import Schedule, to_jsonable
from harness.core.defense import (
    PerExampleEps,
    Perturbation,
    StepCost,
    accuracy,
    configured_steps,
    register_defense,
    sgd_step,
)
from harness.core.pgd import model_mode, per_sample, pgd
from harness.core.protocol import (
    INPUT_PER_IMAGE,
    OUR_SELECTION,
    PAPER_SCHEDULE,
    ReferenceProtocol,
    Setting,
    schedule_settings,
)
from harness.core.validation import DefenseConfig, at_least, between, positive, require, rules
from harness.scale.distributed import any_rank


def soft_logit_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample logsumexp of the other classes' logits minus the true logit (< 0: correct)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return torch.logsumexp(others, dim=1) - true


@torch.no_grad()
def bisect_margin(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    direction: torch.Tensor,
    eps_start: torch.Tensor,
    margin_start: torch.Tensor,
    eps_max: float,
    steps: int,
    margin_fn=soft_logit_margin,
) -> torch.Tensor:
    """Smallest eps along `direction` at which `margin_fn` turns non-negative, by bisection.

    The bracket starts as [0, eps_max]; each step first narrows it with the margin at the current
    eps (fooled: upper end, not fooled: lower end), then moves to its midpoint and evaluates
    there. Returns the last midpoint, as AN-PGD does. Runs in whatever mode the model is in.
    """
    lo = torch.zeros_like(eps_start)
    hi = torch.full_like(eps_start, eps_max)
    eps, margin = eps_start, margin_start
    for _ in range(steps):
        fooled = margin >= 0
        lo = torch.where(fooled, lo, torch.maximum(lo, eps))
        hi = torch.where(fooled, torch.minimum(hi, eps), hi)
        eps = (lo + hi) / 2
        margin = margin_fn(model((x + per_sample(eps, x) * direction).clamp(0, 1)), y)
    return eps


@dataclass(frozen=True)
class MMAConfig(DefenseConfig):
    d_max_rel: float = 1.5  # hinge d_max = d_max_rel * eps (12/255 at 8/255: MMA-12)
    search_max_factor: float = 1.05  # bisection bracket [0, 1.05 * d_max] (train.py attack_maxeps)
    min_eps_rel: float = 0.159375  # eps_prev floor = 0.005 at 8/255 (config.py attack_mineps)
    steps: int = 10  # AN-PGD's PGD steps (nb_iter)
    step_scale: float = 2.5  # PGD step = step_scale * eps_prev / steps (eps_iter_scale)
    search_steps: int = 10  # bisection steps (num_search_steps)
    clean_loss_coeff: float = 1 / 3  # L^CB = c * clean CE + (1 - c) * L^MMA
    random_start: bool = True
    attack_bn: Literal["train", "eval"] = "eval"  # PGD in eval mode (ctx_noparamgrad_and_eval)
    search_bn: Literal["train", "eval"] = "train"  # bisection outside that context in the reference
    RULES = rules(
        d_max_rel=positive,
        search_max_factor=at_least(1),
        min_eps_rel=positive,
        steps=at_least(1),
        step_scale=positive,
        search_steps=at_least(1),
        clean_loss_coeff=between(0, 1),
    )

    def validate(self) -> None:
        """The eps floor must lie inside the bisection bracket."""
        bracket = self.d_max_rel * self.search_max_factor
        require(
            self.min_eps_rel <= bracket,
            "min_eps_rel",
            "<= d_max_rel * search_max_factor",
            f"{self.min_eps_rel:g} > {bracket:g}",
        )


@register_defense("mma")
class MMA(PerExampleEps):
    """MMA (Ding et al. 2020): per-example margins from AN-PGD + bisection, CE at the margin below d_max."""

    Config = MMAConfig
    label = "MMA"

    @classmethod
    def step_cost(cls, config: Mapping[str, Any]) -> StepCost:
        k = configured_steps(config)
        return StepCost(
            2 * k + 10 + 1 + 6,
            f"AN-PGD-{k} + 10 bisection forwards + clean forward + training on adversarial and clean inputs (rough)",
        )

    distributed_ready = True  # harness.scale.distributed: batch-mean losses, rank-agreeing control flow
    # BorealisAI/mma_training config.py (LinfCIFAR10), train.py: WRN-28-4 on a 45k/5k split,
    # 50k SGD steps of batch 128 (~142 epochs), lr 0.3 -> 0.09 -> 0.03 -> 0.009 at 40/60/80% of
    # training, wd 2e-4; the reference keeps the checkpoint with the highest mean validation eps.
    reference_schedule: ClassVar[Schedule] = Schedule(
        epochs=142,
        batch_size=128,
        lr=0.3,
        lr_milestones=(0.4, 0.6, 0.8),
        lr_values=(0.09, 0.03, 0.009),
        weight_decay=2e-4,
    )
    reference_protocol: ClassVar[ReferenceProtocol] = ReferenceProtocol(
        "BorealisAI/mma_training train.py, config.py, trainer.py, anpgd.py",
        (
            Setting("spec.eps", "8/255"),
            Setting("config.d_max_rel", 1.5, "MMA-12 (hinge 12/255); the paper also trains MMA-20 and MMA-32"),
            Setting("config.steps", 10),
            Setting("config.step_scale", 2.5),
            Setting("config.attack_bn", "eval", "ctx_noparamgrad_and_eval around the PGD"),
            Setting("config.search_bn", "train", "the bisection runs outside that context"),
            Setting("config.clean_loss_coeff", 1 / 3),
            *schedule_settings(reference_schedule, PAPER_SCHEDULE + "; the reference counts 50k SGD steps"),
            Setting(
                "derived.input", INPUT_PER_IMAGE, "advertorch's CIFAR WRN standardises each image; not offered here"
            ),
            Setting("derived.architecture", "wrn-28-4"),
            Setting("derived.checkpoint", "best mean validation eps", OUR_SELECTION),
        ),
    )

    # ---------------------------------------------------------------- resolved budgets

    @property
    def d_max(self) -> float:
        return self.config.d_max_rel * self.context.eps_float

    @property
    def search_max(self) -> float:
        return self.config.search_max_factor * self.d_max

    @property
    def min_eps(self) -> float:
        return self.config.min_eps_rel * self.context.eps_float

    # ---------------------------------------------------------------- AN-PGD

    def an_pgd(
        self, model, x: torch.Tensor, y: torch.Tensor, eps_prev: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x at the estimated margin along the PGD direction, that margin eps*) for correct examples."""
        cfg = self.config
        x_pgd = pgd(
            model,
            x,
            y,
            eps_prev,
            steps=cfg.steps,
            step_size=cfg.step_scale * eps_prev / cfg.steps,
            random_start=cfg.random_start,
            loss_fn=soft_logit_margin,
            mode=cfg.attack_bn,
        )
        direction = (x_pgd - x) / per_sample(eps_prev + 1e-12, x)
        with model_mode(model, cfg.search_bn), torch.no_grad():
            margin = soft_logit_margin(model(x_pgd), y)
            eps_star = bisect_margin(model, x, y, direction, eps_prev, margin, self.search_max, cfg.search_steps)
        return (x + per_sample(eps_star, x) * direction).clamp(0, 1).detach(), eps_star

    def _perturb_correct(
        self, model, batch, clean_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mixed inputs: adversarial where correct, clean elsewhere; eps per example; correct mask)."""
        correct = soft_logit_margin(clean_logits.detach(), batch.y) < 0
        x_mix = batch.x.clone()
        eps = batch.x.new_zeros(len(batch.y))
        if any_rank(correct):  # every rank, so global BatchNorm's collectives stay in step
            eps_prev = self.eps_state[batch.index[correct]].clamp(min=self.min_eps)
            x_mix[correct], eps[correct] = self.an_pgd(model, batch.x[correct], batch.y[correct], eps_prev)
        return x_mix, eps, correct

    def perturb(self, model, batch):
        """The inputs MMA trains on: x + eps* u for correct examples, x (eps 0) for the rest; state untouched."""
        with model_mode(model, "train"), torch.no_grad():
            clean_logits = model(batch.x)
        x_mix, eps, _ = self._perturb_correct(model, batch, clean_logits)
        return Perturbation(x_mix, eps)

    # ---------------------------------------------------------------- training

    def train_step(self, model, optimizer, batch):
        cfg = self.config
        model.train()
        clean_logits = model(batch.x)
        clean_loss = F.cross_entropy(clean_logits, batch.y)
        x_mix, eps, correct = self._perturb_correct(model, batch, clean_logits)
        model.train()
        logits = model(x_mix)
        per_example = F.cross_entropy(logits, batch.y, reduction="none")
        in_hinge = correct & (eps < self.d_max)
        mma_loss = (per_example * (in_hinge | ~correct)).sum() / len(batch.y)
        loss = cfg.clean_loss_coeff * clean_loss + (1 - cfg.clean_loss_coeff) * mma_loss
        sgd_step(optimizer, loss)
        self.eps_state[batch.index] = eps.detach()
        return {
            "loss": loss.detach(),
            "clean_loss": clean_loss.detach(),
            "mma_loss": mma_loss.detach(),
            "adv_acc": accuracy(logits, batch.y),
            "clean_acc": accuracy(clean_logits, batch.y),
            "margin_correct": correct.float().mean(),
            "in_hinge": in_hinge.float().mean(),
            "eps_mean": eps.mean(),
        }

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Statistics of the remembered eps over the training set (0 = misclassified at last visit)."""
        eps = self.eps_state
        return {
            **self.eps_statistics(upper=self.search_max),
            "frac_at_hinge": (eps >= self.d_max).float().mean().item(),
            "d_max": self.d_max,
        }

    def record(self) -> dict[str, Any]:
        return {
            **super().record(),
            "attack_bn": self.config.attack_bn,
            "search_bn": self.config.search_bn,
            "d_max": self.d_max,
            "search_max": self.search_max,
            "min_eps": self.min_eps,
            "reference_schedule": to_jsonable(self.reference_schedule),
        }
