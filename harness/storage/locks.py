"""OS file locks for run and evaluation directories, and cleanup of temp files a crash left behind.

`flock` locks belong to the open file: the kernel drops them when the holder exits or is killed,
so a lock can never be left stale. The lock files live outside the directories they guard
(`<parent>/.locks/<name>.lock`) so `--force` can delete a directory while holding its lock. The
holder writes its pid and host into the file for the error message of the process that is refused,
and clears them when it lets go, so `holder` can tell a live holder from one that was killed
(its pid is still in the file but no longer alive). `holder` only reads the file: taking even a
shared lock to probe it could make a starting writer fail.
(`filelock` truncates the file on open, which would erase the holder's pid; hence fcntl.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.core.errors import HarnessError

LOCK_DIR = ".locks"
TEMP_GLOB = ".*.tmp"  # harness.storage.atomic.atomic_write's temp names


def lock_path(directory: Path) -> Path:
    directory = Path(directory)
    return directory.parent / LOCK_DIR / f"{directory.name}.lock"


class LockedError(HarnessError):
    """The directory is held by another live process: its work is still going on, not failed."""


@dataclass(frozen=True)
class Holder:
    """Who last took a lock and did not let go: pid and host as the holder wrote them."""

    pid: int
    host: str

    @property
    def alive(self) -> bool | None:
        """Whether the holder still runs; None when it runs on another host (its pid means nothing here)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
        return True

    def __str__(self) -> str:
        return f"pid {self.pid}" if self.host == socket.gethostname() else f"pid {self.pid} on {self.host}"


def _parse_holder(text: str) -> Holder | None:
    pid, _, host = text.strip().partition(" ")
    return Holder(int(pid), host or socket.gethostname()) if pid.isdigit() else None


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    found = _parse_holder(os.read(fd, 256).decode(errors="replace"))
    return str(found) if found else "unknown pid"


def holder(directory: Path) -> Holder | None:
    """The process that holds (or held when it was killed) `directory`'s exclusive lock; None if none."""
    try:
        text = lock_path(directory).read_text(errors="replace")
    except FileNotFoundError:
        return None
    return _parse_holder(text)


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
                raise LockedError(
                    f"{what} is in use by another harness process ({_holder(fd)}); wait for it to finish or pass --wait"
                ) from None
            fcntl.flock(fd, mode)
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            if not shared:  # still ours: an empty file says nobody holds it (a killed holder leaves its pid)
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete temp files of interrupted atomic writes; call only while holding the exclusive lock."""
    directory = Path(directory)
    removed = sorted(directory.glob(TEMP_GLOB)) if directory.is_dir() else []
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
