"""The evaluation suite behind `harness eval`: attacks, eps sweeps, per-sample flags, reliability checks.

- `attacks`: PGD-k (CE), CW-inf (margin PGD), AutoAttack through `pyautoattack`, Square; one call
  `robust(model, x, y, eps, candidates) -> (x_adv, robust flags)`, registered in `ATTACKS`.
- `sweep`: every attack at every eps, one (attack, eps) cell at a time, each cell saved as it completes.
- `flags`: the evaluation record (contract B) and its `flags.npz`.
- `checks`: reliability checks as code (model checks before attacking, result checks after).
- `checkpoints`: the harness's own runs, plain state dicts with a named architecture, RobustBench models.
"""

from harness.evaluation import attacks  # noqa: F401  (registers the evaluation attacks)
