"""Reliability checks as code: the usual ways robustness numbers go wrong, tested on every evaluation.

Model checks run on a probe batch before any attack: outputs that look like probabilities (attacks on
CE then see saturated, masked gradients), outputs that change between two identical calls (a
randomised defense needs EOT, i.e. AutoAttack 'rand'), input gradients that are exactly zero
(shattered or masked gradients make PGD look strong), inputs outside [0, 1] (normalisation applied
outside the model). Result checks run on the flags: eps 0 equals clean, accuracy never rises with
eps, robust <= clean point by point, AutoAttack <= PGD-20 (and a large gap flags a PGD that was
fooled by masking), the black-box Square breaking points the white-box attacks missed, and the
warnings AutoAttack itself raised.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np
import torch
from torch import nn

from harness.pgd import model_mode
from harness.config import fraction_str
from harness.evaluation.attacks import cw_margin_loss
from harness.evaluation.flags import WORST_CASE, cell_key, percent

WHITE_BOX = ("pgd-20", "cw-inf")


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Thresholds:
    """Tolerances, in percentage points of accuracy unless said otherwise (recorded with the results)."""

    monotone: float = 0.0  # accuracy may not rise with eps by more than this
    autoattack_over_pgd: float = 0.5  # AutoAttack may exceed PGD-20 by this (sampling noise)
    pgd_autoattack_gap: float = 10.0  # PGD-20 above AutoAttack by more than this: PGD was misled
    square_extra: float = 0.5  # % of points Square breaks that no white-box attack broke
    zero_gradient_fraction: float = 0.01  # fraction of probe points with an all-zero input gradient
    output_change: float = 1e-4  # relative change of the logits between two identical calls
    probability_tol: float = 1e-4


# --------------------------------------------------------------------------- model checks

def model_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: Thresholds = Thresholds()) -> list[Check]:
    """Checks on a probe batch (a few hundred points is plenty); the model is put in eval mode."""
    with model_mode(model, "eval"):
        return [inputs_in_range(x), logits_not_probabilities(model, x, t), deterministic(model, x, t),
                nonzero_input_gradients(model, x, y, t)]


def inputs_in_range(x: torch.Tensor) -> Check:
    lo, hi = float(x.min()), float(x.max())
    ok = lo >= 0 and hi <= 1
    return Check("inputs-in-[0,1]", ok, f"inputs span [{lo:.3g}, {hi:.3g}]"
                 + ("" if ok else "; normalisation belongs inside the model, eps is in [0,1] pixel units"))


def logits_not_probabilities(model: nn.Module, x: torch.Tensor, t: Thresholds) -> Check:
    with torch.no_grad():
        out = model(x).float()
    looks_like_probs = bool(out.min() >= -t.probability_tol and out.max() <= 1 + t.probability_tol
                            and ((out.sum(1) - 1).abs() <= t.probability_tol).all())
    return Check("outputs-are-logits", not looks_like_probs,
                 "outputs are non-negative and sum to 1: the model returns probabilities, so CE attacks "
                 "see saturated gradients; return logits" if looks_like_probs
                 else f"outputs span [{float(out.min()):.3g}, {float(out.max()):.3g}], rows do not sum to 1")


def deterministic(model: nn.Module, x: torch.Tensor, t: Thresholds) -> Check:
    with torch.no_grad():
        a, b = model(x).float(), model(x).float()
    change = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    flips = int((a.argmax(1) != b.argmax(1)).sum())
    ok = change <= t.output_change and flips == 0
    return Check("deterministic-outputs", ok,
                 f"two identical calls differ by {change:.2e} (relative), {flips} predictions flip"
                 + ("" if ok else "; a randomised model needs EOT: use autoattack-rand"))


def nonzero_input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: Thresholds) -> Check:
    """On the CW margin (CE underflows to an exact zero gradient on very confident points)."""
    xg = x.detach().clone().requires_grad_(True)
    loss = cw_margin_loss(1e6)(model(xg), y).sum()  # kappa large: the clamp never cuts the gradient
    (grad,) = torch.autograd.grad(loss, xg)
    per_point = grad.flatten(1).abs().sum(1)
    zero = float((per_point == 0).float().mean())
    nan = int((~torch.isfinite(per_point)).sum())
    ok = zero <= t.zero_gradient_fraction and nan == 0
    return Check("nonzero-input-gradients", ok,
                 f"{zero:.1%} of {len(per_point)} probe points have an all-zero input gradient, {nan} non-finite"
                 + ("" if ok else "; gradient-based attacks are blind here (masking): trust only black-box "
                                  "and AutoAttack numbers, or fix the model"))


# --------------------------------------------------------------------------- result checks

def result_checks(flags: dict[str, np.ndarray], attacks: list[str], eps_list: list[Fraction],
                  warnings: dict[str, list[str]], t: Thresholds = Thresholds()
                  ) -> tuple[list[Check], list[dict[str, str]]]:
    """Checks on the flags of a finished sweep; returns (checks, skipped checks with the reason)."""
    checks: list[Check] = []
    skipped: list[dict[str, str]] = []
    eps_sorted = sorted(eps_list)
    clean = flags["clean"]

    zero = Fraction(0)
    if zero in eps_sorted:
        bad = [a for a in attacks if not np.array_equal(flags[cell_key(a, zero)], clean)]
        checks.append(Check("eps0-equals-clean", not bad,
                            "every attack at eps 0 gives exactly the clean flags" if not bad else
                            f"at eps 0 {', '.join(bad)} differ from clean (a randomised model or a bug)"))
    else:
        skipped.append({"name": "eps0-equals-clean", "reason": "eps 0 is not in the sweep"})

    checks.append(_monotone(flags, attacks + [WORST_CASE], eps_sorted, t))
    over = [f"{k} ({percent(v):.2f} > {percent(clean):.2f})" for k, v in flags.items()
            if k != "clean" and bool(np.any(v & ~clean))]
    checks.append(Check("robust-le-clean", not over, "no point is robust without being clean-correct"
                        if not over else "points robust but not clean-correct in " + ", ".join(over[:3])))

    autoattacks = [a for a in attacks if a.startswith("autoattack-")]
    positive = [e for e in eps_sorted if e > 0]
    if autoattacks and "pgd-20" in attacks and positive:
        checks.extend(_autoattack_vs_pgd(flags, autoattacks, positive, t))
    else:
        skipped.append({"name": "autoattack-le-pgd20", "reason": "needs pgd-20 and an autoattack at eps > 0"})

    white = [a for a in attacks if a in WHITE_BOX or a.startswith("autoattack-")]
    if "square" in attacks and white and positive:
        checks.append(_square_vs_white_box(flags, white, positive, t))
    else:
        skipped.append({"name": "square-vs-white-box",
                        "reason": "needs the square attack and a white-box attack (autoattack-standard "
                                  "runs Square last and reports it under autoattack-warnings)"})

    if autoattacks or "square" in attacks:
        messages = sorted({m for cell in warnings.values() for m in cell})
        checks.append(Check("autoattack-warnings", not messages,
                            "AutoAttack raised no warning" if not messages else " | ".join(messages)[:500]))
    return checks, skipped


def _monotone(flags, attacks, eps_sorted, t: Thresholds) -> Check:
    rises = []
    for attack in attacks:
        accs = [(e, percent(flags[cell_key(attack, e)])) for e in eps_sorted if cell_key(attack, e) in flags]
        for (e0, a0), (e1, a1) in zip(accs, accs[1:]):
            if a1 > a0 + t.monotone:
                rises.append(f"{attack} {a0:.2f} -> {a1:.2f} from {fraction_str(e0)} to {fraction_str(e1)}")
    return Check("monotone-in-eps", not rises, "accuracy never rises with eps" if not rises
                 else "accuracy rises with eps (weak or masked attack): " + "; ".join(rises[:3]))


def _autoattack_vs_pgd(flags, autoattacks, eps_list, t: Thresholds) -> list[Check]:
    above, gaps = [], []
    for attack in autoattacks:
        for e in eps_list:
            if cell_key(attack, e) not in flags or cell_key("pgd-20", e) not in flags:
                continue
            aa, pgd = percent(flags[cell_key(attack, e)]), percent(flags[cell_key("pgd-20", e)])
            if aa > pgd + t.autoattack_over_pgd:
                above.append(f"{attack} {aa:.2f} > pgd-20 {pgd:.2f} at {fraction_str(e)}")
            if pgd - aa > t.pgd_autoattack_gap:
                gaps.append(f"pgd-20 {pgd:.2f} vs {attack} {aa:.2f} at {fraction_str(e)}")
    return [Check("autoattack-le-pgd20", not above, "AutoAttack is at most PGD-20 at every eps" if not above
                  else "AutoAttack weaker than PGD-20: " + "; ".join(above[:3])),
            Check("pgd20-autoattack-gap", not gaps,
                  f"PGD-20 within {t.pgd_autoattack_gap:g} points of AutoAttack" if not gaps else
                  f"PGD-20 overestimates by more than {t.pgd_autoattack_gap:g} points (gradient masking?): "
                  + "; ".join(gaps[:3]))]


def _square_vs_white_box(flags, white, eps_list, t: Thresholds) -> Check:
    worse = []
    for e in eps_list:
        cells = [flags[cell_key(a, e)] for a in white if cell_key(a, e) in flags]
        if cell_key("square", e) not in flags or not cells:
            continue
        white_robust = np.logical_and.reduce(cells)
        extra = percent(white_robust & ~flags[cell_key("square", e)])
        if extra > t.square_extra:
            worse.append(f"Square breaks {extra:.2f}% more at {fraction_str(e)}")
    return Check("square-vs-white-box", not worse, "Square breaks no point the white-box attacks missed"
                 if not worse else "black-box beats white-box (gradient masking): " + "; ".join(worse[:3]))
