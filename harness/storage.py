"""Atomic writes: a crash leaves the previous file or the new one, never half of either."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

import torch

from harness.errors import HarnessError


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_writable_dir(path: Path, option: str) -> None:
    """Create `path` and prove it writable with a probe file, before long work that must end in a write.

    A probe rather than `os.access`, which says yes to root on any directory. `option` is the flag
    that chose the directory, named in the one-line error.
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(0, "it is a file")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise HarnessError(f"directory {path} is not writable ({exc.strerror}); pass another {option}") from None


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"))


def save_torch(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """Weights-only unpickling: a checkpoint cannot run code when it is loaded."""
    return torch.load(path, map_location=map_location, weights_only=True)
