"""Reliability checks as code: the usual ways robustness numbers go wrong, tested on every evaluation.

Model checks run on a probe batch before any attack: outputs that look like probabilities (attacks on
CE then see saturated, masked gradients), outputs that change between two identical calls (a
randomised defense needs EOT, i.e. AutoAttack 'rand'), input gradients that are exactly zero
(shattered or masked gradients make PGD look strong). Result checks run on the flags of a finished
sweep: raw accuracy never rises with eps, every point an attack broke has a verified adversarial
example, AutoAttack <= PGD-20 (a large gap flags a PGD fooled by masking), CW-inf breaking what PGD-20
missed (saturated cross-entropy), the black-box Square breaking points the white-box attacks missed,
and the warnings AutoAttack itself raised. The masking probes (`masking`) add cheap second opinions
on a subset, so a masked model is flagged even when only PGD-20 runs.

Inputs outside [0, 1] are refused by the sweep before anything runs (normalisation belongs inside the
model); eps 0 is the clean pass itself, so neither is a check that could only pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np
import torch
from torch import nn

from harness.core.config import fraction_str
from harness.core.pgd import model_mode
from harness.evaluation.attacks import cw_margin_loss
from harness.evaluation.flags import cell_key, percent
from harness.evaluation.nesting import raw_key

WHITE_BOX = ("pgd-20", "cw-inf")
PROBE_SIZE = 256  # points of the model checks' probe batch


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Skipped:
    """A check that did not run: why, and the attacks whose addition would run it."""

    name: str
    reason: str
    needs: tuple[str, ...] = ()

    def to_dict(self, command: str | None = None) -> dict:
        out = {"name": self.name, "reason": self.reason, "needs": list(self.needs)}
        if command:
            out["command"] = command
        return out


@dataclass(frozen=True)
class Thresholds:
    """Tolerances, in percentage points of accuracy unless said otherwise (recorded with the results)."""

    monotone: float = 0.0  # raw accuracy may not rise with eps by more than this
    autoattack_over_pgd: float = 0.5  # AutoAttack may exceed PGD-20 by this (sampling noise)
    pgd_autoattack_gap: float = 10.0  # PGD-20 above AutoAttack by more than this: PGD was misled
    pgd_cw_gap: float = 10.0  # % of points CW-inf breaks that PGD-20 left robust: CE saturated
    square_extra: float = 0.5  # % of points Square breaks that no white-box attack broke
    more_steps_drop: float = 1.0  # % of points PGD-100 breaks that PGD-20 left robust: not converged
    probe_min_points: int = 2  # a subset probe fails only on at least this many points
    gradient_ascent_fraction: float = 0.75  # a step along the input gradient must raise the loss this often
    zero_gradient_fraction: float = 0.01  # fraction of probe points with an all-zero input gradient
    vanishing_ce_fraction: float = 0.05  # fraction of clean-correct probe points with no CE gradient
    vanishing_gradient: float = 1e-30  # largest |d CE / d x| entry at or below this: vanished
    output_change: float = 1e-4  # relative change of the logits between two identical calls
    probability_tol: float = 1e-4


# --------------------------------------------------------------------------- model checks


def model_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: Thresholds = Thresholds()) -> list[Check]:
    """Checks on a probe batch (a few hundred points is plenty); the model is put in eval mode."""
    with model_mode(model, "eval"):
        return [
            logits_not_probabilities(model, x, t),
            deterministic(model, x, t),
            nonzero_input_gradients(model, x, y, t),
        ]


def logits_not_probabilities(model: nn.Module, x: torch.Tensor, t: Thresholds) -> Check:
    with torch.no_grad():
        out = model(x).float()
    looks_like_probs = bool(
        out.min() >= -t.probability_tol
        and out.max() <= 1 + t.probability_tol
        and ((out.sum(1) - 1).abs() <= t.probability_tol).all()
    )
    return Check(
        "outputs-are-logits",
        not looks_like_probs,
        "outputs are non-negative and sum to 1: the model returns probabilities, so CE attacks "
        "see saturated gradients; return logits"
        if looks_like_probs
        else f"outputs span [{float(out.min()):.3g}, {float(out.max()):.3g}], rows do not sum to 1",
    )


def deterministic(model: nn.Module, x: torch.Tensor, t: Thresholds) -> Check:
    with torch.no_grad():
        a, b = model(x).float(), model(x).float()
    change = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    flips = int((a.argmax(1) != b.argmax(1)).sum())
    ok = change <= t.output_change and flips == 0
    return Check(
        "deterministic-outputs",
        ok,
        f"two identical calls differ by {change:.2e} (relative), {flips} predictions flip"
        + ("" if ok else "; a randomised model needs EOT: use autoattack-rand"),
    )


def nonzero_input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: Thresholds) -> Check:
    """On the CW margin (CE underflows to an exact zero gradient on very confident points), at the
    clean-correct probe points: only there can a blind attack leave a robust number too high (a
    misclassified point in a dead-ReLU region, constant output, is broken at eps 0 already)."""
    xg = x.detach().clone().requires_grad_(True)
    logits = model(xg)
    loss = cw_margin_loss(1e6)(logits, y).sum()  # kappa large: the clamp never cuts the gradient
    (grad,) = torch.autograd.grad(loss, xg)
    correct = logits.detach().argmax(1) == y
    per_point = grad.flatten(1).abs().sum(1)
    zero = float((per_point[correct] == 0).float().mean()) if bool(correct.any()) else 0.0
    nan = int((~torch.isfinite(per_point)).sum())
    ok = zero <= t.zero_gradient_fraction and nan == 0
    return Check(
        "nonzero-input-gradients",
        ok,
        f"{zero:.1%} of {int(correct.sum())} clean-correct probe points have an all-zero input gradient, "
        f"{nan} non-finite"
        + (
            ""
            if ok
            else "; gradient-based attacks are blind here (masking): trust only black-box "
            "and AutoAttack numbers, or fix the model"
        ),
    )


def ce_gradients_not_vanishing(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: Thresholds) -> Check:
    """The gradient a cross-entropy attack follows, at the clean-correct probe points: where softmax
    saturates (logits scaled up, over-confident models) it is exactly zero and PGD-CE cannot move."""
    with model_mode(model, "eval"):
        xg = x.detach().clone().requires_grad_(True)
        logits = model(xg)
        correct = logits.detach().argmax(1) == y
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
    largest = grad.flatten(1).abs().max(1).values[correct]
    if len(largest) == 0:
        return Check("ce-gradients-not-vanishing", True, "no clean-correct probe point to test")
    vanished = float(((largest <= t.vanishing_gradient) | ~torch.isfinite(largest)).float().mean())
    ok = vanished <= t.vanishing_ce_fraction
    return Check(
        "ce-gradients-not-vanishing",
        ok,
        f"{vanished:.1%} of {len(largest)} clean-correct probe points have a vanishing cross-entropy "
        f"input gradient"
        + (
            ""
            if ok
            else "; the softmax saturates, so PGD on CE cannot move there "
            "(gradient masking): trust CW/DLR-based numbers"
        ),
    )


# --------------------------------------------------------------------------- result checks


def result_checks(
    flags: dict[str, np.ndarray],
    attacks: list[str],
    eps_list: list[Fraction],
    rows: list[dict],
    t: Thresholds = Thresholds(),
    also_verified: tuple[str, ...] = (),
) -> tuple[list[Check], list[Skipped]]:
    """Checks on the flags and result rows of a finished sweep; returns (checks, skipped checks).
    `also_verified`: cells beyond the attacks whose examples are checked too (the escalation's)."""
    checks: list[Check] = []
    skipped: list[Skipped] = []
    eps_sorted = sorted(eps_list)
    positive = [e for e in eps_sorted if e > 0]

    checks.append(_monotone(flags, attacks, eps_sorted, t))
    checks.append(_examples_verified(rows, attacks + list(also_verified)))

    autoattacks = [a for a in attacks if a.startswith("autoattack-")]
    if autoattacks and "pgd-20" in attacks and positive:
        checks.extend(_autoattack_vs_pgd(flags, autoattacks, positive, t))
    else:
        needs = tuple(
            a
            for a in ("pgd-20", "autoattack-standard")
            if a not in attacks and not (a == "autoattack-standard" and autoattacks)
        )
        for name in ("autoattack-le-pgd20", "pgd20-autoattack-gap"):
            skipped.append(Skipped(name, "needs pgd-20 and an AutoAttack at eps > 0", needs))

    if "pgd-20" in attacks and "cw-inf" in attacks and positive:
        checks.append(_pgd_vs_cw(flags, positive, t))

    white = [a for a in attacks if a in WHITE_BOX or a.startswith("autoattack-")]
    if "square" in attacks and white and positive:
        checks.append(_square_vs_white_box(flags, white, positive, t))
    else:
        needs = tuple(a for a in ("pgd-20", "square") if a not in attacks and not (a == "pgd-20" and white))
        skipped.append(Skipped("square-vs-white-box", SQUARE_NEEDS, needs))

    if autoattacks or "square" in attacks:
        checks.append(_autoattack_warnings(rows))
    else:
        skipped.append(Skipped("autoattack-warnings", "AutoAttack did not run", ("autoattack-standard",)))
    return checks, skipped


SQUARE_NEEDS = (
    "needs the full Square attack (5000 queries) besides a white-box attack; "
    "the square-probe check runs a small budget instead"
)


def _autoattack_warnings(rows: list[dict]) -> Check:
    messages = sorted({m for row in rows for m in row.get("warnings", [])})
    detail = "AutoAttack raised no warning" if not messages else " | ".join(messages)[:500]
    return Check("autoattack-warnings", not messages, detail)


def _raw(flags, attack, e):
    return flags.get(raw_key(attack, e), flags.get(cell_key(attack, e)))


def _monotone(flags, attacks, eps_sorted, t: Thresholds) -> Check:
    """On the raw per-eps flags: the nested-ball combination makes the reported ones monotone by
    construction, so only the raw ones can show an attack that got weaker at a larger budget."""
    rises = []
    for attack in attacks:
        accs = [(e, percent(_raw(flags, attack, e))) for e in eps_sorted if _raw(flags, attack, e) is not None]
        for (e0, a0), (e1, a1) in zip(accs, accs[1:]):
            if a1 > a0 + t.monotone:
                rises.append(f"{attack} {a0:.2f} -> {a1:.2f} from {fraction_str(e0)} to {fraction_str(e1)}")
    return Check(
        "monotone-in-eps",
        not rises,
        "raw accuracy never rises with eps"
        if not rises
        else "raw accuracy rises with eps (weak or masked attack): " + "; ".join(rises[:3]),
    )


def _examples_verified(rows: list[dict], attacks: list[str]) -> Check:
    """Every point an attack counted as broken comes with an example that a fresh forward pass
    misclassifies, inside the ball and in [0, 1] (`sweep.verify` fills `verified` per cell)."""
    failures, broken, unverifiable = [], 0, 0
    for row in rows:
        info = row.get("verified")
        if row["attack"] not in attacks or not info:
            continue
        broken += info["broken"]
        unverifiable += info["unverifiable"]
        if info["failed"]:
            failures.append(f"{row['attack']}@{row['eps']}: {info['failed']} of {info['broken']} ({info['why']})")
    note = f" ({unverifiable} broken before an interruption, examples not kept)" if unverifiable else ""
    return Check(
        "adversarial-examples-verified",
        not failures,
        f"all {broken - unverifiable} broken points re-checked: misclassified, in the ball, in [0,1]{note}"
        if not failures
        else "points counted as broken without a valid adversarial example: " + "; ".join(failures[:3]),
    )


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
    return [
        Check(
            "autoattack-le-pgd20",
            not above,
            "AutoAttack is at most PGD-20 at every eps"
            if not above
            else "AutoAttack weaker than PGD-20: " + "; ".join(above[:3]),
        ),
        Check(
            "pgd20-autoattack-gap",
            not gaps,
            f"PGD-20 within {t.pgd_autoattack_gap:g} points of AutoAttack"
            if not gaps
            else f"PGD-20 overestimates by more than {t.pgd_autoattack_gap:g} points (gradient masking?): "
            + "; ".join(gaps[:3]),
        ),
    ]


def _pgd_vs_cw(flags, eps_list, t: Thresholds) -> Check:
    """Points the CW margin breaks but PGD on cross-entropy does not: CE saturation (logits scaled up,
    probabilities) hides gradients from CE but not from the scale-free margin."""
    gaps = []
    for e in eps_list:
        pgd, cw = flags.get(cell_key("pgd-20", e)), flags.get(cell_key("cw-inf", e))
        if pgd is None or cw is None:
            continue
        extra = percent(pgd & ~cw)
        if extra > t.pgd_cw_gap and int(np.sum(pgd & ~cw)) >= t.probe_min_points:
            gaps.append(f"cw-inf breaks {extra:.2f}% that pgd-20 left robust at {fraction_str(e)}")
    return Check(
        "pgd20-cw-gap",
        not gaps,
        f"CW-inf breaks at most {t.pgd_cw_gap:g}% of points PGD-20 left robust"
        if not gaps
        else "PGD-20 misled (saturated cross-entropy?): " + "; ".join(gaps[:3]),
    )


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
    return Check(
        "square-vs-white-box",
        not worse,
        "Square breaks no point the white-box attacks missed"
        if not worse
        else "black-box beats white-box (gradient masking): " + "; ".join(worse[:3]),
    )
