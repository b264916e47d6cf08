"""ADES (Adaptive Dynamic Epsilon Scheduling): per-sample eps from a learned map of difficulty cues.

Paper: "Adaptive Dynamic Epsilon Scheduling" (seed/ades-paper.txt). Its formulas were lost in
extraction; the reconstruction and every choice below are listed in shared/PAPER.md:
  eq. (2)-(4)  cues per sample: input-gradient norm, softmax entropy, MC-dropout variance
               (`harness.cues`), each min-max normalised over the batch -> s_i in [0, 1]^3;
  eq. (5)      g_phi: 2-layer MLP, k -> hidden -> 1, ReLU, sigmoid (`EpsScheduler`);
  eq. (6)      eps_i = eps_min + (eps_max - eps_min) * g_phi(s_i);
  eq. (7)      PGD-10 inside each sample's own ball, step eps_i / 4, uniform random start in it;
  eq. (8)      min_{theta, phi} E[max_{||delta_i||_inf <= eps_i} CE(f(x_i + delta_i), y_i)].
Reference code: none published (the paper names no repository); shared code: `harness.pgd.pgd`.

Two registered readings of where phi's gradient comes from (section 3.5 / eq. 8 are ambiguous):
- `ades-joint`: the literal one. phi minimises the adversarial loss; the gradient reaches eps_i
  because the training input is written as x + eps_i * direction_i with the PGD direction detached.
  A larger ball can only raise the loss, so this should drive eps towards eps_min; the per-epoch
  diagnostics show whether it does.
- `ades`: phi *maximises* the same loss while the batch-mean eps is held at the target budget (the
  run's eps), so it learns where to spend a fixed budget (section 4.0.4: hard samples get larger
  budgets). Default control: renormalisation (`budget_control=renormalise`): the scores are shifted
  to the target mean and their deviations shrunk only as far as needed to stay in [0, 1] (exact
  mean, bounds kept, gradient projected onto mean-preserving changes). Alternative:
  `budget_control=penalty`, a quadratic penalty on the relative deviation of the batch mean.

Defaults (choices where the paper is silent): eps in [0.5, 1.5] x the run's eps (CIFAR
[4/255, 12/255], Fashion-MNIST [0.05, 0.15], so the mean budget starts at the baselines'), T = 10
MC passes, head-mode dropout p = 0.5, hidden width 16, last layer initialised small (every score
starts near 0.5), Adam with lr 1e-3 for phi updated every step, BatchNorm in train mode during
the attack (as PGD-AT here).

Shared computation (section 3.6): the clean forward/backward that yields the gradient-norm and
entropy cues (and the penultimate features for head-mode MC dropout) is PGD's first gradient. The
random start is kept: PGD starts at a uniform point in each sample's ball and takes its first
signed step along the clean-input gradient instead of the gradient at the random point, so ADES
makes 10 gradient evaluations like PGD-AT's PGD-10 (`share_first_step=false` spends one more to
take the first step from the random point's own gradient; with `random_start=false` both coincide).
Shapes: x (B, C, H, W) in [0, 1], y (B,), eps (B,).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterator, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from harness import precision
from harness.pgd import pgd, per_sample
from harness.config import fraction_str, to_jsonable
from harness.cues import (CUE_NAMES, CleanPass, check_cue_names, clean_pass, compute_cues, has_dropout,
                          has_head, normalised)
from harness.defense import Defense, Perturbation, accuracy, register_defense
from harness.eps_stats import collapse_warning, eps_summary, spearman
from harness.errors import HarnessError


def _fraction(value: float) -> Fraction:
    return Fraction(str(value))


@dataclass(frozen=True)
class CueEpsConfig:
    """Shared by ADES and Static-DES: the eps map, the attack, the cues and the diagnostics."""

    eps_min_rel: float = 0.5  # eps_min = eps_min_rel x the run's eps (4/255 at 8/255)
    eps_max_rel: float = 1.5  # eps_max = eps_max_rel x the run's eps (12/255 at 8/255)
    eps_min: Fraction | None = None  # absolute bound (e.g. 4/255); overrides eps_min_rel when set
    eps_max: Fraction | None = None
    steps: int = 10
    step_size_rel: float = 0.25  # of each sample's own eps_i
    random_start: bool = True
    attack_bn: Literal["train", "eval"] = "train"
    share_first_step: bool = True  # the clean cue gradient is PGD's first gradient
    cues: tuple[str, ...] = CUE_NAMES
    grad_norm: Literal["l2", "l1"] = "l2"
    mc_mode: Literal["head", "full"] = "head"
    mc_samples: int = 10  # T
    mc_head_dropout: float = 0.5  # dropout on the penultimate features in `head` mode
    constant_cue_value: float = 0.5  # normalised value of a cue constant over the batch
    probe_size: int = 64  # first examples of the first batch, kept to show the map every epoch
    hist_bins: int = 20
    collapse_fraction: float = 0.9  # warn when more than this share of eps ...
    collapse_tolerance: float = 0.01  # ... lies within this fraction of (eps_max - eps_min) of a bound
    eps_target_rel: float = 1.0  # where the batch-mean eps is held: this x the run's eps

    @property
    def holds_mean(self) -> bool:
        """Whether the batch-mean eps is held at `target` (by renormalisation or otherwise)."""
        return self.renormalises

    @property
    def renormalises(self) -> bool:
        """Whether scores are renormalised to the target mean (`hold_mean`) before the eps map."""
        return False

    def validate(self) -> None:
        check_cue_names(self.cues)
        _require(self.eps_target_rel > 0, f"eps_target_rel must be positive, got {self.eps_target_rel}")
        _require(self.mc_samples >= 1, f"mc_samples (T) must be at least 1, got {self.mc_samples}")
        _require(self.steps >= 1, f"steps must be at least 1, got {self.steps}")
        _require(self.step_size_rel > 0, f"step_size_rel must be positive, got {self.step_size_rel}")
        _require(0 <= self.mc_head_dropout < 1, f"mc_head_dropout must be in [0, 1), got {self.mc_head_dropout}")
        _require(0 <= self.constant_cue_value <= 1,
                 f"constant_cue_value must be in [0, 1], got {self.constant_cue_value}")
        _require(self.probe_size >= 1 and self.hist_bins >= 1, "probe_size and hist_bins must be at least 1")
        for name in ("eps_min", "eps_max"):
            value = getattr(self, name)
            _require(value is None or 0 <= value <= 1, f"{name} = {value} is outside [0, 1]; use e.g. 4/255")
        for name in ("eps_min_rel", "eps_max_rel"):
            _require(getattr(self, name) >= 0, f"{name} must be non-negative, got {getattr(self, name)}")
        if (self.eps_min is None) == (self.eps_max is None):
            lo = self.eps_min if self.eps_min is not None else self.eps_min_rel
            hi = self.eps_max if self.eps_max is not None else self.eps_max_rel
            _require(lo <= hi, f"eps_min ({lo}) > eps_max ({hi}); swap them")

    def bounds(self, eps: Fraction) -> tuple[Fraction, Fraction]:
        """(eps_min, eps_max) for a run whose nominal budget is `eps`; HarnessError if unusable."""
        lo = self.eps_min if self.eps_min is not None else _fraction(self.eps_min_rel) * eps
        hi = self.eps_max if self.eps_max is not None else _fraction(self.eps_max_rel) * eps
        for name, value in (("eps_min", lo), ("eps_max", hi)):
            _require(0 <= value <= 1, f"{name} = {fraction_str(value)} (at run eps {fraction_str(eps)}) is "
                                      f"outside [0, 1]; lower {name}_rel or set {name} explicitly")
        _require(lo <= hi, f"eps_min {fraction_str(lo)} > eps_max {fraction_str(hi)}; swap them")
        return lo, hi

    def target(self, eps: Fraction) -> Fraction:
        """The held batch-mean eps; when held, it must lie strictly inside (eps_min, eps_max)."""
        lo, hi = self.bounds(eps)
        value = _fraction(self.eps_target_rel) * eps
        _require(not self.holds_mean or lo < value < hi,
                 f"target mean eps {fraction_str(value)} must lie strictly between eps_min "
                 f"{fraction_str(lo)} and eps_max {fraction_str(hi)}; widen the bounds or change eps_target_rel")
        return value


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise HarnessError(message)


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


class CueScheduledDefense(Defense):
    """Shared pipeline: cues -> score in [0, 1] -> eps_i -> per-sample PGD -> CE training."""

    Config = CueEpsConfig
    objective = "static"

    def __init__(self, config: CueEpsConfig, context):
        super().__init__(config, context)
        lo, hi = config.bounds(context.eps)
        self.eps_min, self.eps_max = float(lo), float(hi)
        self.eps_target = float(config.target(context.eps))
        self.model: nn.Module | None = None
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self.steps_done = 0
        self._reset_epoch_log()

    @classmethod
    def check_spec(cls, spec: Any) -> None:
        config = spec.defense_config
        config.target(spec.eps)  # checks the bounds too
        if config.mc_mode == "full" and "mc_variance" in config.cues and spec.dropout == 0:
            raise HarnessError("mc_mode=full needs a model built with dropout: pass --dropout 0.1 "
                               "(or use --set mc_mode=head)")

    def setup(self, model: nn.Module) -> None:
        self.model = model
        if "mc_variance" not in self.config.cues:
            return
        if self.config.mc_mode == "full" and not has_dropout(model):
            raise HarnessError("mc_mode=full needs a model built with dropout (--dropout 0.1); "
                               "or use --set mc_mode=head")
        if self.config.mc_mode == "head" and not has_head(model):
            raise HarnessError("mc_mode=head needs a model split as classifier(embed(x)); use --set mc_mode=full")

    # ---------------------------------------------------------------- the map

    def score(self, s: torch.Tensor, track: bool) -> torch.Tensor:
        """(B, k) normalised cues -> (B,) scores in [0, 1]; differentiable in phi when `track`."""
        raise NotImplementedError

    def schedule(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, track: bool = False) -> Scheduled:
        cfg = self.config
        clean = clean_pass(model, x, y, cfg.attack_bn)
        cues = compute_cues(model, x, clean, cfg.cues, norm=cfg.grad_norm, mc_mode=cfg.mc_mode,
                            mc_samples=cfg.mc_samples, mc_head_dropout=cfg.mc_head_dropout)
        g = self.score(normalised(cues, cfg.constant_cue_value), track)
        if cfg.renormalises:
            g = hold_mean(g, (self.eps_target - self.eps_min) / (self.eps_max - self.eps_min))
        return Scheduled(self.eps_min + (self.eps_max - self.eps_min) * g, clean, cues)

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, scheduled: Scheduled) -> torch.Tensor:
        cfg = self.config
        eps = scheduled.eps.detach()
        return pgd(model, x, y, eps, steps=cfg.steps, step_size=cfg.step_size_rel * eps,
                   random_start=cfg.random_start, mode=cfg.attack_bn,
                   first_grad=scheduled.clean.grad if cfg.share_first_step else None)

    def perturb(self, model, batch):
        scheduled = self.schedule(model, batch.x, batch.y)
        return Perturbation(self.attack(model, batch.x, batch.y, scheduled), scheduled.eps.detach())

    # ---------------------------------------------------------------- training

    def tracks_scheduler(self) -> bool:
        """Whether this step's loss should reach the scheduler's parameters."""
        return False

    def scheduler_loss(self, eps: torch.Tensor) -> torch.Tensor | float:
        """Extra loss on the scheduler only (ADES's budget penalty); the model never sees it."""
        return 0.0

    def optimise(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, track: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer)

    def train_step(self, model, optimizer, batch):
        if self.probe is None:
            n = self.config.probe_size
            self.probe = (batch.x[:n].detach().clone(), batch.y[:n].detach().clone())
        track = self.tracks_scheduler()
        scheduled = self.schedule(model, batch.x, batch.y, track)
        x_adv = self.attack(model, batch.x, batch.y, scheduled)
        x_train = through_eps(batch.x, x_adv, scheduled.eps) if track else x_adv
        model.train()
        logits = model(x_train)
        loss = F.cross_entropy(logits, batch.y)
        total = (loss + self.scheduler_loss(scheduled.eps)) if track else loss
        self.optimise(optimizer, total, track)
        self.steps_done += 1
        eps = scheduled.eps.detach()
        self._log(eps, scheduled.cues)
        return {"loss": loss.detach(), "adv_acc": accuracy(logits, batch.y), "eps_mean": eps.mean()}

    # ---------------------------------------------------------------- diagnostics

    def _reset_epoch_log(self) -> None:
        self._epoch_eps: list[torch.Tensor] = []
        self._epoch_cues: dict[str, list[torch.Tensor]] = {n: [] for n in self.config.cues}

    def _log(self, eps: torch.Tensor, cues: dict[str, torch.Tensor]) -> None:
        self._epoch_eps.append(eps)
        for name, value in cues.items():
            self._epoch_cues[name].append(value.detach())

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
        """Contract A: eps statistics over every training example of the pass, Spearman correlation of
        eps with each raw cue over the whole pass (None for a cue not in use or constant), the map on
        the probe batch, and a collapse warning."""
        if not self._epoch_eps:
            return {}
        cfg = self.config
        eps = torch.cat(self._epoch_eps)
        cues = {n: torch.cat(v) for n, v in self._epoch_cues.items()}
        out = eps_summary(eps, self.eps_min, self.eps_max, cfg.hist_bins)
        out["spearman"] = {n: spearman(eps, cues[n]) if n in cues else None for n in CUE_NAMES}
        out["probe_eps"] = self.probe_eps()
        out["collapse_warning"] = collapse_warning(eps, self.eps_min, self.eps_max, cfg.collapse_fraction,
                                                   cfg.collapse_tolerance)
        out.update(eps_min=self.eps_min, eps_max=self.eps_max, n=len(eps), scheduler_steps=self.steps_done)
        if out["collapse_warning"]:
            warnings.warn(f"{self.name} pass {epoch + 1}: {out['collapse_warning']}", stacklevel=2)
        self._reset_epoch_log()
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
        return {**super().record(), "objective": self.objective, "eps_min": fraction_str(lo),
                "eps_max": fraction_str(hi),
                "eps_target": fraction_str(cfg.target(self.context.eps)) if cfg.holds_mean else None,
                "cues": list(cfg.cues), "attack_bn": cfg.attack_bn,
                "mc_mode": cfg.mc_mode if "mc_variance" in cfg.cues else None,
                "first_step": ("clean-input gradient applied at the random start" if cfg.share_first_step
                               else "own gradient at the start point")}


def through_eps(x: torch.Tensor, x_adv: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x + eps_i * direction_i with the PGD direction detached: same value as x_adv, and the
    training loss now depends on eps_i (hence on phi) through the size of the perturbation."""
    eps_v = per_sample(eps, x)
    direction = ((x_adv - x) / eps_v.detach().clamp_min(1e-12)).detach()
    return (x + eps_v * direction).clamp(0, 1)


def hold_mean(g: torch.Tensor, target: float, tiny: float = 1e-12) -> torch.Tensor:
    """Renormalise scores to mean `target`: shift, then shrink deviations only as far as [0, 1] needs.

    Differentiable; the gradient keeps only mean-preserving directions, so phi learns where the
    budget goes, never how much of it there is. A batch of one gets exactly `target`.
    """
    centred = g - g.mean()
    below = (-centred.min()).clamp_min(tiny)
    above = centred.max().clamp_min(tiny)
    shrink = torch.clamp(torch.minimum(target / below, (1 - target) / above), max=1.0)
    return (target + shrink * centred).clamp(0, 1)


# --------------------------------------------------------------------------- ADES


class EpsScheduler(nn.Module):
    """g_phi (eq. 5): normalised cues (B, k) -> score (B,) in (0, 1); Linear-ReLU-Linear-sigmoid.

    The output layer starts small, so every score starts near 0.5 and the mean budget near the
    middle of [eps_min, eps_max] (the run's eps with the default bounds).
    """

    def __init__(self, inputs: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.net[2].weight.mul_(0.1)
            self.net[2].bias.zero_()

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(s)).squeeze(1)


@dataclass(frozen=True)
class ADESConfig(CueEpsConfig):
    hidden: int = 16
    objective: Literal["budget", "joint"] = "budget"  # budget: `ades`; joint: `ades-joint` (literal)
    budget_control: Literal["renormalise", "penalty"] = "renormalise"
    budget_penalty: float = 10.0  # penalty weight on ((mean eps - target) / target)^2
    scheduler_optimizer: Literal["adam", "sgd"] = "adam"
    scheduler_lr: float = 1e-3
    scheduler_every: int = 1  # phi takes a step every this many training steps

    @property
    def holds_mean(self) -> bool:
        return self.objective == "budget"

    @property
    def renormalises(self) -> bool:
        return self.objective == "budget" and self.budget_control == "renormalise"

    def validate(self) -> None:
        super().validate()
        _require(self.hidden >= 1, f"hidden must be at least 1, got {self.hidden}")
        _require(self.scheduler_lr > 0, f"scheduler_lr must be positive, got {self.scheduler_lr}")
        _require(self.scheduler_every >= 1, f"scheduler_every must be at least 1, got {self.scheduler_every}")
        _require(self.budget_penalty >= 0, f"budget_penalty must be non-negative, got {self.budget_penalty}")


@dataclass(frozen=True)
class ADESJointConfig(ADESConfig):
    objective: Literal["budget", "joint"] = "joint"


@register_defense("ades")
class ADES(CueScheduledDefense):
    """ADES (budget reading): learned per-sample eps, phi maximises the loss at a fixed mean budget."""

    Config = ADESConfig

    def __init__(self, config: ADESConfig, context):
        super().__init__(config, context)
        self.scheduler: EpsScheduler | None = None
        self.scheduler_optimizer: torch.optim.Optimizer | None = None

    @property
    def objective(self) -> str:  # type: ignore[override]
        return self.config.objective

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        cfg = self.config
        device = next(model.parameters()).device
        self.scheduler = EpsScheduler(len(cfg.cues), cfg.hidden).to(device)
        maximise = cfg.objective == "budget"
        params = self.scheduler.parameters()
        if cfg.scheduler_optimizer == "adam":
            self.scheduler_optimizer = torch.optim.Adam(params, lr=cfg.scheduler_lr, maximize=maximise)
        else:
            self.scheduler_optimizer = torch.optim.SGD(params, lr=cfg.scheduler_lr, momentum=0.9,
                                                       maximize=maximise)

    def score(self, s, track):
        with torch.set_grad_enabled(track):
            return self.scheduler(s)

    def tracks_scheduler(self) -> bool:
        return self.steps_done % self.config.scheduler_every == 0

    def scheduler_loss(self, eps):
        """Budget + penalty: phi maximises loss - weight * relative deviation^2 (the model is unaffected)."""
        cfg = self.config
        if cfg.objective != "budget" or cfg.budget_control != "penalty":
            return 0.0
        return -cfg.budget_penalty * ((eps.mean() - self.eps_target) / self.eps_target) ** 2

    def optimise(self, optimizer, loss, track):
        optimizer.zero_grad(set_to_none=True)
        self.scheduler_optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer, *([self.scheduler_optimizer] if track else []))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scheduler": self.scheduler.state_dict(),
                "scheduler_optimizer": self.scheduler_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler_optimizer.load_state_dict(state["scheduler_optimizer"])

    def record(self) -> dict[str, Any]:
        cfg = self.config
        budget = cfg.objective == "budget"
        return {**super().record(),
                "budget_control": cfg.budget_control if budget else None,
                "scheduler": to_jsonable({"layers": [len(cfg.cues), cfg.hidden, 1],
                                          "optimizer": cfg.scheduler_optimizer, "lr": cfg.scheduler_lr,
                                          "every": cfg.scheduler_every,
                                          "direction": "maximise loss" if budget else "minimise loss"})}


@register_defense("ades-joint")
class ADESJoint(ADES):
    """ADES (literal reading): phi minimises the same adversarial loss as the model (eq. 8)."""

    Config = ADESJointConfig
