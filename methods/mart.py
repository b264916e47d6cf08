"""MART: misclassification-aware adversarial training.

Paper: Wang et al., "Improving Adversarial Robustness Requires Revisiting Misclassified Examples",
ICLR 2020, the MART objective (section 3):
    L = BCE(p(x'), y) + beta * (1/B) sum_i KL(p(x_i) || p(x'_i)) * (1 - p_y(x_i)),
    BCE(p(x'), y) = -log p_y(x') - log(1 - max_{k != y} p_k(x')),
where x' is a cross-entropy PGD example. The KL term is weighted per example by how badly the clean
input is classified, so misclassified examples are regularised hardest.
Reference code: YisenWang/MART, mart.py (`mart_loss`) and train_wideresnet.py.

Facts from the reference, kept here:
- Attack: BatchNorm in eval mode; start at x + 0.001 * N(0, 1); 10 signed steps of 0.007 at eps 0.031
  (step_size_rel = 0.007 / 0.031) on cross-entropy; projected and clamped to [0, 1] after each step
  (the Gaussian start is projected before the first step here).
- Loss (train mode, clean forward before the adversarial one): CE(x') + mean_i -log(1.0001 -
  p'_{k_i}) with k_i the most probable wrong class on x'; KL(p(x) || p(x')) summed over classes, times
  the per-example weight (1.0000001 - p_y(x)), averaged over the batch; beta = 6. The reference's
  numerical constants (1.0001, 1e-12 inside the logs, 1.0000001) are kept. Neither p(x) in the KL nor
  the weight is detached, as in the reference.
- Schedules: the `paper` preset trains MART with the paper under test's schedule (wd 5e-4). The authors'
  schedule is `MART.reference_schedule`: 90 epochs, SGD momentum 0.9, lr 0.1 x0.1 from epoch 75 and
  again from epoch 90 (1-indexed), weight decay 7e-4, batch 128, WRN-34-10 (an earlier version of the
  script used 76 epochs and wd 2e-4; the ResNet-18 script uses wd 3.5e-3).
Shapes: x (B, C, H, W) in [0, 1], y (B,).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F

from harness.core.config import Schedule
from harness.core.defense import (
    Defense,
    Perturbation,
    StepCost,
    accuracy,
    clean_then_adversarial_logits,
    configured_steps,
    register_defense,
    sgd_step,
)
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
from harness.core.validation import DefenseConfig, at_least, non_negative, positive, rules

LOG_FLOOR = 1e-12  # added inside logs of probabilities, as in the reference
BOOST_OFFSET = 1.0001  # -log(1.0001 - p) stays finite when a wrong class takes all the mass
WEIGHT_OFFSET = 1.0000001  # the reference's 1 - p_y, kept strictly positive


@dataclass(frozen=True)
class MARTConfig(DefenseConfig):
    beta: float = 6.0
    steps: int = 10
    step_size_rel: float = 0.007 / 0.031  # step = step_size_rel * eps (0.007 at eps 0.031)
    init_noise: float = 0.001  # std of the Gaussian start, in pixel units (not scaled with eps)
    attack_bn: Literal["train", "eval"] = "eval"
    RULES = rules(beta=non_negative, steps=at_least(1), step_size_rel=positive, init_noise=non_negative)


class MARTLoss(NamedTuple):
    total: torch.Tensor
    boosted_ce: torch.Tensor  # BCE on x', batch mean
    weighted_kl: torch.Tensor  # mean_i KL_i * (1 - p_y(x_i))


def strongest_wrong_class(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) the most probable class other than the true one."""
    return logits.scatter(1, y[:, None], float("-inf")).argmax(1)


def misclassification_weight(clean_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) 1 - p_y(x): near 0 for confidently correct examples, near 1 for misclassified ones."""
    return WEIGHT_OFFSET - F.softmax(clean_logits, dim=1).gather(1, y[:, None]).squeeze(1)


def mart_loss(clean_logits: torch.Tensor, adv_logits: torch.Tensor, y: torch.Tensor, beta: float) -> MARTLoss:
    adv_p = F.softmax(adv_logits, dim=1)
    wrong = strongest_wrong_class(adv_logits, y)
    boost = -torch.log(BOOST_OFFSET - adv_p.gather(1, wrong[:, None]).squeeze(1) + LOG_FLOOR)
    boosted_ce = F.cross_entropy(adv_logits, y) + boost.mean()
    clean_p = F.softmax(clean_logits, dim=1)
    kl = (torch.xlogy(clean_p, clean_p) - clean_p * torch.log(adv_p + LOG_FLOOR)).sum(1)
    weighted_kl = (kl * misclassification_weight(clean_logits, y)).mean()
    return MARTLoss(boosted_ce + beta * weighted_kl, boosted_ce, weighted_kl)


@register_defense("mart")
class MART(Defense):
    """MART (Wang et al. 2020): boosted CE on PGD examples + KL weighted per example by 1 - p_y(x)."""

    Config = MARTConfig
    label = "MART"

    @classmethod
    def step_cost(cls, config: Mapping[str, Any]) -> StepCost:
        k = configured_steps(config)
        return StepCost(2 * k + 6, f"PGD-{k} + training forward/backward on clean and adversarial inputs")

    distributed_ready = True  # harness.scale.distributed: batch-mean losses, rank-agreeing control flow
    reference_schedule: ClassVar[Schedule] = Schedule(
        epochs=90,
        batch_size=128,
        lr=0.1,
        lr_milestones=(74 / 90, 89 / 90),
        lr_decay=0.1,
        momentum=0.9,
        weight_decay=7e-4,
    )
    reference_protocol: ClassVar[ReferenceProtocol] = ReferenceProtocol(
        "YisenWang/MART train_wideresnet.py, mart.py",
        (
            Setting("spec.eps", "0.031", PAPER_EPS),
            Setting("config.steps", 10),
            Setting("config.step_size_rel", 0.007 / 0.031, "0.007 at 0.031"),
            Setting("config.init_noise", 0.001, "x + 0.001 N(0, 1)"),
            Setting("config.attack_bn", "eval", "model.eval() in mart_loss"),
            Setting("config.beta", 6.0),
            *schedule_settings(reference_schedule, PAPER_SCHEDULE),
            Setting("derived.input", INPUT_RAW, PAPER_INPUT),
            Setting("derived.architecture", "wrn-34-10"),
            Setting("derived.checkpoint", "last", OUR_SELECTION),
        ),
    )

    def perturb(self, model, batch):
        cfg, eps = self.config, self.context.eps_float
        x_adv = pgd(
            model,
            batch.x,
            batch.y,
            eps,
            steps=cfg.steps,
            step_size=cfg.step_size_rel * eps,
            mode=cfg.attack_bn,
            delta_init=cfg.init_noise * torch.randn_like(batch.x),
        )
        return Perturbation(x_adv, batch.x.new_full((len(batch.y),), eps))

    def train_step(self, model, optimizer, batch):
        x_adv = self.perturb(model, batch).x_adv
        clean_logits, adv_logits = clean_then_adversarial_logits(model, batch.x, x_adv)
        loss = mart_loss(clean_logits, adv_logits, batch.y, self.config.beta)
        sgd_step(optimizer, loss.total)
        return {
            "loss": loss.total.detach(),
            "boosted_ce": loss.boosted_ce.detach(),
            "weighted_kl": loss.weighted_kl.detach(),
            "clean_acc": accuracy(clean_logits, batch.y),
            "adv_acc": accuracy(adv_logits, batch.y),
        }
