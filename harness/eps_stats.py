"""Per-epoch statistics of per-sample budgets, for the run record (contract A).

Used by every defense that gives each example its own eps (ADES, Static-DES; MMA and IAAT may reuse
it): summary statistics, a histogram over [eps_min, eps_max], rank correlation with each cue, and
a warning when the budgets collapse onto a bound.
"""

from __future__ import annotations

from typing import Any

import torch


def eps_summary(eps: torch.Tensor, lo: float, hi: float, bins: int = 20) -> dict[str, Any]:
    """Mean, population std, 5/50/95th percentiles and a histogram with `bins` equal bins on [lo, hi]."""
    eps = eps.detach().double().cpu()
    inside = eps.clamp(lo, hi)  # float32 budgets may overshoot a bound by a rounding error
    q = torch.quantile(eps, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    top = hi if hi > lo else lo + 1e-12  # histc needs a non-empty range
    counts = torch.histc(inside, bins=bins, min=lo, max=top)
    edges = torch.linspace(lo, top, bins + 1, dtype=torch.float64)
    return {"eps_mean": eps.mean().item(), "eps_std": eps.std(correction=0).item(),
            "eps_p05": q[0].item(), "eps_p50": q[1].item(), "eps_p95": q[2].item(),
            "eps_hist": {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]}}


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties sharing their average rank (as Spearman's rho requires)."""
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    return mean_rank[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rank correlation; None when either side is constant (the correlation is undefined)."""
    a, b = a.detach().double().cpu().flatten(), b.detach().double().cpu().flatten()
    if len(a) < 2:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    if denom.item() == 0:
        return None
    return (ra @ rb / denom).item()


def collapse_warning(eps: torch.Tensor, lo: float, hi: float, fraction: float = 0.9,
                     tolerance: float = 0.01) -> str | None:
    """A message when more than `fraction` of budgets lie within `tolerance` x (hi - lo) of one bound."""
    if hi <= lo:
        return None
    eps = eps.detach().double().cpu()
    band = tolerance * (hi - lo)
    for name, bound in (("eps_min", lo), ("eps_max", hi)):
        share = ((eps - bound).abs() <= band).double().mean().item()
        if share > fraction:
            return (f"eps collapsed onto {name}: {share:.1%} of samples within {tolerance:.0%} of the "
                    f"range from {name} = {bound:.5f}")
    return None
