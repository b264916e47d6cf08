"""Every attack at every eps, one (attack, eps) cell at a time, each cell saved as soon as it completes.

The model is put in eval mode with frozen parameters for the whole sweep and restored afterwards.
Clean flags are computed once; each attack sees only the clean-correct points as candidates. The
robust accuracy at an eps is the pointwise worst case over the attacks run there. A cell already in
the store (an interrupted evaluation being resumed) is skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import torch
from torch import nn

from harness.pgd import frozen_parameters, model_mode
from harness.config import fraction_str
from harness.environment import synchronize
from harness.evaluation.attacks import EvalAttack
from harness.evaluation.checks import Check, Thresholds, model_checks, result_checks
from harness.evaluation.flags import WORST_CASE, EvaluationStore, cell_key, percent, worst_case

PROBE_SIZE = 256


@dataclass(frozen=True)
class SweepResult:
    store: EvaluationStore
    checks: list[Check]


def clean_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(xb).argmax(1) == yb for xb, yb in zip(x.split(batch_size), y.split(batch_size))])


def sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: list[EvalAttack], eps_list: list[Fraction],
          store: EvaluationStore, *, batch_size: int = 500, thresholds: Thresholds = Thresholds(),
          say: Callable[[str], None] = lambda _: None) -> SweepResult:
    """Run the missing cells into `store`, then the worst case and the reliability checks."""
    names = [a.name for a in attacks]
    with model_mode(model, "eval"), frozen_parameters(model):
        probe = model_checks(model, x[:PROBE_SIZE], y[:PROBE_SIZE], thresholds)
        if not store.has("clean"):
            store.set_clean(clean_flags(model, x, y, batch_size).cpu().numpy())
            store.save()
        clean = torch.from_numpy(store.flags["clean"]).to(x.device)
        say(f"clean {store.record['clean_accuracy']:.2f}%  (n={len(y)})")
        for attack in attacks:
            for eps in eps_list:
                if store.has(cell_key(attack.name, eps)):
                    continue
                synchronize(x.device)
                t0 = time.perf_counter()
                outcome = attack.robust(model, x, y, eps, clean)
                synchronize(x.device)
                row = store.add_cell(attack.name, eps, (outcome.robust & clean).cpu().numpy(),
                                     time.perf_counter() - t0, outcome.warnings)
                store.save()
                say(f"{attack.name:<20} eps {fraction_str(eps):>7}  {row['robust_accuracy']:6.2f}%  "
                    f"({row['seconds']:.1f}s)")
    for eps in eps_list:
        store.add_cell(WORST_CASE, eps, worst_case(store.flags, names, eps), sum(r["seconds"] for r in store.record["results"]
                                                   if r["eps"] == fraction_str(eps) and r["attack"] in names))
    warnings = {r["attack"] + "@" + r["eps"]: r.get("warnings", []) for r in store.record["results"]}
    checks, skipped = result_checks(store.flags, names, eps_list, warnings, thresholds)
    all_checks = probe + checks
    store.finish([c.to_dict() for c in all_checks], skipped)
    return SweepResult(store, all_checks)


def accuracy_table(store: EvaluationStore, attacks: list[str], eps_list: list[Fraction]) -> list[list[str]]:
    """Rows of formatted accuracies: header, one row per attack, worst case last."""
    rows = [["attack"] + [fraction_str(e) for e in eps_list]]
    for name in attacks + [WORST_CASE]:
        rows.append([name] + [f"{percent(store.flags[cell_key(name, e)]):.2f}"
                              if cell_key(name, e) in store.flags else "-" for e in eps_list])
    return rows


def format_table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows]

