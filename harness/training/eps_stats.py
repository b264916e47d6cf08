"""Per-epoch statistics of per-sample budgets, for the run record (contract A).

Used by every defense that gives each example its own eps (ADES, Static-DES; MMA and IAAT reuse
`eps_summary`): summary statistics, spread, a histogram over [eps_min, eps_max], rank correlations
with each cue, and warnings when the budgets collapse onto a bound or onto a single value.

Rank correlations are computed *within each batch* and averaged over the pass (`spearman`): the
scheduler ranks the examples of one batch against each other (cues are batch-normalised), and
pooling every batch of a pass mixes in batch-to-batch drift (a pooled +0.86 was measured where the
mean within-batch coefficient was -0.24). The pooled coefficient is kept as `spearman_pooled`.
"""

from __future__ import annotations

from typing import Any

import torch

# more than this share of budgets within `tolerance` x (eps_max - eps_min) of one bound: collapsed
COLLAPSE_FRACTION = 0.9
COLLAPSE_TOLERANCE = 0.01
# eps std below this share of (eps_max - eps_min): every example gets (almost) the same budget
COLLAPSE_SPREAD = 0.02


def eps_summary(eps: torch.Tensor, lo: float, hi: float, bins: int = 20) -> dict[str, Any]:
    """Mean, population std, 5/50/95th percentiles, spread and a histogram with `bins` bins on [lo, hi].

    Spread: `eps_std_rel` = std / (hi - lo) and `eps_p05_p95_rel` = (p95 - p05) / (hi - lo), so runs
    with different bounds compare (None when hi == lo).
    """
    eps = eps.detach().double().cpu()
    inside = eps.clamp(lo, hi)  # float32 budgets may overshoot a bound by a rounding error
    q = torch.quantile(eps, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    top = hi if hi > lo else lo + 1e-12  # histc needs a non-empty range
    counts = torch.histc(inside, bins=bins, min=lo, max=top)
    edges = torch.linspace(lo, top, bins + 1, dtype=torch.float64)
    std = eps.std(correction=0).item()
    width = (q[2] - q[0]).item()
    return {
        "eps_mean": eps.mean().item(),
        "eps_std": std,
        "eps_p05": q[0].item(),
        "eps_p50": q[1].item(),
        "eps_p95": q[2].item(),
        "eps_std_rel": std / (hi - lo) if hi > lo else None,
        "eps_p05_p95_rel": width / (hi - lo) if hi > lo else None,
        "eps_hist": {"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]},
    }


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


def mean_or_none(values: list[float | None]) -> float | None:
    """Mean of the defined values; None when there are none."""
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def collapse_warning(
    eps: torch.Tensor,
    lo: float,
    hi: float,
    fraction: float = COLLAPSE_FRACTION,
    tolerance: float = COLLAPSE_TOLERANCE,
    spread: float = COLLAPSE_SPREAD,
    held_mean: float | None = None,
) -> str | None:
    """A message when the budget map is degenerate, else None.

    Two ways: more than `fraction` of budgets within `tolerance` x (hi - lo) of one bound; or the
    std below `spread` x (hi - lo), i.e. (nearly) one eps for every example: a run at a held mean
    `held_mean` is then PGD-AT at that eps, whatever its scheduler claims.
    """
    if hi <= lo:
        return None
    eps = eps.detach().double().cpu()
    band = tolerance * (hi - lo)
    for name, bound in (("eps_min", lo), ("eps_max", hi)):
        share = ((eps - bound).abs() <= band).double().mean().item()
        if share > fraction:
            return (
                f"eps collapsed onto {name}: {share:.1%} of samples within {tolerance:.0%} of the "
                f"range from {name} = {bound:.5f}"
            )
    std_rel = eps.std(correction=0).item() / (hi - lo)
    if std_rel < spread:
        onto = (
            f"the held mean {held_mean:.5f}: this run is PGD-AT at that eps"
            if held_mean is not None
            else f"a single value ({eps.mean().item():.5f}): this run is fixed-eps AT"
        )
        return f"eps collapsed onto {onto} (eps std = {std_rel:.2%} of eps_max - eps_min < {spread:.0%})"
    return None


class PassLog:
    """Budgets and raw cues of every training step of one pass, and within-batch correlations."""

    def __init__(self, cue_names: tuple[str, ...]):
        self.eps: list[torch.Tensor] = []
        self.cues: dict[str, list[torch.Tensor]] = {n: [] for n in cue_names}
        self.batch_rho: dict[str, list[float | None]] = {n: [] for n in cue_names}

    def __len__(self) -> int:
        return len(self.eps)

    def add(self, eps: torch.Tensor, cues: dict[str, torch.Tensor]) -> None:
        eps = eps.detach()
        self.eps.append(eps)
        for name, value in cues.items():
            self.cues[name].append(value.detach())
            self.batch_rho[name].append(spearman(eps, value))

    def summary(
        self, lo: float, hi: float, all_cues: tuple[str, ...], bins: int, held_mean: float | None, **collapse: float
    ) -> dict[str, Any]:
        """Contract A: statistics over the pass; per cue the mean within-batch Spearman (`spearman`),
        its last-batch value and the pooled coefficient (None for a cue not in use or constant);
        `collapse`: fraction / tolerance / spread for `collapse_warning`."""
        eps = torch.cat(self.eps)
        out = eps_summary(eps, lo, hi, bins)
        rho = {n: self.batch_rho.get(n) for n in all_cues}
        out["spearman"] = {n: mean_or_none(r) if r else None for n, r in rho.items()}
        out["spearman_last_batch"] = {n: r[-1] if r else None for n, r in rho.items()}
        out["spearman_pooled"] = {
            n: spearman(eps, torch.cat(self.cues[n])) if self.cues.get(n) else None for n in all_cues
        }
        out["correlation"] = "spearman: mean of per-batch coefficients; spearman_pooled: over the whole pass"
        out["collapse_warning"] = collapse_warning(eps, lo, hi, held_mean=held_mean, **collapse)
        out["n"] = len(eps)
        return out
