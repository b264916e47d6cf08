"""What the masking probes add to the README main job's evaluation (`harness eval ... --attack pgd-20`):
one target's PGD-20 sweep over the data set's eps sweep, with the probes (Square 200 queries, PGD-100
and CW-30 on at most 100 points at one eps, the CE-gradient check) and without them."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from harness.benchmarks.eval_pgd import bench_data, warm_up_pgd_at
from harness.benchmarks.timing import BenchOptions, BenchResult, alternate, ratio_result, register_benchmark
from harness.core.models import build_model
from harness.evaluation.attacks import ATTACKS, AttackOptions
from harness.evaluation.flags import EvaluationStore
from harness.evaluation.masking import ProbeBudget
from harness.evaluation.sweep import sweep


@register_benchmark(
    "eval-probes", "the main job's PGD-20 sweep of one target with the masking probes over the same sweep without them"
)
def eval_probes(options: BenchOptions) -> list[BenchResult]:
    n_test, warm = (128, 10) if options.quick else (500, 150)
    info, (xt, yt), (x, y) = bench_data(4000, n_test, options.device)
    torch.manual_seed(0)
    model = build_model("small-cnn", info).to(options.device)
    warm_up_pgd_at(model, xt, yt, float(info.eps), warm)
    attack = ATTACKS.get("pgd-20").build(AttackOptions(batch_size=500))
    eps_list = sorted(info.eps_sweep)
    header = {
        "checkpoint": {},
        "dataset": info.name,
        "model": "small-cnn",
        "n": len(y),
        "test_indices": f"0..{len(y) - 1}",
        "config": {},
        "environment": {},
    }

    def run(budget: ProbeBudget | None):
        def once():
            with tempfile.TemporaryDirectory() as tmp:
                return sweep(
                    model,
                    x,
                    y,
                    [attack],
                    eps_list,
                    EvaluationStore.create(Path(tmp), header),
                    batch_size=500,
                    probes=budget,
                )

        return once

    result = run(ProbeBudget())()
    seconds = alternate({"pgd-20 sweep + probes": run(ProbeBudget()), "pgd-20 sweep": run(None)}, options)
    failed = [c.name for c in result.checks if not c.passed]
    return [
        ratio_result(
            f"main-job evaluation of one target, small-cnn on {info.name}, n={len(y)}, {len(eps_list)} eps "
            f"({options.device.type})",
            seconds,
            {"with probes / without": ("pgd-20 sweep + probes", "pgd-20 sweep")},
            notes=f"failed checks: {', '.join(failed) or 'none'}; skipped: "
            f"{', '.join(s['name'] for s in result.skipped) or 'none'}",
        )
    ]
