"""TRADES: clean cross-entropy plus beta times the KL divergence between clean and adversarial outputs.

Paper: Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy", ICML 2019,
eq. (5): min_f E[ CE(f(x), y) + beta * max_{x' in B(x, eps)} KL(f(x) || f(x')) ], f = softmax outputs.
Reference code: yaodongyu/TRADES, trades.py (`trades_loss`) and train_trades_cifar10.py.

Facts from the reference, kept here:
- Attack: BatchNorm in eval mode; start at x + 0.001 * N(0, 1); 10 signed steps of 0.007 at eps 0.031
  (step_size_rel = 0.007 / 0.031, so other data sets scale with eps) ascending the KL summed over the
  batch; project onto the eps ball and clamp to [0, 1] after every step. The Gaussian start is
  projected before the first step here (the reference clamps only after it; a 0.001-std start
  differs by at most 0.001 per pixel at the box edges).
- Loss (train mode): CE(f(x), y) + beta * sum_i KL_i / B, i.e. KL reduction 'batchmean': summed over
  classes, averaged over examples (PyTorch's 'mean' would silently divide beta by the number of
  classes). f(x) is not detached in the KL term, so its gradient also flows through the clean output.
- beta = 6 (the train script's default since the paper's CIFAR-10 results; beta = 1 is the paper's
  other setting).
- Choice: the clean logits the attack compares against are computed once per batch (eval mode,
  no gradient), not re-computed at every attack step as in the reference (identical values, as the
  model does not change during the attack); the training loss uses one train-mode clean forward
  for both the CE and the KL term (the reference runs it twice, which only updates BatchNorm's
  running statistics once more with the same batch).

Schedules: the `paper` preset trains TRADES with the paper under test's 100-epoch schedule (wd 5e-4).
The authors' own schedule is `TRADES.reference_schedule`: 76 epochs, SGD momentum 0.9, lr 0.1
x0.1 from epoch 75 (1-indexed), weight decay 2e-4, batch 128, WRN-34-10.
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
from harness.core.pgd import model_mode, pgd
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
from harness.core.validation import DefenseConfig, Rule, at_least, non_negative, positive, rules


@dataclass(frozen=True)
class TRADESConfig(DefenseConfig):
    beta: float = 6.0
    steps: int = 10
    step_size_rel: float = 0.007 / 0.031  # step = step_size_rel * eps (0.007 at eps 0.031)
    init_noise: float = 0.001  # std of the Gaussian start in pixel units; > 0 (KL's gradient vanishes at x)
    attack_bn: Literal["train", "eval"] = "eval"
    RULES = rules(
        beta=non_negative,
        steps=at_least(1),
        step_size_rel=positive,
        init_noise=Rule(
            "> 0", lambda v: v > 0, "the KL's gradient is zero at x' = x, so an attack started there never moves"
        ),
    )


def kl_per_example(clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """(B,) KL(softmax(clean) || softmax(adv)), summed over classes."""
    clean_log_p = F.log_softmax(clean_logits, dim=1)
    return (clean_log_p.exp() * (clean_log_p - F.log_softmax(adv_logits, dim=1))).sum(1)


class TRADESLoss(NamedTuple):
    total: torch.Tensor
    natural: torch.Tensor  # CE(f(x), y), batch mean
    robust: torch.Tensor  # KL 'batchmean'


def trades_loss(clean_logits: torch.Tensor, adv_logits: torch.Tensor, y: torch.Tensor, beta: float) -> TRADESLoss:
    """CE(f(x), y) + beta * mean_i KL_i(f(x) || f(x')) (eq. 5; per example, not per element)."""
    natural = F.cross_entropy(clean_logits, y)
    robust = kl_per_example(clean_logits, adv_logits).mean()
    return TRADESLoss(natural + beta * robust, natural, robust)


@register_defense("trades")
class TRADES(Defense):
    """TRADES (Zhang et al. 2019): CE on clean inputs + beta * KL to a KL-maximising PGD example."""

    Config = TRADESConfig
    label = "TRADES"

    @classmethod
    def step_cost(cls, config: Mapping[str, Any]) -> StepCost:
        k = configured_steps(config)
        return StepCost(
            2 * k + 7,
            f"{k} KL attack steps (forward + input backward), one clean forward for the "
            f"attack's target, training forward/backward on clean and adversarial inputs",
        )

    distributed_ready = True  # harness.scale.distributed: batch-mean losses, rank-agreeing control flow
    reference_schedule: ClassVar[Schedule] = Schedule(
        epochs=76, batch_size=128, lr=0.1, lr_milestones=(74 / 76,), lr_decay=0.1, momentum=0.9, weight_decay=2e-4
    )
    reference_protocol: ClassVar[ReferenceProtocol] = ReferenceProtocol(
        "yaodongyu/TRADES train_trades_cifar10.py, trades.py",
        (
            Setting("spec.eps", "0.031", PAPER_EPS),
            Setting("config.steps", 10),
            Setting("config.step_size_rel", 0.007 / 0.031, "0.007 at 0.031"),
            Setting("config.init_noise", 0.001, "x + 0.001 N(0, 1)"),
            Setting("config.attack_bn", "eval", "model.eval() in trades_loss"),
            Setting("config.beta", 6.0),
            *schedule_settings(reference_schedule, PAPER_SCHEDULE),
            Setting("derived.input", INPUT_RAW, PAPER_INPUT),
            Setting("derived.architecture", "wrn-34-10"),
            Setting("derived.checkpoint", "last", OUR_SELECTION),
        ),
    )

    def perturb(self, model, batch):
        cfg, eps = self.config, self.context.eps_float
        with model_mode(model, cfg.attack_bn), torch.no_grad():
            clean_logits = model(batch.x)  # once per batch: the attack's fixed target distribution

        def kl_to_clean(adv_logits, _y):
            return kl_per_example(clean_logits, adv_logits)

        x_adv = pgd(
            model,
            batch.x,
            batch.y,
            eps,
            steps=cfg.steps,
            step_size=cfg.step_size_rel * eps,
            loss_fn=kl_to_clean,
            mode=cfg.attack_bn,
            delta_init=cfg.init_noise * torch.randn_like(batch.x),
        )
        return Perturbation(x_adv, batch.x.new_full((len(batch.y),), eps))

    def train_step(self, model, optimizer, batch):
        x_adv = self.perturb(model, batch).x_adv
        clean_logits, adv_logits = clean_then_adversarial_logits(model, batch.x, x_adv)
        loss = trades_loss(clean_logits, adv_logits, batch.y, self.config.beta)
        sgd_step(optimizer, loss.total)
        return {
            "loss": loss.total.detach(),
            "natural_loss": loss.natural.detach(),
            "kl": loss.robust.detach(),
            "clean_acc": accuracy(clean_logits, batch.y),
            "adv_acc": accuracy(adv_logits, batch.y),
        }
