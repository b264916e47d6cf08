"""Static-DES: the paper's ablation of ADES with a fixed weighted sum of the cues instead of the MLP.

Paper: "Adaptive Dynamic Epsilon Scheduling" (docs/paper.md), section 3.3 ("instead of fixed
weighted sum") and Table 2 ("Static Weighted Fusion"): score_i = sum_k w_k s_ik over the batch-min-max
normalised cues s_i, eps_i = eps_min + (eps_max - eps_min) * score_i, PGD-10 inside each sample's
ball, CE on the adversarial batch.
Reference code: none published; the cue, eps-map and attack pipeline is ADES's
(`methods/ades/cue_schedule.py`, `methods/ades/cues.py`), so the two differ only in the map.
Defaults (the paper gives no weights): equal weights 1/3 (the neutral choice); weights are divided
by their sum, so any non-negative weights keep the score in [0, 1].
Budget: by default the batch-mean eps is held at the run's eps by the same renormalisation as `ades`
(`budget_control=renormalise`, `eps_target_rel`), so Table 2 compares the two maps at one average
budget. Without it (`budget_control=none`) the mean is wherever the normalised cues put it: on
Fashion-MNIST's quick preset it sank from 0.089 to 0.081 at eps 0.1 over 3 epochs, so the ablation
would also compare a smaller average budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from harness.core.defense import register_defense
from harness.core.validation import Rule, non_negative, require, rules
from methods.ades.cue_config import CueEpsConfig
from methods.ades.cue_schedule import CueScheduledDefense


@dataclass(frozen=True)
class StaticDESConfig(CueEpsConfig):
    weights: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)  # one per cue, in the order of `cues`
    budget_control: Literal["renormalise", "none"] = "renormalise"  # hold the batch-mean eps, or not

    @property
    def renormalises(self) -> bool:
        return self.budget_control == "renormalise"

    RULES = rules(CueEpsConfig.RULES, weights=(non_negative, Rule("of positive sum", lambda w: sum(w) > 0, each=False)))

    def validate(self) -> None:
        super().validate()
        require(
            len(self.weights) == len(self.cues),
            "weights",
            f"one weight per cue ({','.join(self.cues)})",
            f"{len(self.weights)} weights",
            "e.g. --set weights=1,0,0",
        )


@register_defense("static-des")
class StaticDES(CueScheduledDefense):
    """Static-DES (the paper's ablation): per-sample eps from fixed weights over the normalised cues."""

    Config = StaticDESConfig
    label = "Static-DES"

    def score(self, s, track):
        w = torch.tensor(self.config.weights, dtype=s.dtype, device=s.device)
        return (s @ (w / w.sum())).clamp(0, 1)

    def record(self):
        return {**super().record(), "budget_control": self.config.budget_control}
