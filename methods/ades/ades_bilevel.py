"""ADES-bilevel: the paper's section-4 bi-level reading of ADES, with a held-out outer loss.

Paper: "Adaptive Dynamic Epsilon Scheduling", section 4.0.1, writes ADES as a
bi-level problem; its formula was lost. The reading built here (docs/paper.md has the others):

  inner:  theta*(phi) = argmin_theta E_train[ CE(f_theta(x_i + eps_phi(s_i) d_i), y_i) ]
  outer:  min_phi     E_heldout[ max_{||delta||_inf <= eps} CE(f_theta*(phi)(x + delta), y) ]

so the budget map is chosen for robust generalisation, not for the training loss. One training
step (algorithm box), with phi's hypergradient through a one-step look-ahead of theta:

  1-3. cues -> eps_i = map(g_phi(s_i)) (batch mean held at the run's eps) -> PGD-10 x'_i  (as `ades`)
  4.   L_train(theta, phi) = CE(f_theta(x_i + eps_i d_i), y_i), d_i detached;  g = dL/dtheta (graph kept)
  every k = `scheduler_every` steps:
  5.   theta' = theta - lr * g(phi)                           (plain SGD look-ahead at the model's lr)
  6.   (x_h, y_h) ~ held-out split;  x'_h = PGD-10 at the run's eps against f_theta
  7.   phi <- Adam step on d CE(f_theta'(x'_h), y_h) / d phi  (exact through step 5: second order)
  8.   theta <- the run's optimiser step with g (theta's update is `ades`'s).

Choices (the paper is silent): the look-ahead ignores momentum and weight decay; the held-out PGD uses
the run's nominal eps (the budget evaluated at test time), BatchNorm in the attack's mode; the
look-ahead forward runs in train mode with BatchNorm buffers restored afterwards; the held-out split
is `held_out_fraction` (10%) of the training subset, carved by the runner before training (never
trained on, distinct from the validation split that picks `best`); phi steps every 2 training steps
(cost: one held-out PGD-10 and one double-backward per phi step). Reference code: none published.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.func import functional_call

from harness.core.defense import register_defense
from harness.core.errors import HarnessError
from harness.core.pgd import pgd
from harness.core.validation import Rule, at_least, between, rules
from methods.ades.ades import ADES, ADESConfig
from methods.ades.cue_schedule import preserved_buffers
from methods.ades.eps_scheduler import through_eps


@dataclass(frozen=True)
class ADESBilevelConfig(ADESConfig):
    objective: Literal["budget", "joint", "bilevel"] = "bilevel"
    scheduler_every: int = 2  # k: phi's hypergradient step every k training steps
    held_out_fraction: float = 0.1  # of the training subset, withheld for the outer loss
    held_out_batch: int = 128
    RULES = rules(
        ADESConfig.RULES,
        held_out_fraction=between(0, 1, low_open=True, high_open=True),
        held_out_batch=at_least(1),
        objective=Rule("bilevel", lambda v: v == "bilevel", "use -m ades or -m ades-joint for the others"),
    )


@register_defense("ades-bilevel")
class ADESBilevel(ADES):
    """ADES, bi-level reading: phi minimises a held-out robust loss after a one-step look-ahead of theta."""

    Config = ADESBilevelConfig
    label = "ADES-bilevel"

    @classmethod
    def step_cost(cls, config: Mapping[str, Any]) -> None:
        """No cost model: phi's hypergradient (a virtual SGD step and a held-out forward/backward every k
        steps) is not counted, and the ADES count without it would be no floor of this method."""
        return None

    @classmethod
    def check_spec(cls, spec) -> None:
        super().check_spec(spec)
        if getattr(spec, "precision", "fp32") == "fp16":  # the hypergradient bypasses the loss scaler
            raise HarnessError(
                "ades-bilevel trains in fp32 or bf16; fp16's loss scaling does not reach its "
                "second-order step (use --precision bf16)"
            )

    @classmethod
    def held_out_size(cls, config: ADESBilevelConfig, train_size: int) -> int:
        return max(1, math.floor(config.held_out_fraction * train_size))

    def setup(self, model):
        if self.context.held_out is None or len(self.context.held_out.labels) == 0:
            raise HarnessError(
                "ades-bilevel needs a held-out split (DefenseContext.held_out); the runner carves "
                "it from the training subset"
            )
        super().setup(model)  # phi's optimiser minimises (objective != budget)

    def train_step(self, model, optimizer, batch):
        self.keep_probe(batch)
        track = self.updates_scheduler()
        scheduled = self.schedule(model, batch.x, batch.y, track)  # steps 1-2
        x_adv = self.attack(model, batch.x, batch.y, scheduled)  # step 3
        x_train = through_eps(batch.x, x_adv, scheduled.eps) if track else x_adv
        held_out = self.held_out_adversarial(model) if track else None  # step 6, before theta's graph exists
        model.train()
        logits = model(x_train)
        loss = F.cross_entropy(logits, batch.y)  # step 4
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=track)
        if track:
            self.hypergradient_step(model, params, grads, optimizer.param_groups[0]["lr"], held_out)  # 5, 7
        optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params.values(), grads):
            p.grad = g.detach()
        optimizer.step()  # step 8
        return self.finish_step(scheduled, logits, batch.y, loss)

    def held_out_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        held = self.context.held_out
        n = len(held.labels)
        idx = torch.randperm(n, device=held.labels.device)[: self.config.held_out_batch]
        return held.images[idx], held.labels[idx]

    def held_out_adversarial(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """A held-out batch attacked by PGD at the run's eps against the current theta; BN statistics
        restored (held-out data never shapes the model)."""
        cfg = self.config
        x, y = self.held_out_batch()
        eps = self.context.eps_float
        with preserved_buffers(model):
            x_adv = pgd(
                model,
                x,
                y,
                eps,
                steps=cfg.steps,
                step_size=cfg.step_size_rel * eps,
                random_start=cfg.random_start,
                mode=cfg.attack_bn,
            )
        return x_adv, y

    def lookahead_outer_loss(
        self, model, params: dict[str, torch.Tensor], grads, lr: float, held_out: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """CE(f_{theta - lr g(phi)}(x'_h), y_h): differentiable in phi through g (second order)."""
        lookahead = {name: p.detach() - lr * g for (name, p), g in zip(params.items(), grads)}
        # train-mode forward on copies of the buffers: the saved graph of theta's step stays valid
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        model.train()
        x_adv, y = held_out
        return F.cross_entropy(functional_call(model, {**lookahead, **buffers}, (x_adv,)), y)

    def hypergradient_step(
        self, model, params: dict[str, torch.Tensor], grads, lr: float, held_out: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        """phi <- Adam step minimising the held-out robust loss after the look-ahead."""
        outer = self.lookahead_outer_loss(model, params, grads, lr, held_out)
        phi = list(self.scheduler.parameters())
        self.scheduler_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(phi, torch.autograd.grad(outer, phi, allow_unused=True)):
            p.grad = torch.zeros_like(p) if g is None else g
        self.scheduler_optimizer.step()

    def record(self) -> dict[str, Any]:
        cfg = self.config
        return {
            **super().record(),
            "held_out_examples": len(self.context.held_out.labels),
            "outer_loss": f"CE of PGD-{cfg.steps} at the run's eps on {cfg.held_out_batch} held-out examples "
            f"after a one-step SGD look-ahead (second order, no momentum / weight decay)",
        }
