"""Reading checkpoints that were not written by this harness, without running code from them.

`torch.load(weights_only=True)` refuses any pickled object but tensors and plain containers. Original
training checkpoints often also hold inert extras: the argparse Namespace of the training script,
numpy scalars and arrays (an accuracy, a history), a torch version string. Those are loaded by
allow-listing exactly the constructors they need, still through the weights-only unpickler, so the
state dict can be extracted. A file naming any other global (a model class, functools.partial,
builtins.eval...) would run arbitrary code when unpickled: it is refused, with how to convert it in a
trusted environment. HTML pages saved as .pt (Google Drive's "virus scan" page, RobustBench's most
reported failure) and empty or truncated files are recognised and named as such.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from harness.core.errors import HarnessError

# Constructors of plain data: calling them builds a value and nothing else.
INERT_GLOBALS = frozenset(
    {
        "argparse.Namespace",
        "_codecs.encode",
        "torch.torch_version.TorchVersion",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
    }
)
INERT_PREFIXES = ("numpy.dtypes.",)  # numpy >= 1.25 pickles dtypes by their DType class
# what the weights-only unpickler names when it meets a global it was not allowed (two phrasings)
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")
_CONVERT = (
    "in an environment you trust: torch.save(torch.load(path, weights_only=False)['state_dict'], path) "
    "(or whichever key holds the weights)"
)


def sniff(path: Path) -> None:
    """One-line errors for what is not a PyTorch checkpoint at all."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise HarnessError(f"{path} is empty (an interrupted download?): delete it and download it again")
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in text[:200]:
        raise HarnessError(
            f"{path} is an HTML page, not weights (Google Drive served its download-warning or "
            f"quota page): delete it and download the file again"
        )
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise HarnessError(f"{path} is not a PyTorch checkpoint (it starts with {head[:16]!r})")


def _resolve(name: str) -> Any | None:
    """The object for an allow-listed global name, None for anything else."""
    if name not in INERT_GLOBALS and not name.startswith(INERT_PREFIXES):
        return None
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def _refuse(path: Path, names: list[str]) -> HarnessError:
    return HarnessError(
        f"{path} pickles {', '.join(sorted(names)[:4])}, which would run code when loaded, so "
        f"it is refused; save its state dict alone {_CONVERT}"
    )


def extra_globals(path: Path) -> list[Any]:
    """The allow-listed objects this checkpoint needs beyond weights-only defaults (refuses the rest)."""
    names: list[str] = []
    if zipfile.is_zipfile(path):
        try:
            names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception as exc:  # a damaged archive: torch raises several types
            raise HarnessError(
                f"{path} is a damaged PyTorch archive ({type(exc).__name__}): download it again"
            ) from None
    unsafe = [n for n in names if _resolve(n) is None]
    if unsafe:
        raise _refuse(path, unsafe)
    return [_resolve(n) for n in names] + (_numpy_dtype_classes() if "numpy.dtype" in names else [])


def _numpy_dtype_classes() -> list[Any]:
    """A pickled numpy dtype is rebuilt through its DType class, which the scan does not list."""
    try:
        import numpy.dtypes
    except ImportError:  # numpy < 1.25 has no DType classes to allow
        return []
    return [getattr(numpy.dtypes, name) for name in dir(numpy.dtypes) if name.endswith("DType")]


@contextlib.contextmanager
def allowing(objects: list[Any]) -> Iterator[None]:
    """torch.load(weights_only=True) inside accepts these globals too (for loaders we do not own)."""
    with torch.serialization.safe_globals(objects):
        yield


def load_checkpoint_file(path: Path) -> tuple[Any, list[Any]]:
    """(unpickled object, the extra globals it needed): weights-only unpickling, extras allow-listed."""
    path = Path(path)
    sniff(path)
    allowed = extra_globals(path)
    for _ in range(len(INERT_GLOBALS) + 8):  # legacy (non-zip) files name one missing global per try
        try:
            with allowing(allowed):
                return torch.load(path, map_location="cpu", weights_only=True), allowed
        except pickle.UnpicklingError as exc:
            match = _UNSUPPORTED.search(str(exc))
            if match is None:
                raise HarnessError(f"{path} cannot be unpickled ({_first_line(exc)})") from None
            name = match.group(1) or match.group(2)
            obj = _resolve(name)
            if obj is None or obj in allowed:
                raise _refuse(path, [name]) from None
            allowed.append(obj)
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise HarnessError(
                f"{path} is damaged or truncated ({type(exc).__name__}: {_first_line(exc)}): download it again"
            ) from None
    raise HarnessError(f"{path} needs too many extra globals to load safely; save its state dict alone {_CONVERT}")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:160] if lines else type(exc).__name__


def required_globals(path: Path) -> list[Any]:
    """What `allowing` needs for a loader we do not own to read this file weights-only (one-line errors
    for HTML, empty, damaged or code-running files). Zip checkpoints are scanned without loading them."""
    path = Path(path)
    sniff(path)
    if zipfile.is_zipfile(path):
        return extra_globals(path)
    return load_checkpoint_file(path)[1]
