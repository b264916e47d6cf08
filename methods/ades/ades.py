"""ADES (Adaptive Dynamic Epsilon Scheduling): per-sample eps from a learned map of difficulty cues.

Paper: "Adaptive Dynamic Epsilon Scheduling"; formulas reconstructed in docs/paper.md.
Reference code: none published. One training step (algorithm box):

  1. s_i   = minmax_batch(grad_norm_i, entropy_i, mc_variance_i)        eq. (2)-(4), methods.ades.cues
  2. eps_i = eps_min + (eps_max - eps_min) * g_phi(s_i)                 eq. (5)-(6), methods.ades.eps_scheduler
            (`ades`: scores renormalised so the batch mean is the run's eps, `hold_mean`)
  3. x'_i  = PGD-10 in B_inf(x_i, eps_i), step eps_i / 4, random start  eq. (7), methods.ades.cue_schedule
  4. L     = CE(f_theta(x_i + eps_i * d_i), y_i), d_i = (x'_i - x_i) / eps_i detached
  5. theta <- SGD step minimising L;  phi <- Adam step on L             eq. (8)

Where phi's gradient points is the ambiguity of section 3.5 / eq. (8); three registered readings:
- `ades` (budget): phi *maximises* L while the batch-mean eps is held at the run's eps, so it learns
  where to spend a fixed budget (section 4.0.4: hard samples get larger budgets). Control
  `renormalise` (exact mean, gradient projected onto mean-preserving changes) or `penalty`
  (phi maximises L - budget_penalty x relative deviation^2).
- `ades-joint` (literal): phi *minimises* L like theta; a larger ball only raises L, so eps should
  drift to eps_min (the diagnostics show whether it does).
- `ades-bilevel` (section 4's bi-level problem): `methods/ades/ades_bilevel.py`.
Defaults: methods/ades/cue_schedule.py (map, attack, cues) and methods/ades/eps_scheduler.py (phi's optimiser).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from harness.core.config import to_jsonable
from harness.core.defense import register_defense
from harness.core.validation import Rule, non_negative, rules
from harness.training import precision
from methods.ades.cue_schedule import CueScheduledDefense
from methods.ades.eps_scheduler import SchedulerConfig, budget_penalty, make_scheduler, through_eps


@dataclass(frozen=True)
class ADESConfig(SchedulerConfig):
    objective: Literal["budget", "joint", "bilevel"] = "budget"
    budget_control: Literal["renormalise", "penalty"] = "renormalise"
    budget_penalty: float = 10.0  # penalty weight on ((mean eps - target) / target)^2
    RULES = rules(
        SchedulerConfig.RULES,
        budget_penalty=non_negative,
        objective=Rule("budget or joint", lambda v: v != "bilevel", "bilevel is its own defense: -m ades-bilevel"),
    )

    @property
    def holds_mean(self) -> bool:
        return self.objective in ("budget", "bilevel")

    @property
    def renormalises(self) -> bool:
        return self.holds_mean and self.budget_control == "renormalise"


@dataclass(frozen=True)
class ADESJointConfig(ADESConfig):
    objective: Literal["budget", "joint", "bilevel"] = "joint"


@register_defense("ades")
class ADES(CueScheduledDefense):
    """ADES (budget reading): learned per-sample eps, phi maximises the loss at a fixed mean budget."""

    Config = ADESConfig
    label = "ADES"

    @property
    def objective(self) -> str:  # type: ignore[override]
        return self.config.objective

    def setup(self, model):
        super().setup(model)
        self.scheduler, self.scheduler_optimizer = make_scheduler(
            self.config, next(model.parameters()).device, maximise=self.config.objective == "budget"
        )

    def score(self, s, track):
        with torch.set_grad_enabled(track):
            return self.scheduler(s)

    def updates_scheduler(self) -> bool:
        """phi learns at this step (every `scheduler_every` steps)."""
        return self.steps_done % self.config.scheduler_every == 0

    def train_step(self, model, optimizer, batch):
        self.keep_probe(batch)
        track = self.updates_scheduler()
        scheduled = self.schedule(model, batch.x, batch.y, track)  # steps 1-2
        x_adv = self.attack(model, batch.x, batch.y, scheduled)  # step 3
        x_train = through_eps(batch.x, x_adv, scheduled.eps) if track else x_adv  # step 4
        model.train()
        logits = model(x_train)
        loss = F.cross_entropy(logits, batch.y)
        optimizer.zero_grad(set_to_none=True)
        self.scheduler_optimizer.zero_grad(set_to_none=True)
        precision.backward(loss + self.scheduler_penalty(scheduled.eps) if track else loss)
        # step 5: theta minimises L; phi maximises (budget) or minimises (joint) L (one fp16 scale update)
        precision.step(optimizer, *([self.scheduler_optimizer] if track else []))
        return self.finish_step(scheduled, logits, batch.y, loss)

    def scheduler_penalty(self, eps: torch.Tensor) -> torch.Tensor | float:
        """`penalty` control: phi (maximising) pays for a batch mean away from the target; theta never sees it."""
        cfg = self.config
        if cfg.objective != "budget" or cfg.budget_control != "penalty":
            return 0.0
        return -budget_penalty(eps, self.eps_target, cfg.budget_penalty)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scheduler_optimizer": self.scheduler_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler_optimizer.load_state_dict(state["scheduler_optimizer"])

    def record(self) -> dict[str, Any]:
        cfg = self.config
        direction = {
            "budget": "maximise loss",
            "joint": "minimise loss",
            "bilevel": "minimise held-out robust loss after a one-step look-ahead",
        }[cfg.objective]
        return {
            **super().record(),
            "budget_control": cfg.budget_control if cfg.holds_mean else None,
            "scheduler": to_jsonable(
                {
                    "layers": [len(cfg.cues), cfg.hidden, 1],
                    "init_scale": cfg.init_scale,
                    "optimizer": cfg.scheduler_optimizer,
                    "lr": cfg.scheduler_lr,
                    "every": cfg.scheduler_every,
                    "direction": direction,
                }
            ),
        }


@register_defense("ades-joint")
class ADESJoint(ADES):
    """ADES (literal reading): phi minimises the same adversarial loss as the model (eq. 8)."""

    Config = ADESJointConfig
    label = "ADES-joint"
