"""Configuration shared by ADES, its readings and Static-DES: the eps map, attack, cues, diagnostics."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from harness.config import fraction_str
from harness.cues import CUE_NAMES, check_cue_names
from harness.eps_stats import COLLAPSE_FRACTION, COLLAPSE_SPREAD, COLLAPSE_TOLERANCE
from harness.errors import HarnessError


def require(ok: bool, message: str) -> None:
    """One-line configuration error (exit status 2 at the CLI)."""
    if not ok:
        raise HarnessError(message)


def _fraction(value: float) -> Fraction:
    return Fraction(str(value))


@dataclass(frozen=True)
class CueEpsConfig:
    eps_min_rel: float = 0.5  # eps_min = eps_min_rel x the run's eps (4/255 at 8/255)
    eps_max_rel: float = 1.5  # eps_max = eps_max_rel x the run's eps (12/255 at 8/255)
    eps_min: Fraction | None = None  # absolute bound (e.g. 4/255); overrides eps_min_rel when set
    eps_max: Fraction | None = None
    steps: int = 10
    step_size_rel: float = 0.25  # of each sample's own eps_i
    random_start: bool = True
    attack_bn: Literal["train", "eval"] = "train"
    cue_bn: Literal["attack", "eval"] = "attack"  # eval: per-sample input gradients (see cue_schedule)
    share_first_step: bool = True  # the clean cue gradient is PGD's first gradient (when modes agree)
    cues: tuple[str, ...] = CUE_NAMES
    grad_norm: Literal["l2", "l1"] = "l2"
    mc_mode: Literal["head", "full"] = "head"
    mc_samples: int = 10  # T
    mc_head_dropout: float = 0.5  # dropout on the penultimate features in `head` mode
    constant_cue_value: float = 0.5  # normalised value of a cue constant over the batch
    probe_size: int = 64  # first examples of the first batch, kept to show the map every epoch
    hist_bins: int = 20
    collapse_fraction: float = COLLAPSE_FRACTION  # warn when more than this share of eps ...
    collapse_tolerance: float = COLLAPSE_TOLERANCE  # ... lies within this fraction of the range of a bound
    collapse_spread: float = COLLAPSE_SPREAD  # warn when eps std < this x (eps_max - eps_min)
    eps_target_rel: float = 1.0  # where the batch-mean eps is held: this x the run's eps

    @property
    def holds_mean(self) -> bool:
        """Whether the batch-mean eps is held at `target` (by renormalisation or otherwise)."""
        return self.renormalises

    @property
    def renormalises(self) -> bool:
        """Whether scores are renormalised to the target mean (`hold_mean`) before the eps map."""
        return False

    @property
    def cue_mode(self) -> Literal["train", "eval"]:
        """BatchNorm mode of the clean cue pass."""
        return self.attack_bn if self.cue_bn == "attack" else "eval"

    @property
    def shares_first_step(self) -> bool:
        """PGD reuses the cue gradient only when it is the gradient PGD itself would compute."""
        return self.share_first_step and self.cue_mode == self.attack_bn

    def validate(self) -> None:
        check_cue_names(self.cues)
        require(self.eps_target_rel > 0, f"eps_target_rel must be positive, got {self.eps_target_rel}")
        require(self.mc_samples >= 1, f"mc_samples (T) must be at least 1, got {self.mc_samples}")
        require(self.steps >= 1, f"steps must be at least 1, got {self.steps}")
        require(self.step_size_rel > 0, f"step_size_rel must be positive, got {self.step_size_rel}")
        require(0 <= self.mc_head_dropout < 1, f"mc_head_dropout must be in [0, 1), got {self.mc_head_dropout}")
        require(0 <= self.constant_cue_value <= 1,
                f"constant_cue_value must be in [0, 1], got {self.constant_cue_value}")
        require(self.probe_size >= 1 and self.hist_bins >= 1, "probe_size and hist_bins must be at least 1")
        require(0 < self.collapse_fraction <= 1 and self.collapse_tolerance >= 0 and self.collapse_spread >= 0,
                "collapse_fraction must be in (0, 1]; collapse_tolerance and collapse_spread non-negative")
        for name in ("eps_min", "eps_max"):
            value = getattr(self, name)
            require(value is None or 0 <= value <= 1, f"{name} = {value} is outside [0, 1]; use e.g. 4/255")
        for name in ("eps_min_rel", "eps_max_rel"):
            require(getattr(self, name) >= 0, f"{name} must be non-negative, got {getattr(self, name)}")
        if (self.eps_min is None) == (self.eps_max is None):
            lo = self.eps_min if self.eps_min is not None else self.eps_min_rel
            hi = self.eps_max if self.eps_max is not None else self.eps_max_rel
            require(lo <= hi, f"eps_min ({lo}) > eps_max ({hi}); swap them")

    def bounds(self, eps: Fraction) -> tuple[Fraction, Fraction]:
        """(eps_min, eps_max) for a run whose nominal budget is `eps`; HarnessError if unusable."""
        lo = self.eps_min if self.eps_min is not None else _fraction(self.eps_min_rel) * eps
        hi = self.eps_max if self.eps_max is not None else _fraction(self.eps_max_rel) * eps
        for name, value in (("eps_min", lo), ("eps_max", hi)):
            require(0 <= value <= 1, f"{name} = {fraction_str(value)} (at run eps {fraction_str(eps)}) is "
                                     f"outside [0, 1]; lower {name}_rel or set {name} explicitly")
        require(lo <= hi, f"eps_min {fraction_str(lo)} > eps_max {fraction_str(hi)}; swap them")
        return lo, hi

    def target(self, eps: Fraction) -> Fraction:
        """The held batch-mean eps; when held, it must lie strictly inside (eps_min, eps_max)."""
        lo, hi = self.bounds(eps)
        value = _fraction(self.eps_target_rel) * eps
        require(not self.holds_mean or lo < value < hi,
                f"target mean eps {fraction_str(value)} must lie strictly between eps_min "
                f"{fraction_str(lo)} and eps_max {fraction_str(hi)}; widen the bounds or change eps_target_rel")
        return value
