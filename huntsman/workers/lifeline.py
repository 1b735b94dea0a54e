"""A worker's life is tied to the service's: it never outlives it, nor takes the host down.

The service may be killed outright (SIGKILL, the OOM killer), with no chance to stop its pool.
With the ``forkserver`` context the workers are children of the fork server, not of the
service, and every worker holds the write end of its own call queue and the fork server's
"alive" pipe, so neither ever sees an end of file: without help they would wait forever with
parent PID 1, and with them the fork server and the resource tracker.  So each worker

* asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``) -- the fork server,
  which itself gets the same from :mod:`huntsman.workers.forkserver_init`;
* watches the service's PID from a daemon thread (a ``pidfd``: exact, no PID reuse) and
  exits as soon as it is gone, whatever its parent is;
* caps its address space (``RLIMIT_AS``) so that one huge frame is a ``MemoryError`` in that
  worker, not a host out of memory.

Once the workers are gone the fork server sees its end of file and exits, and then the resource
tracker does.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import select
import signal
import threading
import time

__all__ = ["die_with_parent", "limit_memory", "watch_service"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _end(code: int = 1) -> None:
    """Stop this worker's own children (a solver), then exit without cleanup."""
    with contextlib.suppress(Exception):
        import psutil

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    os._exit(code)


def watch_service(pid: int, poll_s: float = 1.0) -> None:
    """Exit this process as soon as process ``pid`` (the service) has ended."""
    if pid <= 0 or pid == os.getpid():
        return
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        _end()  # the service died before this worker started
        return
    except (AttributeError, OSError):
        fd = -1  # no pidfd (old kernel): poll the PID instead

    def wait_pidfd() -> None:
        select.select([fd], [], [])
        _end()

    def poll_pid() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                _end()
            except PermissionError:
                pass
            time.sleep(poll_s)

    target = wait_pidfd if fd >= 0 else poll_pid
    threading.Thread(target=target, name="service-watch", daemon=True).start()


def limit_memory(memory_mb: int) -> None:
    """Cap this process's address space at ``memory_mb`` MiB (0: no cap)."""
    if memory_mb <= 0:
        return
    limit = int(memory_mb) * 2**20
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
