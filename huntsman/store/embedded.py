"""The embedded MongoDB-compatible server (SecantusDB), run as a child process.

SecantusDB is GPL-2.0: it is only ever run as a separate program (``secantusd-py``), never
imported.  The launcher writes ``server.json`` (pid, port) in the storage directory so that
command-line tools can reach a running server, and so that a server left behind by a killed
run is found and stopped before the next start.

Whoever runs the server child holds ``embedded.lock`` in the storage directory for as long as
it owns the server (restarts included).  Only a process that could take that lock stops a
leftover server: the lock being free proves the leftover's owner is dead.  Command-line tools
that find the lock held wait for the owner's server instead of starting a second one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from huntsman.config import EMBEDDED_KILL_WAIT_S
from huntsman.lock import EMBEDDED_LOCK, LockHeld, PidLock, holder
from huntsman.logs import Logger
from huntsman.paths import private_dir

__all__ = [
    "EMBEDDED_LOCK", "EmbeddedServer", "EmbeddedServerError", "StorageBusy", "find_running",
    "owner_pid", "server_command", "wait_for_owner",
]

STATE_FILE = "server.json"


class EmbeddedServerError(RuntimeError):
    """The embedded server could not be started."""


class StorageBusy(EmbeddedServerError):
    """Another live process owns the embedded server on this storage."""


def server_command() -> list[str]:
    """The ``secantusd-py`` executable: next to this interpreter first, then on PATH."""
    local = Path(sys.executable).with_name("secantusd-py")
    if local.exists():
        return [str(local)]
    found = shutil.which("secantusd-py")
    if found is None:
        raise EmbeddedServerError(
            "secantusd-py not found: install the embedded extra (pip install 'huntsman[embedded]') "
            "or set database.uri / HUNTSMAN_MONGODB_URI to a MongoDB server"
        )
    return [found]


# Runs the server with umask 077 so its database files are owner-only (0600, directories
# 0700); an exec shim because uvloop's subprocess_exec has no ``umask`` argument.
_OWNER_ONLY = (sys.executable, "-c", "import os, sys; os.umask(0o077); os.execv(sys.argv[1], sys.argv[1:])")


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _write_private(path: Path, text: str) -> None:
    with open(path, "w", opener=_private) as stream:
        stream.write(text)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` (connections of a dead one in TIME_WAIT
    do not count: servers bind with ``SO_REUSEADDR``, so a restart gets its port back)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _read_state(storage_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((storage_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _server_process(state: dict[str, Any], data_dir: Path) -> psutil.Process | None:
    """The process described by a state file, if it is still our server on that storage."""
    try:
        proc = psutil.Process(int(state["pid"]))
        cmdline = proc.cmdline()
    except (KeyError, ValueError, psutil.Error):
        return None
    if any("secantusd" in part for part in cmdline) and str(data_dir) in cmdline:
        return proc
    return None


def find_running(storage_dir: Path) -> str | None:
    """URI of a live embedded server on ``storage_dir`` (started by a running service)."""
    state = _read_state(storage_dir)
    if state is None or _server_process(state, storage_dir / "data") is None:
        return None
    return f"mongodb://127.0.0.1:{int(state['port'])}/"


def owner_pid(storage_dir: Path) -> int | None:
    """PID of the live process owning the embedded server on ``storage_dir`` (0: unknown)."""
    return holder(Path(storage_dir) / EMBEDDED_LOCK)


async def wait_for_owner(storage_dir: Path, timeout_s: float) -> str | None:
    """URI of the owner's server once it answers; ``None`` if the storage has no live owner.

    Raises :class:`EmbeddedServerError` if an owner holds the storage but its server does
    not appear within ``timeout_s`` (a service starting or restarting its database).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        owner = await asyncio.to_thread(owner_pid, storage_dir)
        uri = await asyncio.to_thread(find_running, storage_dir)
        if owner is None:
            return None
        if uri is not None:
            return uri
        if time.monotonic() > deadline:
            raise EmbeddedServerError(
                f"the embedded database on {storage_dir} is owned by pid {owner or '?'} "
                f"but did not answer within {timeout_s:g} s"
            )
        await asyncio.sleep(0.1)


class EmbeddedServer:
    """Start, health-check and stop one ``secantusd-py`` child process."""

    def __init__(
        self,
        storage_dir: Path,
        *,
        port: int = 0,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 3.0,
        memory: bool = False,
        test_commands: bool = False,
        lock_wait_s: float = 0.0,
        lock: PidLock | None = None,
        log: Logger | None = None,
    ) -> None:
        self.storage_dir = Path(storage_dir)
        self.requested_port = port
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.memory = memory
        self.test_commands = test_commands
        self.port: int | None = None
        self.lock_wait_s = lock_wait_s
        self._proc: asyncio.subprocess.Process | None = None
        # ``lock``: the storage's lock, possibly taken (and held) by the caller beforehand.
        self._lock = lock or PidLock(self.storage_dir / EMBEDDED_LOCK)
        self._log = log

    @property
    def uri(self) -> str:
        if self.port is None:
            raise EmbeddedServerError("embedded server is not running")
        return f"mongodb://127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def data_dir(self) -> Path:
        return self.storage_dir / "data"

    @property
    def returncode(self) -> int | None:
        """The child's exit code once it has died (``None`` while it runs or before start)."""
        return self._proc.returncode if self._proc is not None else None

    async def wait_exited(self) -> int:
        """Wait until the child exits; its exit code."""
        if self._proc is None:
            raise EmbeddedServerError("embedded server is not running")
        return await self._proc.wait()

    async def start(self) -> str:
        """Take the storage, stop a leftover, start the server, wait for ``ping``; its URI."""
        await asyncio.to_thread(private_dir, self.storage_dir)  # owner-only, like its files
        if not self._lock.held:
            try:
                await asyncio.to_thread(self._lock.acquire, self.lock_wait_s)
            except LockHeld as exc:
                raise StorageBusy(
                    f"the embedded database on {self.storage_dir} is in use by pid {exc.pid or '?'}"
                ) from None
        try:
            await asyncio.to_thread(self._stop_leftover)
            port = self.requested_port
            if port == 0 or not _port_free(port):
                if port and self._log is not None:
                    self._log.warning("embedded_port_busy", port=port)
                port = _free_port()
            return await self._launch(port)
        except BaseException:
            self._lock.release()
            raise

    async def restart(self) -> str:
        """Start the server again on the same port and storage (the lock stays held)."""
        if self.port is None or not self._lock.held:
            raise EmbeddedServerError("embedded server was never started")
        port = self.port
        if self._proc is not None and self._proc.returncode is None:
            await self._terminate(self._proc)
        self._proc = None
        if not await asyncio.to_thread(_port_free, port):
            raise EmbeddedServerError(f"port {port} of the embedded server is taken")
        return await self._launch(port)

    async def _launch(self, port: int) -> str:
        """Start the child and wait for it; any OS error (full disk, no descriptors) is a start
        failure the supervisor retries, never an exception that stops it."""
        try:
            return await self._spawn(port)
        except OSError as exc:
            raise EmbeddedServerError(f"cannot start the embedded server: {exc}") from exc

    async def _spawn(self, port: int) -> str:
        storage = ":memory:" if self.memory else str(self.data_dir)
        cmd = [*server_command(), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--storage-path", storage, "--log-level", "WARNING"]
        if self.test_commands:
            cmd.append("--enable-test-commands")
        cmd = [*_OWNER_ONLY, *cmd]
        log_file = await asyncio.to_thread(open, self.storage_dir / "server.log", "ab", opener=_private)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdout=log_file,
                stderr=log_file,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log_file.close()
        self.port = port
        await self._wait_ready()
        assert self._proc is not None
        state = {"pid": self._proc.pid, "port": port, "storage": storage, "started": time.time()}
        await asyncio.to_thread(_write_private, self.storage_dir / STATE_FILE, json.dumps(state))
        return self.uri

    async def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            self.uri, serverSelectionTimeoutMS=500, connectTimeoutMS=500
        )
        try:
            while True:
                if self._proc.returncode is not None:
                    raise EmbeddedServerError(
                        f"embedded server exited with code {self._proc.returncode} during start-up; "
                        f"see {self.storage_dir / 'server.log'}"
                    )
                try:
                    await client.admin.command("ping")
                    return
                except PyMongoError:
                    if time.monotonic() > deadline:
                        proc, self._proc = self._proc, None
                        await self._terminate(proc)
                        raise EmbeddedServerError(
                            f"embedded server did not answer within {self.start_timeout_s:g} s; "
                            f"see {self.storage_dir / 'server.log'}"
                        ) from None
                    await asyncio.sleep(0.1)
        finally:
            await client.close()

    def _stop_leftover(self) -> None:
        """Stop a server left running on our storage by a run that was killed."""
        state = _read_state(self.storage_dir)
        if state is None:
            return
        proc = _server_process(state, self.data_dir)
        if proc is not None:
            if self._log is not None:
                self._log.warning("embedded_leftover_stopped", pid=proc.pid)
            with contextlib.suppress(psutil.Error):
                proc.terminate()
                try:
                    proc.wait(timeout=self.stop_timeout_s)
                except psutil.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=self.stop_timeout_s)
        with contextlib.suppress(FileNotFoundError):
            (self.storage_dir / STATE_FILE).unlink()

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout_s`` (a stopped process ignores SIGTERM)."""
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)  # a stopped server acts on the SIGTERM only now
        try:
            await asyncio.wait_for(proc.wait(), self.stop_timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), EMBEDDED_KILL_WAIT_S)

    async def stop(self) -> None:
        """Stop the child (SIGTERM, SIGKILL after ``stop_timeout_s``) and give the storage up."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                await self._terminate(proc)
            with contextlib.suppress(FileNotFoundError):
                (self.storage_dir / STATE_FILE).unlink()
            self.port = None
        finally:
            self._lock.release()
