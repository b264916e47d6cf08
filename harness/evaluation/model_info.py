"""Our own runs as RobustBench model_info JSON, so they can be compared with (or submitted to) the
leaderboard next to published checkpoints.

The fields are those of robustbench's `ModelInfo` (robustbench/utils.py) and its leaderboard
template: accuracies as strings with two decimals, eps as written in the sweep ("8/255"), venue ""
(rendered "Unpublished" by robustbench). What RobustBench has no field for (defense, schedule, seed,
commit, the AutoAttack version and n, failed reliability checks) goes into `footnote`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.config import fraction_str, parse_eps
from harness.core.errors import HarnessError
from harness.evaluation.evaluation_record import EvaluationRecord
from harness.evaluation.flags import iter_evaluations
from harness.storage.records import RECORD_NAME, read_record

# robustbench.utils.ModelInfo's fields, in its order (robustbench 1.1.1)
MODEL_INFO_FIELDS = (
    "link",
    "name",
    "authors",
    "additional_data",
    "number_forward_passes",
    "dataset",
    "venue",
    "architecture",
    "eps",
    "clean_acc",
    "reported",
    "corruptions_acc",
    "corruptions_acc_3d",
    "corruptions_mce",
    "corruptions_mce_3d",
    "autoattack_acc",
    "footnote",
)
# the fields the leaderboard's template example fills: the corruption entries and the footnote are optional
LEADERBOARD_FIELDS = tuple(f for f in MODEL_INFO_FIELDS if not f.startswith("corruptions") and f != "footnote")


@dataclass(frozen=True)
class Export:
    name: str  # file stem: <dataset>/Linf/<name>.json
    dataset: str
    info: dict[str, Any]
    warnings: list[str]
    n: int  # test points AutoAttack ran on (the largest evaluation wins)


def find_autoattack(record: dict[str, Any], eps: str) -> dict[str, Any] | None:
    rows = [r for r in record["results"] if r["attack"].startswith("autoattack-") and r["eps"] == eps]
    return max(rows, key=lambda r: r["n"]) if rows else None


def model_info(run: dict[str, Any], evaluation: dict[str, Any], eps: str) -> Export | None:
    """The model_info of one run's evaluation at `eps`, or None when it has no AutoAttack there."""
    aa = find_autoattack(evaluation, eps)
    if aa is None:
        return None
    pgd = next((r for r in evaluation["results"] if r["attack"] == "pgd-20" and r["eps"] == eps), None)
    spec, git = run["spec"], (run["environment"].get("git") or {})
    failed = [c["name"] for c in evaluation["checks"] if not c["passed"]]
    label = evaluation["checkpoint"]["label"]
    aa_config = evaluation["config"]["attacks"].get(aa["attack"], {})
    footnote = (
        f"harness run {run['run_id']} ({label} checkpoint): defense {spec['defense']}, {spec['model']}, "
        f"{spec['schedule']['epochs']} epochs (preset {spec.get('preset')}), training eps {spec['eps']}, "
        f"seed {spec['seed']}, commit {(git.get('commit') or 'unknown')[:12]}"
        f"{' (dirty)' if git.get('dirty') else ''}; {aa['attack']} "
        f"(version {aa_config.get('version', '?')}) on test points {evaluation['test_indices']} "
        f"(n={aa['n']}); reported = our PGD-20."
    )
    if failed:
        footnote += " Potentially unreliable: failed checks " + ", ".join(failed) + "."
    info = {
        "link": "",
        "name": f"{spec['defense']} ({spec['model']}, {spec['dataset']}, seed {spec['seed']})",
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": spec["dataset"],
        "venue": "",
        "architecture": spec["model"],
        "eps": eps,
        "clean_acc": f"{evaluation['clean_accuracy']:.2f}",
        "reported": f"{pgd['robust_accuracy']:.2f}" if pgd else None,
        "autoattack_acc": f"{aa['robust_accuracy']:.2f}",
        "footnote": footnote,
    }
    info = {k: v for k, v in info.items() if v is not None}
    validate(info)
    name = run["run_id"] + ("" if label == "last" else f"_{label}")
    warnings = [f"{name}: checks failed ({', '.join(failed)}); exported with the footnote saying so"] if failed else []
    return Export(name, spec["dataset"], info, warnings, int(aa["n"]))


def validate(info: dict[str, Any]) -> None:
    """Fields robustbench knows, the leaderboard's fields present, accuracies parseable as numbers."""
    unknown = [k for k in info if k not in MODEL_INFO_FIELDS]
    missing = [k for k in LEADERBOARD_FIELDS if k not in info and k != "reported"]
    if unknown or missing:
        raise HarnessError(f"model_info: unknown fields {unknown}, missing {missing}")
    for key in ("clean_acc", "autoattack_acc", "reported"):
        if key in info:
            float(info[key])
    parse_eps(str(info["eps"]))


def exports(results_dir: Path, label: str, eps: str | None) -> tuple[list[Export], list[str]]:
    """(model_info of every run evaluated with AutoAttack, one line per run that could not be)."""
    exported, skipped = [], []
    evaluations: dict[str, list[dict]] = {}
    for _, record in iter_evaluations(results_dir):
        view = EvaluationRecord.from_raw(record)
        checkpoint = view.checkpoint
        if checkpoint["source"] == "harness" and checkpoint["label"] == label and view.complete:
            evaluations.setdefault(checkpoint["run_id"], []).append(record)
    for path in sorted(Path(results_dir).glob(f"*/{RECORD_NAME}")):
        run = read_record(path)
        if run.get("status") != "complete":
            continue
        at = eps or fraction_str(parse_eps(run["spec"]["eps"]))
        candidates = [model_info(run, e, at) for e in evaluations.get(run["run_id"], [])]
        candidates = [c for c in candidates if c is not None]
        if not candidates:
            skipped.append(
                f"{run['run_id']}: no AutoAttack evaluation at eps {at} of its {label} checkpoint; run "
                f"`harness eval {path.parent} --checkpoint {label} -a autoattack --eps 0,{at}`"
            )
            continue
        exported.append(max(candidates, key=lambda c: c.n))
    return exported, skipped
