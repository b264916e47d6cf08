"""OS file locks for run and evaluation directories, and cleanup of temp files a crash left behind.

`flock` locks belong to the open file: the kernel drops them when the holder exits or is killed,
so a lock can never be left stale. The lock files live outside the directories they guard
(`<parent>/.locks/<name>.lock`) so `--force` can delete a directory while holding its lock. The
holder writes its pid into the file for the error message of the process that is refused.
(`filelock` truncates the file on open, which would erase the holder's pid; hence fcntl.)
"""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from harness.errors import HarnessError

LOCK_DIR = ".locks"
TEMP_GLOB = ".*.tmp"  # harness.storage.atomic_write's temp names


def lock_path(directory: Path) -> Path:
    directory = Path(directory)
    return directory.parent / LOCK_DIR / f"{directory.name}.lock"


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors="replace").strip()
    return f"pid {text}" if text.isdigit() else "unknown pid"


@contextmanager
def hold(directory: Path, *, what: str, wait: bool = False, shared: bool = False) -> Iterator[None]:
    """Lock `directory` (exclusive for writers, shared for readers that must not see it deleted).

    Refused with a one-line HarnessError naming the holder's pid, or blocks with `wait=True`.
    """
    path = lock_path(directory)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise HarnessError(f"cannot create lock file {path} ({exc.strerror}); is the directory writable?") from None
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            if not wait:
                raise HarnessError(f"{what} is in use by another harness process ({_holder(fd)}); "
                                   f"wait for it to finish or pass --wait") from None
            fcntl.flock(fd, mode)
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete temp files of interrupted atomic writes; call only while holding the exclusive lock."""
    directory = Path(directory)
    removed = sorted(directory.glob(TEMP_GLOB)) if directory.is_dir() else []
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
