"""What `harness eval` can evaluate, loaded into an `nn.Module` taking [0, 1] inputs:

- the harness's own runs: a run directory or run id, checkpoint `last` or `best`;
- a plain state dict with a named architecture (`--model`, `--dataset`);
- `robustbench:<dataset>/<threat>/<Name>` through robustbench's `load_model`, from a local
  model directory (there may be no network: a missing file is reported with where to put it).

Own checkpoints load with weights-only unpickling (`harness.storage.atomic.load_torch`); state dicts and
RobustBench files through `safe_load` (weights-only, inert extras such as an argparse Namespace
allow-listed, HTML pages and code-running pickles refused in one line).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.core.config import DEFAULT_RESULTS, parse_eps
from harness.core.datasets import DATASETS
from harness.core.errors import HarnessError
from harness.core.models import MODELS, build_model
from harness.evaluation.safe_load import allowing, load_checkpoint_file, required_globals
from harness.storage.atomic import load_torch
from harness.storage.records import RECORD_NAME, read_record, upgrade_record

ROBUSTBENCH_PREFIX = "robustbench:"
DEFAULT_ROBUSTBENCH_DIR = Path(
    os.environ.get("HARNESS_ROBUSTBENCH_DIR", Path.home() / ".cache" / "harness" / "robustbench")
)
# Optional: a copy of RobustBench's model_info JSONs (adds names and paper titles to messages).
REFERENCE_DIR = (
    Path(os.environ["HARNESS_REFERENCE"]) / "robustbench" / "model_info"
    if os.environ.get("HARNESS_REFERENCE")
    else None
)
ROBUSTBENCH_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100"}  # robustbench -> harness data set


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    checkpoint: dict[str, Any]  # contract B "checkpoint": source, run_id, label, name, path, defense
    dataset: str
    model_name: str
    eval_root: Path  # evaluations of this checkpoint go to <eval_root>/<label>-<digest>/
    published_eps: Fraction | None = None  # the eps its published numbers are at (added to the sweep)


def load_checkpoint(
    target: str,
    *,
    label: str = "last",
    results_dir: Path = DEFAULT_RESULTS,
    model_name: str | None = None,
    dataset: str | None = None,
    robustbench_dir: Path = DEFAULT_ROBUSTBENCH_DIR,
) -> LoadedCheckpoint:
    """Resolve TARGET (run dir, run id, state-dict file or robustbench:...) and load its weights on the CPU."""
    if target.startswith(ROBUSTBENCH_PREFIX):
        return load_robustbench(target[len(ROBUSTBENCH_PREFIX) :], results_dir, robustbench_dir)
    path = Path(target)
    if path.is_dir():
        return load_run(path, label)
    if path.is_file():
        return load_state_dict_file(path, model_name, dataset, results_dir)
    if (Path(results_dir) / target / RECORD_NAME).exists():
        return load_run(Path(results_dir) / target, label)
    raise HarnessError(
        f"{target!r} is neither a run directory, a run id in {results_dir}, a checkpoint file, "
        f"nor robustbench:<dataset>/<threat>/<Name>"
    )


# --------------------------------------------------------------------------- own runs


def load_run(run_dir: Path, label: str) -> LoadedCheckpoint:
    if label not in ("last", "best"):
        raise HarnessError(f"--checkpoint must be last or best, got {label!r}")
    if not (run_dir / RECORD_NAME).exists():
        raise HarnessError(f"{run_dir} has no {RECORD_NAME}: pass a run directory made by `harness run`")
    record = read_record(run_dir / RECORD_NAME)
    spec = record["spec"]
    path = run_dir / f"{label}.pt"
    if not path.exists():
        raise HarnessError(
            f"{path} does not exist: the run has no '{label}' checkpoint yet "
            f"(finish it with `harness run ... --resume`)"
        )
    check_revision(record, run_dir)
    model = build_model(spec["model"], DATASETS.get(spec["dataset"]), spec.get("dropout", 0.0))
    load_matching(model, _weights(load_torch(path), path), spec["model"], path)
    info = {
        "source": "harness",
        "run_id": record["run_id"],
        "label": label,
        "name": record["run_id"],
        "path": str(path),
        "defense": spec["defense"],
    }
    return LoadedCheckpoint(model, info, spec["dataset"], spec["model"], run_dir / "eval")


def check_revision(record: dict[str, Any], run_dir: Path) -> None:
    """Refuse weights trained on another revision of the architecture (records before revisions: 1)."""
    upgraded = upgrade_record(record)
    name = upgraded["spec"]["model"]
    trained, current = upgraded["spec"]["model_revision"], MODELS.get(name).revision
    if trained != current:
        commit = upgraded["environment"]["git"].get("commit") or "unknown"
        raise HarnessError(
            f"{run_dir} was trained on {name} revision {trained}, but this code builds revision "
            f"{current} (same weights, different network): retrain it, or evaluate it at "
            f"commit {commit[:12]}"
        )


# --------------------------------------------------------------------------- Python modules


def load_module(model: nn.Module, name: str | None, dataset: str | None, results_dir: Path) -> LoadedCheckpoint:
    """An `nn.Module` handed to `harness.evaluate`: evaluated as given (inputs in [0, 1]), named by
    `name` (default its class name), bound to its weights by a digest of its state dict."""
    if dataset is None:
        raise HarnessError("evaluating an nn.Module needs dataset=NAME (see `harness list datasets`)")
    DATASETS.get(dataset)
    name = name or type(model).__name__
    info = {
        "source": "module",
        "run_id": None,
        "label": "module",
        "name": name,
        "path": None,
        "defense": None,
        "sha256": state_dict_sha256(model),
    }
    return LoadedCheckpoint(model, info, dataset, name, Path(results_dir) / "external" / f"module-{name}" / "eval")


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes): the weights' identity."""
    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().cpu().clone(memory_format=torch.contiguous_format).reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------- plain state dicts


def load_state_dict_file(
    path: Path, model_name: str | None, dataset: str | None, results_dir: Path
) -> LoadedCheckpoint:
    if model_name is None:
        raise HarnessError(
            f"{path} is a plain checkpoint: name its architecture with --model NAME "
            f"(see `harness list models`) and its data set with --dataset"
        )
    dataset = dataset or "fashion-mnist"
    model = build_model(model_name, DATASETS.get(dataset))
    obj, _ = load_checkpoint_file(path)
    load_matching(model, _weights(obj, path), model_name, path)
    info = {
        "source": "state_dict",
        "run_id": None,
        "label": "file",
        "name": path.stem,
        "path": str(path.resolve()),
        "defense": None,
    }
    return LoadedCheckpoint(
        model, info, dataset, model_name, Path(results_dir) / "external" / f"state_dict-{path.stem}" / "eval"
    )


def _weights(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: plain, or under 'model' / 'state_dict'; 'module.' stripped."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise HarnessError(f"{path} holds no state dict (tensors by parameter name)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], arch: str, path: Path) -> None:
    """load_state_dict, with a one-line report of the first mismatching keys instead of a wall of text."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{what} {', '.join(keys[:3])}" + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if keys
    ]
    if problems:
        raise HarnessError(f"{path} does not match architecture {arch}: {'; '.join(problems)}")
    model.load_state_dict(state)


# --------------------------------------------------------------------------- RobustBench


def import_robustbench():
    """robustbench 1.1.1 imports `autoattack`; the PyPI package is `pyautoattack`: alias it first."""
    import pyautoattack
    import pyautoattack.state

    for name, module in (("autoattack", pyautoattack), ("autoattack.state", pyautoattack.state)):
        sys.modules.setdefault(name, module)
    with warnings.catch_warnings():  # deprecation notices of timm, torch.jit and pkg_resources, not ours
        warnings.simplefilter("ignore")
        import robustbench.utils
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return robustbench.utils, model_dicts, BenchmarkDataset, ThreatModel


@dataclass(frozen=True)
class RobustBenchName:
    dataset: str
    threat: str
    name: str

    @classmethod
    def parse(cls, text: str) -> RobustBenchName:
        parts = text.split("/")
        if len(parts) != 3 or not all(parts):
            raise HarnessError(
                f"robustbench:{text}: write robustbench:<dataset>/<threat>/<Name>, "
                f"e.g. robustbench:cifar10/Linf/Zhang2019Theoretically"
            )
        return cls(*parts)


def robustbench_names(dataset: str, threat: str) -> list[str]:
    """Model names known to robustbench's registry, plus those of the reference JSONs."""
    _, model_dicts, BenchmarkDataset, ThreatModel = import_robustbench()
    names: set[str] = set()
    try:
        names |= set(model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)])
    except (ValueError, KeyError):
        pass  # an unknown data set or threat model is reported by the caller with the valid choices
    ref = REFERENCE_DIR / dataset / threat if REFERENCE_DIR is not None else None
    if ref is not None and ref.is_dir():
        names |= {p.stem for p in ref.glob("*.json")}
    return sorted(names)


def resolve_robustbench(spec: RobustBenchName) -> dict[str, Any]:
    """robustbench's registry entry for the name, or a one-line error with the valid choices."""
    _, model_dicts, BenchmarkDataset, ThreatModel = import_robustbench()
    datasets = [d.value for d in model_dicts]
    if spec.dataset not in datasets:
        raise HarnessError(f"robustbench data set {spec.dataset!r} unknown; choose from {', '.join(datasets)}")
    threats = [t.value for t in model_dicts[BenchmarkDataset(spec.dataset)]]
    if spec.threat not in threats:
        raise HarnessError(
            f"robustbench threat model {spec.threat!r} unknown for {spec.dataset}; choose from {', '.join(threats)}"
        )
    models = model_dicts[BenchmarkDataset(spec.dataset)][ThreatModel(spec.threat)]
    if spec.name not in models:
        known = robustbench_names(spec.dataset, spec.threat)
        close = difflib.get_close_matches(spec.name, known, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f" ({len(known)} known)"
        raise HarnessError(f"no RobustBench model {spec.dataset}/{spec.threat}/{spec.name}{hint}")
    return models[spec.name]


def robustbench_files(spec: RobustBenchName, entry: dict[str, Any], model_dir: Path) -> list[tuple[Path, str]]:
    """(expected path, Google Drive id) of each checkpoint file robustbench's loader reads."""
    base = Path(model_dir) / spec.dataset / spec.threat / f"{spec.name}.pt"
    ids = entry["gdrive_id"]
    if isinstance(ids, list):
        return [(Path(f"{base}_m{i}.pt"), gid) for i, gid in enumerate(ids)]
    return [(base, ids)]


def load_robustbench(text: str, results_dir: Path, model_dir: Path) -> LoadedCheckpoint:
    spec = RobustBenchName.parse(text)
    entry = resolve_robustbench(spec)
    if spec.dataset not in ROBUSTBENCH_DATASETS:
        raise HarnessError(
            f"robustbench {spec.dataset} models are not supported by the harness's data sets "
            f"({', '.join(ROBUSTBENCH_DATASETS)})"
        )
    if entry.get("gdrive_id") is None:
        raise HarnessError(f"RobustBench model {spec.name} has no checkpoint to load (no gdrive_id)")
    files = robustbench_files(spec, entry, model_dir)
    missing = [(p, gid) for p, gid in files if not p.exists()]
    if missing:
        path, gid = missing[0]
        raise HarnessError(
            f"RobustBench checkpoint {path} not found and this harness does not download it: "
            f"run `gdown {gid} -O {path}` (or `{download_command(spec, model_dir)}`), "
            f"or pass --robustbench-dir where the models live"
        )
    allowed = [obj for path, _ in files for obj in required_globals(path)]
    model = _robustbench_model(spec, model_dir, allowed, files[0][0])
    info = {
        "source": "robustbench",
        "run_id": None,
        "label": "published",
        "name": f"{spec.dataset}-{spec.threat}-{spec.name}",
        "path": str(robustbench_files(spec, entry, model_dir)[0][0]),
        "defense": None,
        "paper": _paper_name(spec),
    }
    return LoadedCheckpoint(
        model,
        info,
        ROBUSTBENCH_DATASETS[spec.dataset],
        type(model).__name__,
        Path(results_dir) / "external" / f"robustbench-{info['name']}" / "eval",
        published_eps(spec),
    )


def download_command(spec: RobustBenchName, model_dir: Path) -> str:
    """robustbench's own downloader (gdown underneath), as one shell command."""
    return (
        f"python -c \"from robustbench.utils import load_model; load_model('{spec.name}', "
        f"model_dir='{model_dir}', dataset='{spec.dataset}', threat_model='{spec.threat}')\""
    )


def _robustbench_model(spec: RobustBenchName, model_dir: Path, allowed: list, path: Path) -> nn.Module:
    """robustbench's `load_model` on a file already sniffed, its inert extras allow-listed; its own
    failures (keys that do not fit the architecture, an odd layout) become one line."""
    utils, *_ = import_robustbench()
    try:
        with allowing(allowed), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return utils.load_model(spec.name, model_dir=str(model_dir), dataset=spec.dataset, threat_model=spec.threat)
    except HarnessError:
        raise
    except Exception as exc:  # robustbench raises whatever its loading code meets
        detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")[:200]
        raise HarnessError(
            f"robustbench could not load {path} as {spec.name} ({type(exc).__name__}: {detail}); "
            f"delete it and download it again"
        ) from None


def published_eps(spec: RobustBenchName) -> Fraction | None:
    """The eps of the model's published RobustBench numbers: harness/data/robustbench.csv, else the
    reference model_info JSON (HARNESS_REFERENCE); None when neither knows it."""
    import csv

    table = Path(__file__).resolve().parent.parent / "data" / "robustbench.csv"
    with open(table, newline="") as f:
        for row in csv.DictReader(f):
            if (row["dataset"], row["threat"], row["name"]) == (spec.dataset, spec.threat, spec.name):
                return parse_eps(row["eps"])
    if REFERENCE_DIR is not None:
        path = REFERENCE_DIR / spec.dataset / spec.threat / f"{spec.name}.json"
        try:
            return parse_eps(str(json.loads(path.read_text())["eps"]))
        except (OSError, json.JSONDecodeError, KeyError, HarnessError):
            return None
    return None


def _paper_name(spec: RobustBenchName) -> str | None:
    """The paper's name from the reference model_info JSON, when there is one."""
    if REFERENCE_DIR is None:
        return None
    path = REFERENCE_DIR / spec.dataset / spec.threat / f"{spec.name}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("name")
    except json.JSONDecodeError:
        return None
