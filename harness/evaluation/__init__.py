"""The evaluation suite behind `harness eval`: attacks, eps sweeps, per-sample flags, reliability checks.

- `attacks`: PGD-k (CE), CW-inf (margin PGD), AutoAttack through `pyautoattack`, Square (full, and
  `QuickSquare` with a small query budget); one call `robust(model, x, y, eps, candidates)`,
  registered in `ATTACKS`.
- `sweep`: every attack at every eps, one (attack, eps) cell at a time, each cell saved as it completes;
  eps 0 is the clean pass; every broken point is verified.
- `nesting`: flags combined over nested L-inf balls, raw per-eps flags kept.
- `flags`: the evaluation record (contract B) and its `flags.npz`.
- `checks`: reliability checks as code (model checks before attacking, result checks after).
- `masking`: cheap probes on a bounded subset (Square, PGD-100, CW) so masking is caught by PGD-20 alone.
- `checkpoints`: the harness's own runs, plain state dicts with a named architecture, RobustBench models;
  `safe_load` reads foreign checkpoints weights-only (HTML pages, code-running pickles refused).
- `model_info`: our runs as RobustBench model_info JSON (`harness export --format robustbench`).
"""

from harness.evaluation import attacks  # noqa: F401  (registers the evaluation attacks)
