"""harness: train, attack and report adversarial-training defenses under one protocol.

The library entry points (`harness.train`, `harness.evaluate`, `harness.report`, their result types) load on first use,
so `import harness` stays light: no torch, no defenses, until a call needs them. See docs/api.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "Accuracy",
    "EvaluationResult",
    "ReportResult",
    "RunRecord",
    "TrainResult",
    "__version__",
    "evaluate",
    "load_run",
    "report",
    "train",
]
# public name -> the module that defines it (imported when the name is first used)
_LAZY = {
    **{name: "harness.api" for name in __all__ if name != "__version__"},
    "evaluate": "harness.evaluation.pipeline",
    "EvaluationResult": "harness.evaluation.pipeline",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'harness' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
