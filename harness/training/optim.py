"""The optimiser of a run: SGD with the schedule's momentum and weight decay, decay on a chosen set.

Why a choice: torch decays every parameter it is given, BatchNorm's scale and shift included; some
authors' code decays only convolution and linear weights (Free-AT's main_free.py), which changes the
effective regularisation of every BN layer. `Schedule.weight_decay_on` records which one a run used.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.core.config import Schedule


def decayed_and_undecayed(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights of Conv and Linear layers, every other parameter: BatchNorm affine, biases, ...)."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) in decayed], [p for p in params if id(p) not in decayed]


def sgd_for(model: nn.Module, schedule: Schedule) -> torch.optim.SGD:
    if schedule.weight_decay_on == "all":
        groups = [{"params": list(model.parameters()), "weight_decay": schedule.weight_decay}]
    else:
        decayed, undecayed = decayed_and_undecayed(model)
        groups = [
            {"params": decayed, "weight_decay": schedule.weight_decay},
            {"params": undecayed, "weight_decay": 0.0},
        ]
    return torch.optim.SGD(groups, lr=schedule.lr, momentum=schedule.momentum)
