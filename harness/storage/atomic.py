"""Atomic, checksummed writes: a crash leaves the previous file or the new one, never half of either,
and a file damaged after it was written is detected on read instead of used.

Temp files get unique names (several processes may write beside each other); those a killed
process left behind are removed by `harness.storage.locks.remove_stale_temps` under the directory's lock.
A full disk or a read-only file system becomes a one-line HarnessError, with the temp file removed.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from harness.core.errors import HarnessError
from harness.storage.integrity import CorruptFileError, mismatch, seal, sha256_bytes
from harness.training import faults

CHECKPOINT_FORMAT = "harness-checked-v1"


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        faults.reached(f"before-replace:{path.name}")
        os.replace(tmp, path)
        tmp = None
        faults.reached(f"after-replace:{path.name}")
    except OSError as exc:
        raise HarnessError(f"cannot write {path} ({exc.strerror or exc}); nothing was changed there") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def existing_dir(path: Path, option: str, hint: str) -> Path:
    """`path` if it is a directory; else a one-line error that says whether it is missing or a file."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.exists():
        raise HarnessError(f"{option} {path} is a file, not a directory; pass a directory as {option}")
    raise HarnessError(f"{option} directory {path} does not exist; {hint}")


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
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test.", suffix=".tmp"):
            pass
    except OSError as exc:
        raise HarnessError(f"directory {path} is not writable ({exc.strerror}); pass another {option}") from None


def write_json(path: Path, data: Any, *, sealed: bool = False) -> None:
    """JSON with sorted keys; `sealed` adds the checksum field (`harness.storage.integrity.seal`)."""
    body = seal(data) if sealed else data
    atomic_write(path, lambda f: f.write(json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"))


def save_torch(path: Path, obj: Any) -> None:
    """`torch.save` bytes inside a checksummed wrapper, written atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    wrapper = {
        "format": CHECKPOINT_FORMAT,
        "sha256": sha256_bytes(payload),
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    buffer = io.BytesIO()
    torch.save(wrapper, buffer)  # in memory: torch turns a failed file write into a RuntimeError
    data = buffer.getvalue()
    atomic_write(path, lambda f: f.write(data))


def load_torch(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """Weights-only unpickling (a checkpoint cannot run code), checksum verified before use.

    A file without the wrapper (a plain state dict from elsewhere) loads as it is; a damaged
    wrapper or payload raises CorruptFileError naming the file.
    """
    outer = _torch_load(path, path, map_location)
    if not (isinstance(outer, dict) and ("payload" in outer or outer.get("format") == CHECKPOINT_FORMAT)):
        return outer
    payload, expected = outer.get("payload"), outer.get("sha256")
    if (
        outer.get("format") != CHECKPOINT_FORMAT
        or not isinstance(payload, torch.Tensor)
        or not isinstance(expected, str)
    ):
        raise CorruptFileError(f"{path}: damaged checkpoint wrapper: the file is corrupt and was not used")
    data = payload.numpy().tobytes()
    found = sha256_bytes(data)
    if found != expected:
        raise mismatch(path, expected, found)
    return _torch_load(io.BytesIO(data), path, map_location)


def _torch_load(source: Any, path: Path, map_location: Any) -> Any:
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise HarnessError(f"{path} does not exist") from None
    except Exception as exc:  # zip, unpickling and torch errors come in many types; all mean "not usable"
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CorruptFileError(
            f"{path}: unreadable checkpoint ({detail}): the file is corrupt or not a "
            f"weights-only PyTorch checkpoint, and was not used"
        ) from None
