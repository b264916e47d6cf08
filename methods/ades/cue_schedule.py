"""The cue -> eps -> PGD pipeline that ADES, its readings and Static-DES share (not a defense itself).

Paper: "Adaptive Dynamic Epsilon Scheduling", section 3; reconstruction in
docs/paper.md:
  eq. (2)-(4)  cues per sample (`methods.ades.cues`), each min-max normalised over the batch -> s_i;
  eq. (6)      eps_i = eps_min + (eps_max - eps_min) * score(s_i), score in [0, 1];
  eq. (7)      PGD-10 inside each sample's own ball, step eps_i / 4, uniform random start in it.
A subclass supplies `score` (Static-DES: fixed weights; ADES: the MLP g_phi) and, for ADES, how phi
learns. Defaults (the paper is silent): eps in [0.5, 1.5] x the run's eps; T = 10 MC passes, head-mode
dropout p = 0.5; BatchNorm in train mode during the attack (as PGD-AT here).

Cue pass and PGD's first step (section 3.6, "shared with adversarial example generation"): the clean
forward/backward that yields the gradient-norm and entropy cues runs with dropout off and BatchNorm in
the attack's mode (`cue_bn=attack`); its gradient is then PGD's first gradient, applied at the random
start, so the cues cost no extra gradient evaluation. `cue_bn=eval` gives every example its own
gradient (no train-mode BatchNorm coupling); PGD then computes its own first gradient (one more).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from harness.core.config import fraction_str
from harness.core.defense import Defense, Perturbation, StepCost, accuracy, configured_steps
from harness.core.errors import HarnessError
from harness.core.pgd import pgd
from harness.core.validation import require, violations_of
from harness.training import precision
from harness.training.eps_stats import PassLog
from methods.ades.cue_config import CueEpsConfig
from methods.ades.cues import CUE_NAMES, CleanPass, clean_pass, compute_cues, has_dropout, has_head, normalised


class Scheduled(NamedTuple):
    eps: torch.Tensor  # (B,) per-sample budgets (carries phi's graph when tracked)
    clean: CleanPass
    cues: dict[str, torch.Tensor]  # raw cues, (B,) each


@contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore BatchNorm running statistics (all buffers) afterwards: diagnostics leave no trace."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved):
                b.copy_(s)


def hold_mean(g: torch.Tensor, target: float, tiny: float = 1e-12) -> torch.Tensor:
    """Renormalise scores to mean `target`: shift, then shrink deviations only as far as [0, 1] needs.

    Differentiable; the gradient keeps only mean-preserving directions (the Jacobian's columns sum
    to zero), so phi learns where the budget goes, never how much of it there is. A batch of one
    gets exactly `target`.
    """
    centred = g - g.mean()
    below = (-centred.min()).clamp_min(tiny)
    above = centred.max().clamp_min(tiny)
    shrink = torch.clamp(torch.minimum(target / below, (1 - target) / above), max=1.0)
    return (target + shrink * centred).clamp(0, 1)


class CueScheduledDefense(Defense):
    """Shared pipeline: cues -> score in [0, 1] -> eps_i -> per-sample PGD -> CE training."""

    Config = CueEpsConfig

    @classmethod
    def step_cost(cls, config: Mapping[str, Any]) -> StepCost:
        k = configured_steps(config)
        return StepCost(
            2 * k + 3,
            f"as PGD-{k} AT: cues shared with PGD's first step, head-only MC dropout and "
            f"the scheduler MLP taken as free (a lower bound)",
        )

    objective = "static"

    def __init__(self, config: CueEpsConfig, context):
        super().__init__(config, context)
        lo, hi = config.bounds(context.eps)
        self.eps_min, self.eps_max = float(lo), float(hi)
        self.eps_target = float(config.target(context.eps))
        self.model: nn.Module | None = None
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self.steps_done = 0
        self.log = PassLog(config.cues)

    @classmethod
    def check_spec(cls, spec: Any) -> None:
        config = spec.defense_config
        with violations_of(spec.defense):
            config.target(spec.eps)  # checks the bounds too
            require(
                config.mc_mode == "head" or "mc_variance" not in config.cues or spec.dropout > 0,
                "mc_mode",
                "head for a model built without dropout",
                "full",
                "pass --dropout 0.1 or use --set mc_mode=head",
            )

    def setup(self, model: nn.Module) -> None:
        self.model = model
        if "mc_variance" not in self.config.cues:
            return
        if self.config.mc_mode == "full" and not has_dropout(model):
            raise HarnessError(
                "mc_mode=full needs a model built with dropout (--dropout 0.1); or use --set mc_mode=head"
            )
        if self.config.mc_mode == "head" and not has_head(model):
            raise HarnessError("mc_mode=head needs a model split as classifier(embed(x)); use --set mc_mode=full")

    # ---------------------------------------------------------------- the map

    def score(self, s: torch.Tensor, track: bool) -> torch.Tensor:
        """(B, k) normalised cues -> (B,) scores in [0, 1]; differentiable in phi when `track`."""
        raise NotImplementedError

    def schedule(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, track: bool = False) -> Scheduled:
        cfg = self.config
        clean = clean_pass(model, x, y, cfg.cue_mode)
        cues = compute_cues(
            model,
            x,
            clean,
            cfg.cues,
            norm=cfg.grad_norm,
            mc_mode=cfg.mc_mode,
            mc_samples=cfg.mc_samples,
            mc_head_dropout=cfg.mc_head_dropout,
        )
        with precision.full_precision(x.device):  # the map and eps in fp32 (fp16 overflows, issue 22)
            g = self.score(normalised(cues, cfg.constant_cue_value), track)
            if cfg.renormalises:
                g = hold_mean(g, (self.eps_target - self.eps_min) / (self.eps_max - self.eps_min))
        return Scheduled(self.eps_min + (self.eps_max - self.eps_min) * g, clean, cues)

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, scheduled: Scheduled) -> torch.Tensor:
        cfg = self.config
        eps = scheduled.eps.detach()
        return pgd(
            model,
            x,
            y,
            eps,
            steps=cfg.steps,
            step_size=cfg.step_size_rel * eps,
            random_start=cfg.random_start,
            mode=cfg.attack_bn,
            first_grad=scheduled.clean.grad if cfg.shares_first_step else None,
        )

    def perturb(self, model, batch):
        scheduled = self.schedule(model, batch.x, batch.y)
        return Perturbation(self.attack(model, batch.x, batch.y, scheduled), scheduled.eps.detach())

    # ---------------------------------------------------------------- training

    def train_step(self, model, optimizer, batch):
        """Static map: schedule, attack, CE on the adversarial batch (ADES overrides this)."""
        self.keep_probe(batch)
        scheduled = self.schedule(model, batch.x, batch.y)
        x_adv = self.attack(model, batch.x, batch.y, scheduled)
        model.train()
        logits = model(x_adv)
        loss = F.cross_entropy(logits, batch.y)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer)
        return self.finish_step(scheduled, logits, batch.y, loss)

    def keep_probe(self, batch) -> None:
        if self.probe is None:
            n = self.config.probe_size
            self.probe = (batch.x[:n].detach().clone(), batch.y[:n].detach().clone())

    def finish_step(self, scheduled: Scheduled, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor):
        self.steps_done += 1
        eps = scheduled.eps.detach()
        self.log.add(eps, scheduled.cues)
        return {"loss": loss.detach(), "adv_acc": accuracy(logits, y), "eps_mean": eps.mean()}

    # ---------------------------------------------------------------- diagnostics

    def probe_eps(self) -> list[float]:
        """The map on the fixed probe batch, with fixed dropout randomness and BN statistics restored."""
        if self.probe is None or self.model is None:
            return []
        x, y = self.probe
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices), preserved_buffers(self.model):
            torch.manual_seed(0)
            return self.schedule(self.model, x, y).eps.detach().cpu().tolist()

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Contract A (`harness.training.eps_stats.PassLog.summary`), the probe map and the collapse warning."""
        if not len(self.log):
            return {}
        cfg = self.config
        out = self.log.summary(
            self.eps_min,
            self.eps_max,
            CUE_NAMES,
            cfg.hist_bins,
            self.eps_target if cfg.holds_mean else None,
            fraction=cfg.collapse_fraction,
            tolerance=cfg.collapse_tolerance,
            spread=cfg.collapse_spread,
        )
        out["probe_eps"] = self.probe_eps()
        out.update(eps_min=self.eps_min, eps_max=self.eps_max, scheduler_steps=self.steps_done)
        if out["collapse_warning"]:
            warn = f"WARNING {self.name} pass {epoch + 1}: {out['collapse_warning']}"
            tqdm.write(warn)  # the CLI's user must see it, not only the record
        self.log = PassLog(cfg.cues)
        return out

    # ---------------------------------------------------------------- state and record

    def state_dict(self) -> dict[str, Any]:
        probe = self.probe or (None, None)
        return {"steps_done": self.steps_done, "probe_x": probe[0], "probe_y": probe[1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = state["steps_done"]
        self.probe = None if state["probe_x"] is None else (state["probe_x"], state["probe_y"])

    def record(self) -> dict[str, Any]:
        cfg = self.config
        lo, hi = cfg.bounds(self.context.eps)
        grad_cue = (
            "each example's own gradient (eval-mode BatchNorm)"
            if cfg.cue_mode == "eval"
            else "d(sum of the batch's CE)/dx_i under train-mode BatchNorm (batch-coupled)"
        )
        return {
            **super().record(),
            "objective": self.objective,
            "eps_min": fraction_str(lo),
            "eps_max": fraction_str(hi),
            "eps_target": fraction_str(cfg.target(self.context.eps)) if cfg.holds_mean else None,
            "cues": list(cfg.cues),
            "attack_bn": cfg.attack_bn,
            "cue_pass": f"BatchNorm {cfg.cue_mode}, dropout off",
            "grad_norm_cue": grad_cue if "grad_norm" in cfg.cues else None,
            "mc_mode": cfg.mc_mode if "mc_variance" in cfg.cues else None,
            "first_step": (
                "clean-input gradient applied at the random start"
                if cfg.shares_first_step
                else "own gradient at the start point"
            ),
        }
