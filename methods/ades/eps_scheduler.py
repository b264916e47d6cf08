"""ADES's learnable scheduler g_phi and the losses phi learns from (shared by every ADES reading).

  EpsScheduler       eq. (5): Linear-ReLU-Linear-sigmoid over the k normalised cues.
  SchedulerConfig    its width, initialisation, optimiser and update frequency (defaults below).
  through_eps        the training input written as x + eps_i * d_i with the PGD direction d_i
                     detached: the loss then depends on eps_i, hence on phi (the surrogate).
  budget_penalty     the `penalty` alternative to holding the batch-mean eps exactly.

Defaults, chosen so the scheduler moves within a CPU schedule (issue 13; Fashion-MNIST quick
preset, 40 steps per pass): with the old Adam lr 1e-3 the eps std after pass 1 was 0.0002 on a
range of width 0.1 (PGD-AT in disguise); lr 1e-2 gave 0.0053 over pass 1, lr 3e-2 gave 0.018
(Static-DES: 0.008-0.013). Default: Adam, lr 2e-2, no warm-up, phi updated every step. The output
layer starts scaled by `init_scale` = 0.1 so every score starts near 0.5 (the map starts as PGD-AT
at the held mean, and any spread is learnt, not drawn at initialisation: with lr 0 the run stays
PGD-AT and the collapse warning says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from harness.core.pgd import per_sample
from harness.core.validation import at_least, non_negative, rules
from methods.ades.cue_config import CueEpsConfig


class EpsScheduler(nn.Module):
    """g_phi (eq. 5): normalised cues (B, k) -> score (B,) in (0, 1); Linear-ReLU-Linear-sigmoid."""

    def __init__(self, inputs: int, hidden: int, init_scale: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.net[2].weight.mul_(init_scale)
            self.net[2].bias.zero_()

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(s)).squeeze(1)


@dataclass(frozen=True)
class SchedulerConfig(CueEpsConfig):
    hidden: int = 16
    init_scale: float = 0.1  # output-layer weights x this at initialisation (scores start near 0.5)
    scheduler_optimizer: Literal["adam", "sgd"] = "adam"
    scheduler_lr: float = 2e-2  # 0 freezes phi (the run is then PGD-AT at the held mean)
    scheduler_every: int = 1  # phi takes a step every this many training steps
    RULES = rules(
        CueEpsConfig.RULES,
        hidden=at_least(1),
        init_scale=non_negative,
        scheduler_lr=non_negative,
        scheduler_every=at_least(1),
    )


def make_scheduler(
    cfg: SchedulerConfig, device: torch.device, maximise: bool
) -> tuple[EpsScheduler, torch.optim.Optimizer]:
    scheduler = EpsScheduler(len(cfg.cues), cfg.hidden, cfg.init_scale).to(device)
    params = scheduler.parameters()
    if cfg.scheduler_optimizer == "adam":
        return scheduler, torch.optim.Adam(params, lr=cfg.scheduler_lr, maximize=maximise)
    return scheduler, torch.optim.SGD(params, lr=cfg.scheduler_lr, momentum=0.9, maximize=maximise)


def through_eps(x: torch.Tensor, x_adv: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x + eps_i * direction_i with the PGD direction detached: same value as x_adv, and the
    training loss now depends on eps_i (hence on phi) through the size of the perturbation."""
    eps_v = per_sample(eps, x)
    direction = ((x_adv - x) / eps_v.detach().clamp_min(1e-12)).detach()
    return (x + eps_v * direction).clamp(0, 1)


def budget_penalty(eps: torch.Tensor, target: float, weight: float) -> torch.Tensor:
    """weight x ((batch-mean eps - target) / target)^2: how far phi strays from the budget."""
    return weight * ((eps.mean() - target) / target) ** 2
