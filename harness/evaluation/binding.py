"""Bind an evaluation to the exact weights it measured, and refuse weights that are not the run's.

- The evaluation's identity (its directory digest) is the checkpoint's SHA-256 and config, not the
  file's path: an evaluation of other weights is never shown as "already evaluated", and a copied
  results directory still finds its evaluations.
- A harness run is evaluated only once it is complete, on the very files its record hashed when
  it finished (`checkpoint_sha256`), and only if the clean accuracy on the record's test points
  matches the record's (a second line against corrupt weights or a different test set).
- While an evaluation writes, it holds its directory's lock and a shared lock on the run, so
  `harness run --force` cannot delete the run under it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from harness.core.errors import HarnessError
from harness.storage.integrity import mismatch, sha256_file
from harness.storage.locks import hold, remove_stale_temps
from harness.storage.records import RECORD_NAME, read_record, upgrade_record


def bind(loaded) -> dict[str, Any]:
    """Add `sha256` to `loaded.checkpoint`; return the identity that names its evaluation directory."""
    path = Path(loaded.checkpoint.get("path") or "")
    sha = sha256_file(path) if path.is_file() else loaded.checkpoint.get("sha256")  # a module: its state dict's
    loaded.checkpoint["sha256"] = sha
    if loaded.checkpoint.get("source") == "harness":
        _check_finished_run(loaded, sha)
    return {k: v for k, v in loaded.checkpoint.items() if k != "path"}


def _run_record(loaded) -> dict[str, Any]:
    return read_record(Path(loaded.eval_root).parent / RECORD_NAME)


def _check_finished_run(loaded, sha: str | None) -> None:
    record = _run_record(loaded)
    run_dir = Path(loaded.eval_root).parent
    if record["status"] != "complete":
        raise HarnessError(
            f"run {record['run_id']} is still training or was interrupted (status "
            f"{record['status']}): its checkpoints are not the final model; finish it with "
            f"`harness run ... --resume` and evaluate it then"
        )
    label = loaded.checkpoint["label"]
    expected = upgrade_record(record)["checkpoint_sha256"].get(label)
    if expected is not None and sha != expected:
        raise mismatch(
            run_dir / f"{label}.pt",
            expected,
            sha or "(no file)",
            what="checkpoint differs from the one the run record finished with:",
        )


def clean_tolerance(n: int) -> int:
    """Examples by which a re-measured clean accuracy may differ from the record's: one, or 0.1 %
    of n, for the float differences between devices and kernels on borderline points."""
    return max(1, math.ceil(0.001 * n))


def check_clean_accuracy(
    model: torch.nn.Module, loaded, images: torch.Tensor, labels: torch.Tensor, device: torch.device, batch_size: int
) -> None:
    """Clean accuracy on the record's test points must equal the record's (harness runs only)."""
    from harness.core.pgd import frozen_parameters, model_mode
    from harness.evaluation.sweep import clean_flags

    if loaded.checkpoint.get("source") != "harness":
        return
    record = _run_record(loaded)
    final = record["final"].get(loaded.checkpoint["label"]) or {}
    final = record["final"].get(final["same_as"], final) if "same_as" in final else final
    n, recorded = final.get("n"), final.get("clean")
    if not isinstance(n, int) or not isinstance(recorded, (int, float)):
        return  # an older record without the numbers: nothing to compare
    if n > len(labels):
        raise HarnessError(
            f"the run was tested on {n} examples but the test set here has {len(labels)}: "
            f"a different data set in --data-dir?"
        )
    x = images[:n].float().div(255).to(device)
    with model_mode(model, "eval"), frozen_parameters(model):
        correct = int(clean_flags(model, x, labels[:n].to(device), batch_size).sum())
    expected = round(recorded * n / 100)
    if abs(correct - expected) > clean_tolerance(n):
        raise HarnessError(
            f"clean accuracy of {loaded.checkpoint['path']} on the record's {n} test points is "
            f"{100 * correct / n:.2f}%, the record says {recorded:.2f}%: these are not the "
            f"weights (or the test data) the run was measured on; refusing to evaluate"
        )


def reading_run(loaded, wait: bool = False):
    """A shared lock on the evaluated run (none for other sources): no run writes or deletes it meanwhile."""
    if loaded.checkpoint.get("source") != "harness":
        return nullcontext()
    run_dir = Path(loaded.eval_root).parent
    return hold(run_dir, what=f"run {run_dir.name}", wait=wait, shared=True)


@contextmanager
def writing_evaluation(directory: Path, wait: bool = False) -> Iterator[None]:
    """The evaluation directory's exclusive lock; temp files of a killed evaluation are removed."""
    with hold(directory, what=f"evaluation {directory}", wait=wait):
        remove_stale_temps(directory)
        yield
