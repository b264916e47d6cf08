"""Minimal end-of-run evaluation: clean and PGD-k accuracy with per-sample flags.

The full suite (CW-inf, AutoAttack, eps sweeps, reliability checks) lives in `harness eval`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harness.core.pgd import model_mode, pgd_until_fooled


@dataclass(frozen=True)
class Accuracy:
    clean: torch.Tensor  # (N,) bool: correct on the clean input
    robust: torch.Tensor  # (N,) bool: clean-correct and no iterate of any restart fools it
    predicted: torch.Tensor  # (N,) long: the clean prediction (a constant predictor shows here, not in accuracy)

    def class_counts(self, num_classes: int) -> list[int]:
        """How many examples the model assigns to each class (clean inputs)."""
        return torch.bincount(self.predicted, minlength=num_classes).tolist()

    def summary(self, prefix: str = "") -> dict[str, float | int]:
        n = len(self.clean)
        return {
            f"{prefix}clean": self.clean.float().mean().item() * 100,
            f"{prefix}pgd": self.robust.float().mean().item() * 100,
            f"{prefix}n": n,
        }


def clean_and_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    restarts: int = 1,
    batch_size: int = 256,
    progress=None,
) -> Accuracy:
    """Per-sample clean and PGD-`steps` correctness, model in eval mode, in batches.

    The same counting as `harness eval`: a point is broken when any iterate fools it, so the run
    record's PGD accuracy and the evaluation suite's agree by construction.
    """
    clean, robust, predicted = [], [], []
    with model_mode(model, "eval"):
        for start in range(0, len(y), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            with torch.no_grad():
                guess = model(xb).argmax(1)
            ok = guess == yb
            rob = ok.clone()
            for _ in range(restarts):  # each restart attacks only the points still standing
                alive = rob.nonzero().squeeze(1)
                if len(alive) == 0:
                    break
                _, fooled = pgd_until_fooled(model, xb[alive], yb[alive], eps, steps=steps, step_size=step_size)
                rob[alive[fooled]] = False
            clean.append(ok.cpu())
            predicted.append(guess.cpu())
            robust.append(rob.cpu())
            if progress is not None:
                progress.update(len(yb))
    return Accuracy(torch.cat(clean), torch.cat(robust), torch.cat(predicted))
