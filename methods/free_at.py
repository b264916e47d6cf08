"""Free-AT: "free" adversarial training, m replays of each minibatch sharing one backward pass.

Paper: Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis, Taylor, Goldstein, "Adversarial
Training for Free!", NeurIPS 2019, Algorithm 1.
Reference code: ashafahi/free_adv_train free_train.py (TensorFlow, CIFAR) and
mahyarnajibi/FreeAdversarialTraining main_free.py (PyTorch, ImageNet).

Each minibatch is replayed m times. Every replay does one forward pass on clamp(x + delta, 0, 1)
and one backward pass, which yields both the weight gradient (used for the SGD step) and the input
gradient g; then delta <- clip(delta + step * sign(g), -eps, eps) and the optimiser steps. delta
is one persistent buffer that carries over from minibatch to minibatch and epoch to epoch (never
reset); a smaller last batch uses (and updates) its leading rows, as in main_free.py.

Epoch counting: the runner runs ceil(epochs / m) passes over the data so that the number of SGD
steps matches `epochs` epochs of PGD-AT (main_free.py divides its epochs by m the same way), and
records both passes and equivalent epochs.

Defaults (CIFAR-10, free_train.py): m = 8, FGSM step = eps = 8/255 (`step_rel` = 1).
BatchNorm: the single forward pass serves the weights and the perturbation, so the "attack" runs
in train mode by construction (`attack_bn` is recorded, and only "train" is meaningful).
`perturb` (used by tests and benchmarks, never by training) returns the persistent delta's first
rows plus one more FGSM step from it, computed in train mode without any weight update and without
changing the stored delta: the examples the next replay would train on, one step further.
Reference schedule (differs from the paper under test's): free_train.py trains Madry's WRN-32-10 (= wrn-34-10 here) for
80,000 SGD steps of batch 128 (about 205 equivalent epochs, 26 passes at m = 8), lr 0.1, x0.1 at
steps 40k and 60k, wd 2e-4, momentum 0.9. See `FreeAT.reference_schedule`.
Shapes: x (B, C, H, W) in [0, 1], y (B,).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from harness.core.config import Schedule, to_jsonable
from harness.core.defense import Defense, Perturbation, StepCost, accuracy, register_defense
from harness.core.pgd import pgd
from harness.core.protocol import (
    INPUT_PER_IMAGE,
    OUR_SELECTION,
    PAPER_SCHEDULE,
    ReferenceProtocol,
    Setting,
    schedule_settings,
)
from harness.core.validation import DefenseConfig, at_least, positive, rules
from harness.training import precision


@dataclass(frozen=True)
class FreeATConfig(DefenseConfig):
    replays: int = 8  # m: optimiser steps per minibatch
    step_rel: float = 1.0  # FGSM step = step_rel * eps (free_train.py: step = eps = 8/255)
    attack_bn: Literal["train"] = "train"  # one forward pass for weights and delta: train mode
    RULES = rules(replays=at_least(1), step_rel=positive)


@register_defense("free-at")
class FreeAT(Defense):
    """Free-AT (Shafahi et al. 2019): m replays per minibatch, one backward for weights and input."""

    Config = FreeATConfig
    label = "Free-AT"

    @classmethod
    def step_cost(cls, config: Mapping[str, Any]) -> StepCost:
        return StepCost(3, "one forward + full backward per replay; one equivalent epoch = one replay per batch")

    # ashafahi/free_adv_train config.py / free_train.py (CIFAR-10, WRN-34-10): 80k SGD steps
    # (~205 equivalent epochs of batch 128), lr 0.1 x0.1 at 40k and 60k steps, wd 2e-4.
    # Weight decay on conv/FC weights only (Madry's model decays its 'DW' variables; main_free.py likewise).
    reference_schedule: ClassVar[Schedule] = Schedule(
        epochs=205,
        batch_size=128,
        lr=0.1,
        lr_milestones=(0.5, 0.75),
        weight_decay=2e-4,
        weight_decay_on="conv-linear-weights",
    )
    reference_protocol: ClassVar[ReferenceProtocol] = ReferenceProtocol(
        "ashafahi/free_adv_train free_train.py (CIFAR); mahyarnajibi/FreeAdversarialTraining main_free.py",
        (
            Setting("spec.eps", "8/255"),
            Setting("config.replays", 8),
            Setting("config.step_rel", 1.0, "FGSM step = eps"),
            Setting("config.attack_bn", "train", "one forward serves weights and noise"),
            *schedule_settings(reference_schedule, PAPER_SCHEDULE),
            Setting("derived.input", INPUT_PER_IMAGE, "Madry's CIFAR model standardises each image; not offered here"),
            Setting("derived.architecture", "wrn-34-10", "Madry's WRN-32-10 (= WRN-34-10)"),
            Setting("derived.checkpoint", "last", OUR_SELECTION),
        ),
    )

    def __init__(self, config: FreeATConfig, context):
        super().__init__(config, context)
        self.replays = config.replays
        self.delta: torch.Tensor | None = None  # persistent perturbation, (batch size, C, H, W)

    @property
    def step(self) -> float:
        return self.config.step_rel * self.context.eps_float

    def _delta_for(self, x: torch.Tensor) -> torch.Tensor:
        """The buffer, created (zeros) on the first batch and grown if a batch is ever larger."""
        if self.delta is None or self.delta.shape[1:] != x.shape[1:]:
            self.delta = torch.zeros_like(x)
        elif len(x) > len(self.delta):
            extra = torch.zeros_like(x[len(self.delta) :])
            self.delta = torch.cat([self.delta, extra]).contiguous(memory_format=torch.channels_last)
        return self.delta[: len(x)]

    def perturb(self, model, batch):
        eps = self.context.eps_float
        delta = self._delta_for(batch.x).clone()
        x_adv = pgd(
            model, batch.x, batch.y, eps, steps=1, step_size=self.step, delta_init=delta, mode=self.config.attack_bn
        )
        return Perturbation(x_adv, batch.x.new_full((len(batch.y),), eps))

    def train_step(self, model, optimizer, batch):
        eps, n = self.context.eps_float, len(batch.y)
        model.train()
        delta = self._delta_for(batch.x).clone()
        losses, accs = [], []
        for _ in range(self.replays):
            delta.requires_grad_(True)
            logits = model((batch.x + delta).clamp(0, 1))
            loss = F.cross_entropy(logits, batch.y)
            optimizer.zero_grad(set_to_none=True)
            precision.backward(loss)  # weight gradients and d loss / d delta in one pass
            delta = (delta.detach() + self.step * delta.grad.sign()).clamp_(-eps, eps)
            precision.step(optimizer)
            losses.append(loss.detach())
            accs.append(accuracy(logits, batch.y))
        self.delta[:n] = delta
        return {
            "loss": torch.stack(losses).mean(),
            "adv_acc": torch.stack(accs).mean(),
            "delta_linf": delta.abs().flatten(1).max(1).values.mean(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"delta": None if self.delta is None else self.delta.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        delta = state["delta"]
        self.delta = None if delta is None else delta.to(self.context.device).clone()

    def record(self) -> dict[str, Any]:
        return {
            **super().record(),
            "attack_bn": self.config.attack_bn,
            "fgsm_step": self.step,
            "reference_schedule": to_jsonable(self.reference_schedule),
        }
