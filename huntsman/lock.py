"""Exclusive ownership of a directory: ``fcntl.flock`` on a lock file, held for a lifetime.

The kernel drops a ``flock`` when its holder dies, whatever the signal, so there is never a
stale lock to clean up: a lock that can be taken means its previous owner is gone.  The
holder's PID is written into the file so that whoever is refused can name it.  Lock files
are opened close-on-exec, so child programs (the embedded server) never inherit the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

__all__ = ["EMBEDDED_LOCK", "SERVICE_LOCK", "LockHeld", "PidLock", "holder"]

SERVICE_LOCK = "huntsman.lock"  # in the var directory: one service per data directory
EMBEDDED_LOCK = "embedded.lock"  # in the embedded storage: the owner of its server
PROBE_GRACE_S = 0.3


class LockHeld(RuntimeError):
    """Another live process holds the lock; ``pid`` is the PID it wrote (None if unreadable)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        who = f"pid {pid}" if pid is not None else "another process"
        super().__init__(f"{path} is held by {who}")


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip() or "x")
    return None


class PidLock:
    """One exclusive ``flock`` on ``path``; ``acquire`` raises :class:`LockHeld` if taken."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait_s: float = 0.0) -> PidLock:
        """Take the lock, retrying for up to ``wait_s``; writes our PID into the file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        # A moment's retry even when not waiting: ``holder`` probes with a brief shared lock.
        deadline = time.monotonic() + max(wait_s, PROBE_GRACE_S)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockHeld(self.path, _read_pid(fd)) from None
                    time.sleep(0.05)
            try:  # the PID is for messages only; a full disk must not cost the lock
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (the file stays: removing it would race with the next owner)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> PidLock:
        return self.acquire() if not self.held else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def holder(path: Path) -> int | None:
    """PID of the live process holding the lock at ``path``, 0 if unknown, ``None`` if free.

    Probes with a shared lock on a fresh descriptor, so it also sees a lock held by this
    process through another descriptor.  Never creates the file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError:  # e.g. another user's owner-only directory: held, owner unknown, never "free"
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
