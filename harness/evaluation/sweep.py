"""Every attack at every eps, one (attack, eps) cell at a time, each cell saved as soon as it completes.

The model is put in eval mode with frozen parameters for the whole sweep and restored afterwards.
Clean flags are computed once (in batches); eps 0 is that clean pass for every attack, with no attack
step (the ball is the point itself). Each attack sees only the clean-correct points as candidates,
and every point it breaks is re-checked (`verify`). A cell already in the store (an interrupted
evaluation being resumed) is skipped. When the cells are done, the flags are combined over nested
balls (`nesting`, on by default), the robust accuracy at an eps is the pointwise worst case over the
attacks, and the reliability checks and masking probes run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from harness.core.config import fraction_str
from harness.core.environment import synchronize
from harness.core.errors import HarnessError
from harness.core.pgd import frozen_parameters, model_mode
from harness.evaluation.attacks import AttackOutcome, EvalAttack, eps_tensor, predict_correct
from harness.evaluation.checks import PROBE_SIZE, Check, Skipped, Thresholds, model_checks, result_checks
from harness.evaluation.escalation import ESCALATED_CELLS, Escalated, escalated_worst_case
from harness.evaluation.flags import WORST_CASE, EvaluationStore, cell_key, percent, worst_case
from harness.evaluation.masking import ProbeBudget, ProbeResult, gradient_check, masking_probes, probes_skipped
from harness.evaluation.nesting import nest_balls


@dataclass(frozen=True)
class SweepResult:
    store: EvaluationStore
    checks: list[Check]
    skipped: list[dict]


def clean_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    return predict_correct(model, x, y, batch_size)


def sweep(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: list[EvalAttack],
    eps_list: list[Fraction],
    store: EvaluationStore,
    *,
    batch_size: int = 500,
    thresholds: Thresholds = Thresholds(),
    nested: bool = True,
    probes: ProbeBudget | None = ProbeBudget(),
    rerun: Callable[[list[str]], str] | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> SweepResult:
    """Run the missing cells into `store`, then the worst case, the checks and the masking probes.

    `rerun(attack names)` gives the command that would run a skipped check (stored with it).
    """
    _check_unit_range(x)
    names = [a.name for a in attacks]
    with model_mode(model, "eval"), frozen_parameters(model):
        probe = model_checks(model, x[:PROBE_SIZE], y[:PROBE_SIZE], thresholds)
        gradient, gradient_skipped = gradient_check(model, x[:PROBE_SIZE], y[:PROBE_SIZE], attacks, thresholds)
        if not store.has("clean"):
            store.set_clean(clean_flags(model, x, y, batch_size).cpu().numpy())
            store.save()
        clean = torch.from_numpy(store.flags["clean"]).to(x.device)
        say(f"clean {store.record['clean_accuracy']:.2f}%  (n={len(y)})")
        for attack in attacks:
            for eps in eps_list:
                if not store.has(cell_key(attack.name, eps)):
                    _run_cell(model, x, y, attack, eps, clean, store, say)
        if nested:
            nest_balls(store, names, eps_list)
        _add_worst_case(store, names, eps_list)
        masking = _probes(model, x, y, store, attacks, eps_list, probes, thresholds, nested)
        record_escalations(model, x, y, store, masking.escalations, eps_list, nested)
        for escalated in masking.escalations:
            say(f"escalated {escalated.summary(store.accuracy(WORST_CASE, escalated.eps))}  ({escalated.seconds:.1f}s)")
        checks, skipped = result_checks(
            store.flags, names, eps_list, store.record["results"], thresholds, also_verified=ESCALATED_CELLS
        )
    all_checks = probe + gradient + checks + masking.checks
    all_skipped = [s.to_dict(_command(s, names, rerun)) for s in gradient_skipped + skipped + masking.skipped]
    store.finish([c.to_dict() for c in all_checks], all_skipped)
    return SweepResult(store, all_checks, all_skipped)


def _check_unit_range(x: torch.Tensor) -> None:
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise HarnessError(
            f"inputs span [{lo:.3g}, {hi:.3g}], outside [0, 1]: eps is in [0, 1] pixel units, "
            f"so normalisation belongs inside the model"
        )


def _add_worst_case(store: EvaluationStore, names: list[str], eps_list: list[Fraction]) -> None:
    """The pointwise worst case over the attacks per eps; its seconds are the attacks' at that eps."""
    for eps in eps_list:
        seconds = sum(
            r["seconds"] for r in store.record["results"] if r["eps"] == fraction_str(eps) and r["attack"] in names
        )
        store.add_cell(WORST_CASE, eps, worst_case(store.flags, names, eps), seconds)


def _probes(model, x, y, store, attacks, eps_list, probes: ProbeBudget | None, thresholds, nested: bool) -> ProbeResult:
    if probes is None:
        return ProbeResult([], probes_skipped(attacks))
    return masking_probes(model, x, y, store.flags, attacks, eps_list, probes, thresholds, nested)


def _run_cell(
    model,
    x,
    y,
    attack: EvalAttack,
    eps: Fraction,
    clean: torch.Tensor,
    store: EvaluationStore,
    say: Callable[[str], None],
) -> None:
    synchronize(x.device)
    t0 = time.perf_counter()
    if eps == 0:  # the clean pass is the whole attack: nothing in the ball but the point
        outcome = AttackOutcome(x, clean.clone())
    else:
        outcome = attack.robust(model, x, y, eps, clean)
    synchronize(x.device)
    seconds = time.perf_counter() - t0
    row = store.add_cell(attack.name, eps, (outcome.robust & clean).cpu().numpy(), seconds, outcome.warnings)
    row["verified"] = verify(model, x, y, eps, outcome, clean)
    store.save()
    say(f"{attack.name:<20} eps {fraction_str(eps):>7}  {row['robust_accuracy']:6.2f}%  ({row['seconds']:.1f}s)")


def record_escalations(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    store: EvaluationStore,
    escalations: list[Escalated],
    eps_list: list[Fraction],
    nested: bool,
) -> None:
    """Each escalated worst case becomes the reported one at its eps (and, with nested balls, at every
    larger eps); the sweep's cells stay, so the record keeps both numbers, a cell `pgd-escalated@<eps>`
    holds what each escalation left robust, and `escalations` says what ran."""
    if not escalations:
        return
    verified = {}
    for i, escalated in enumerate(escalations):  # each ran on what the ones before it left robust
        standing = torch.from_numpy(
            escalated_worst_case(store.flags, eps_list, escalations[:i], nested)[escalated.eps]
        ).to(x.device)
        row = store.add_cell(escalated.cell, escalated.eps, escalated.robust.cpu().numpy(), escalated.seconds)
        row["verified"] = verified[escalated.eps] = verify(
            model, x, y, escalated.eps, AttackOutcome(escalated.x_adv, escalated.robust), standing
        )
    worst = escalated_worst_case(store.flags, eps_list, escalations, nested)
    for row in [r for r in store.record["results"] if r["attack"] == WORST_CASE]:
        eps = Fraction(row["eps"])
        extra = sum(e.seconds for e in escalations if e.eps == eps)
        store.add_cell(WORST_CASE, eps, worst[eps], row["seconds"] + extra)
    store.record["escalations"] = [e.record(percent(worst[e.eps]), verified[e.eps]) for e in escalations]


def verify(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: Fraction | float,
    outcome: AttackOutcome,
    candidates: torch.Tensor,
    batch_size: int = 500,
) -> dict:
    """Re-check every point the attack broke: its example is within eps of x (L-inf), in [0, 1], and
    a fresh forward pass misclassifies it. Counts, and the first reason of failure."""
    broken = candidates & ~outcome.robust
    unverifiable = broken & outcome.unverifiable if outcome.unverifiable is not None else torch.zeros_like(broken)
    idx = (broken & ~unverifiable).nonzero().squeeze(1)
    if len(idx) == 0:
        return {"broken": int(broken.sum()), "unverifiable": int(unverifiable.sum()), "failed": 0, "why": ""}
    adv, clean_x = outcome.x_adv[idx], x[idx]
    budget = eps_tensor(eps, x)[idx].view(-1, *([1] * (x.dim() - 1)))
    outside = ((adv - clean_x).abs() > budget + 1e-6).flatten(1).any(1)
    off_box = ((adv < 0) | (adv > 1)).flatten(1).any(1)
    correct = predict_correct(model, adv, y[idx], batch_size)
    reasons = [
        why
        for why, bad in (
            ("outside the ball", outside),
            ("outside [0,1]", off_box),
            ("still classified correctly", correct),
        )
        if bool(bad.any())
    ]
    return {
        "broken": int(broken.sum()),
        "unverifiable": int(unverifiable.sum()),
        "failed": int((outside | off_box | correct).sum()),
        "why": ", ".join(reasons),
    }


def _command(skipped: Skipped, names: list[str], rerun: Callable[[list[str]], str] | None) -> str | None:
    if rerun is None:
        return None
    return rerun(list(dict.fromkeys(names + list(skipped.needs))))


def accuracy_table(store: EvaluationStore, attacks: list[str], eps_list: list[Fraction]) -> list[list[str]]:
    """Rows of formatted accuracies: header, one row per attack, worst case last."""
    rows = [["attack"] + [fraction_str(e) for e in eps_list]]
    escalated = [c for c in ESCALATED_CELLS if any(cell_key(c, e) in store.flags for e in eps_list)]
    for name in attacks + escalated + [WORST_CASE]:
        rows.append(
            [name]
            + [
                f"{percent(store.flags[cell_key(name, e)]):.2f}" if cell_key(name, e) in store.flags else "-"
                for e in eps_list
            ]
        )
    return rows


def format_table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows
    ]
