"""A small results directory for the report tests: run records written through harness.storage.records
(so they validate), evaluation records and flags following contract B, ADES diagnostics following
contract A, one corrupt record and a second protocol."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.storage.atomic import write_json
from harness.storage.records import SCHEMA_VERSION, write_record

V100 = "Tesla V100-SXM2-16GB"
SWEEP = ("0", "2/255", "4/255", "8/255", "12/255")


@dataclass(frozen=True)
class FakeRun:
    defense: str
    seed: int
    clean: float  # percent, on the test subset
    pgd: float
    autoattack: float | None = None  # None: no evaluation record
    dataset: str = "cifar10"
    model: str = "preact-resnet18"
    eps: str = "8/255"
    n_test: int = 200
    aa_n: int | None = None  # AutoAttack subset size (default n_test)
    epoch_seconds: float = 10.0
    device: str = V100
    failed_check: bool = False
    epochs: int = 3
    held_out: int = 0  # training examples withheld for a scheduler's outer loss (ADES-bilevel)


def _flags(n: int, accuracy: float, seed: int) -> np.ndarray:
    """Exactly round(accuracy% of n) correct examples, at random positions."""
    k = int(round(accuracy / 100 * n))
    flags = np.zeros(n, dtype=bool)
    flags[np.random.default_rng(seed).permutation(n)[:k]] = True
    return flags


def ades_diagnostics(epoch: int) -> dict[str, Any]:
    base = 8 / 255
    return {
        "eps_mean": base,
        "eps_std": 0.004 + 0.001 * epoch,
        "eps_p05": base - 0.008,
        "eps_p50": base,
        "eps_p95": base + 0.008,
        "eps_hist": {"edges": [4 / 255, 6 / 255, 8 / 255, 10 / 255, 12 / 255], "counts": [10, 40 + epoch, 35, 15]},
        "spearman": {"grad_norm": 0.2 * epoch, "entropy": 0.5, "mc_variance": -0.1},
        "probe_eps": [base] * 8,
        "collapse_warning": None,
    }


def epoch_entry(run: FakeRun, p: int) -> dict[str, Any]:
    """The record's entry for pass p: a falling loss, rising accuracies, ADES diagnostics for the ADES family."""
    return {
        "pass": p + 1,
        "equivalent_epoch": p + 1,
        "lr": 0.1,
        "train_seconds": run.epoch_seconds * (1 + 0.02 * ((p + run.seed) % 3)),
        "val_seconds": 1.0,
        "train": {"loss": 2.0 - 0.3 * p, "adv_acc": 0.2 + 0.1 * p},
        "val": {"clean": run.clean - 5 + 2 * p, "pgd": run.pgd - 5 + 2 * p, "n": 100},
        "defense": ades_diagnostics(p) if run.defense in ("ades", "ades-joint", "static-des") else {},
    }


def spec_of(run: FakeRun) -> dict[str, Any]:
    return {
        "defense": run.defense,
        "dataset": run.dataset,
        "model": run.model,
        "eps": run.eps,
        "preset": "quick",
        "seed": run.seed,
        "dropout": 0.0,
        "eval_step": "2/255",
        "defense_config": {"steps": 10},
        "schedule": {"epochs": run.epochs},
        "eval": {"pgd_steps": 20, "pgd_restarts": 1, "test_examples": run.n_test},
    }


def run_record(run: FakeRun, results: Path) -> dict[str, Any]:
    digest = hashlib.sha256(repr(run).encode()).hexdigest()[:10]
    run_id = f"{run.dataset}_{run.defense}_{run.model}_seed{run.seed}_{digest}"
    directory = results / run_id
    final = {
        label: {"clean": run.clean - shift, "pgd": run.pgd - shift, "n": run.n_test, "pass": run.epochs, "seconds": 3.0}
        for label, shift in (("last", 0.0), ("best", 0.5))
    }
    return {
        "schema": SCHEMA_VERSION,
        "run_id": run_id,
        "status": "complete",
        "spec": spec_of(run),
        "defense": {"name": run.defense, "config": {"steps": 10}, "replays": 1},
        "environment": {"device": {"name": run.device, "type": "cuda"}, "git": {"commit": "0" * 40}},
        "protocol": {
            "passes": run.epochs,
            "equivalent_epochs": run.epochs,
            "train_examples": 5000 - run.held_out,
            "held_out_examples": run.held_out,
            "val_examples": 500,
            "test_indices": f"0..{run.n_test - 1}",
            "eval_attack": {"name": "pgd", "steps": 20, "step_size": "2/255", "restarts": 1},
        },
        "epochs": [epoch_entry(run, p) for p in range(run.epochs)],
        "final": final,
        "checkpoints": {"last": str(directory / "last.pt"), "best": str(directory / "best.pt")},
        "created": "2026-01-01T00:00:00+00:00",
    }


def evaluation_record(
    directory: Path,
    checkpoint: dict[str, Any],
    dataset: str,
    model: str,
    n: int,
    clean: float,
    robust: dict[tuple[str, str], float],
    seed: int,
    failed_check: bool = False,
) -> None:
    """evaluation.json + flags.npz (contract B); `robust` maps (attack, eps) -> accuracy %."""
    flags = {"clean": _flags(n, clean, seed)}
    results = []
    for i, ((attack, eps), acc) in enumerate(sorted(robust.items())):
        flags[f"{attack}@{eps}"] = _flags(n, acc, seed * 100 + i)
        accuracy = float(flags[f"{attack}@{eps}"].mean() * 100)
        results.append({"attack": attack, "eps": eps, "robust_accuracy": accuracy, "n": n, "seconds": 1.0})
    checks = [
        {"name": "robust_le_clean", "passed": True, "detail": "ok"},
        {
            "name": "monotone_in_eps",
            "passed": not failed_check,
            "detail": "accuracy rose from 4/255 to 8/255" if failed_check else "ok",
        },
    ]
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / "flags.npz", **flags)
    write_json(
        directory / "evaluation.json",
        {
            "schema": 1,
            "kind": "evaluation",
            "checkpoint": checkpoint,
            "dataset": dataset,
            "model": model,
            "n": n,
            "test_indices": f"0..{n - 1}",
            "config": {"attacks": sorted({a for a, _ in robust})},
            "environment": {"device": {"name": V100}},
            "clean_accuracy": float(flags["clean"].mean() * 100),
            "results": results,
            "checks": checks,
            "flags": "flags.npz",
        },
    )


def write_run(results: Path, run: FakeRun) -> dict[str, Any]:
    record = run_record(run, results)
    write_record(results / record["run_id"] / "record.json", record)
    if run.autoattack is not None:
        n = run.aa_n or run.n_test
        robust = {
            ("pgd-20", eps): max(run.pgd * (1 - 0.08 * (k - 3)), 0.0) if eps != "0" else run.clean
            for k, eps in enumerate(SWEEP)
        }
        robust[("pgd-20", run.eps)] = run.pgd
        robust[("autoattack-standard", run.eps)] = run.autoattack
        evaluation_record(
            results / record["run_id"] / "eval" / "last-abc123",
            {
                "source": "harness",
                "run_id": record["run_id"],
                "label": "last",
                "name": record["run_id"],
                "path": record["checkpoints"]["last"],
                "defense": run.defense,
            },
            run.dataset,
            run.model,
            n,
            run.clean,
            robust,
            seed=run.seed + len(run.defense),
            failed_check=run.failed_check,
        )
    return record


RUNS = (
    FakeRun("pgd-at", 0, 80.0, 45.0, 42.0, epoch_seconds=10.0),
    FakeRun("pgd-at", 1, 81.0, 46.0, 43.0, epoch_seconds=10.2),
    FakeRun("trades", 0, 79.0, 47.0, 44.5, epoch_seconds=11.0),
    FakeRun("static-des", 0, 80.5, 47.5, 44.0, epoch_seconds=10.5),
    FakeRun("ades", 0, 82.0, 50.0, 47.0, epoch_seconds=10.6, failed_check=True),
    FakeRun("ades", 1, 82.5, 50.5, 47.5, epoch_seconds=10.7),
    FakeRun("ades-joint", 0, 81.0, 46.0, None, epoch_seconds=10.6),
    # a second protocol: never averaged with the first
    FakeRun(
        "pgd-at",
        0,
        70.0,
        30.0,
        None,
        dataset="fashion-mnist",
        model="small-cnn",
        eps="1/10",
        n_test=100,
        device="CPU (x86_64)",
        epoch_seconds=2.0,
    ),
)


def build_results(results: Path, runs: tuple[FakeRun, ...] = RUNS, corrupt: bool = True) -> list[dict[str, Any]]:
    records = [write_run(results, run) for run in runs]
    evaluation_record(
        results / "external" / "robustbench-cifar10-Linf-Zhang2019Theoretically" / "eval" / "published-x1",
        {
            "source": "robustbench",
            "run_id": None,
            "label": "published",
            "name": "cifar10-Linf-Zhang2019Theoretically",
            "path": None,
            "defense": "trades",
        },
        "cifar10",
        "WideResNet-34-10",
        500,
        85.0,
        {("autoattack-standard", "0.031"): 53.2},
        seed=7,
    )
    if corrupt:
        (results / "broken_run").mkdir(parents=True, exist_ok=True)
        (results / "broken_run" / "record.json").write_text("{not json")
    return records


def write_json_file(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
