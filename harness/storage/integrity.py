"""Checksums that travel with the data they protect, so corruption is named instead of used.

- JSON records (run records, evaluation records) carry a `sha256` field: the SHA-256 of their
  canonical JSON without that field. Formatting does not count; every value does.
- Checkpoints are stored as a small wrapper `{"format", "sha256", "payload"}` whose payload is the
  `torch.save` bytes of the real object (see `harness.storage.atomic.save_torch`): one file, one atomic
  rename, checked before a single weight is used.
- Flags files are hashed as bytes; the hash lives in the evaluation record that names them.

A mismatch raises `CorruptFileError` naming the file, the expected and the found hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from harness.core.errors import HarnessError

CHECKSUM_FIELD = "sha256"
SHORT = 16  # hex digits shown in messages


class CorruptFileError(HarnessError):
    """A stored file that fails its checksum or cannot be parsed; it is never used."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mismatch(path: Path | str, expected: str, found: str, what: str = "checksum") -> CorruptFileError:
    return CorruptFileError(
        f"{path}: {what} mismatch (expected sha256 {expected[:SHORT]}, found "
        f"{found[:SHORT]}): the file is corrupt and was not used"
    )


def canonical_digest(data: dict[str, Any]) -> str:
    body = {k: v for k, v in data.items() if k != CHECKSUM_FIELD}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def seal(data: dict[str, Any]) -> dict[str, Any]:
    """`data` plus its checksum field (a copy; the caller's dict is untouched)."""
    return {**{k: v for k, v in data.items() if k != CHECKSUM_FIELD}, CHECKSUM_FIELD: canonical_digest(data)}


def unseal(data: Any, source: Path | str) -> Any:
    """Verify and strip the checksum field; data without one (hand-made or older files) passes as is."""
    if not isinstance(data, dict) or CHECKSUM_FIELD not in data:
        return data
    expected, found = data[CHECKSUM_FIELD], canonical_digest(data)
    if expected != found:
        raise mismatch(source, str(expected), found)
    return {k: v for k, v in data.items() if k != CHECKSUM_FIELD}


def read_json(path: Path) -> Any:
    """Parse and verify a sealed JSON file; unreadable bytes, bad UTF-8 and bad JSON are named."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
        data = json.loads(text)
    except OSError as exc:
        raise CorruptFileError(f"{path}: unreadable ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{path}: not UTF-8 (byte {exc.start}): the file is corrupt") from None
    except json.JSONDecodeError as exc:
        raise CorruptFileError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}): the file is corrupt"
        ) from None
    return unseal(data, path)


CHECKPOINT_LABELS = ("last", "best")


def checkpoint_hashes(run_dir: Path) -> dict[str, str]:
    """SHA-256 of each checkpoint file of a finished run, stored in its record (`checkpoint_sha256`)."""
    return {
        label: sha256_file(Path(run_dir) / f"{label}.pt")
        for label in CHECKPOINT_LABELS
        if (Path(run_dir) / f"{label}.pt").exists()
    }
