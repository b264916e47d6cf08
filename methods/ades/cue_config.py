"""Configuration shared by ADES, its readings and Static-DES: the eps map, attack, cues, diagnostics."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from harness.core.config import fraction_str
from harness.core.validation import (
    DefenseConfig,
    at_least,
    between,
    distinct,
    non_negative,
    not_empty,
    one_of,
    positive,
    require,
    rules,
)
from harness.training.eps_stats import COLLAPSE_FRACTION, COLLAPSE_SPREAD, COLLAPSE_TOLERANCE
from methods.ades.cues import CUE_NAMES


def _fraction(value: float) -> Fraction:
    return Fraction(str(value))


@dataclass(frozen=True)
class CueEpsConfig(DefenseConfig):
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
    RULES = rules(
        eps_min_rel=non_negative,
        eps_max_rel=non_negative,
        eps_min=between(0, 1),
        eps_max=between(0, 1),
        steps=at_least(1),
        step_size_rel=positive,
        cues=(not_empty, one_of(CUE_NAMES, "e.g. --set cues=grad_norm,entropy"), distinct),
        mc_samples=at_least(1),
        mc_head_dropout=between(0, 1, high_open=True),
        constant_cue_value=between(0, 1),
        probe_size=at_least(1),
        hist_bins=at_least(1),
        collapse_fraction=between(0, 1, low_open=True),
        collapse_tolerance=non_negative,
        collapse_spread=non_negative,
        eps_target_rel=positive,
    )

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
        """eps_min <= eps_max when both are given the same way (both absolute or both relative)."""
        if (self.eps_min is None) == (self.eps_max is None):
            lo = self.eps_min if self.eps_min is not None else self.eps_min_rel
            hi = self.eps_max if self.eps_max is not None else self.eps_max_rel
            require(lo <= hi, "eps_min", "<= eps_max (swap them)", f"{lo} > {hi}")

    def bounds(self, eps: Fraction) -> tuple[Fraction, Fraction]:
        """(eps_min, eps_max) for a run whose nominal budget is `eps`; HarnessError if unusable."""
        lo = self.eps_min if self.eps_min is not None else _fraction(self.eps_min_rel) * eps
        hi = self.eps_max if self.eps_max is not None else _fraction(self.eps_max_rel) * eps
        for name, value in (("eps_min", lo), ("eps_max", hi)):
            require(
                0 <= value <= 1,
                name,
                "in [0, 1]",
                f"{fraction_str(value)} at run eps {fraction_str(eps)}",
                f"lower {name}_rel or set {name} explicitly",
            )
        require(lo <= hi, "eps_min", "<= eps_max (swap them)", f"{fraction_str(lo)} > {fraction_str(hi)}")
        return lo, hi

    def target(self, eps: Fraction) -> Fraction:
        """The held batch-mean eps; when held, it must lie strictly inside (eps_min, eps_max)."""
        lo, hi = self.bounds(eps)
        value = _fraction(self.eps_target_rel) * eps
        require(
            not self.holds_mean or lo < value < hi,
            "eps_target_rel",
            f"such that the target mean eps lies strictly between eps_min {fraction_str(lo)} and eps_max "
            f"{fraction_str(hi)}",
            f"{self.eps_target_rel} (target {fraction_str(value)})",
            "widen the bounds or change eps_target_rel",
        )
        return value
