"""The running service's effective configuration, shared with the command-line tools.

At start-up the service writes ``<paths.var_dir>/service-config.json``: its effective
configuration, redacted (no password), with its PID and version.  Command-line tools read it so
that, by default, they act with exactly the service's configuration (its overrides included)
instead of whatever their own working directory and environment give.  A tool given its own
``--config``/``--override`` compares it with the service's in everything that affects data.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from huntsman import __version__
from huntsman.config import REDACTED, Config, ConfigError, redact_uri
from huntsman.models import utcnow

__all__ = [
    "DATA_KEYS",
    "SERVICE_CONFIG",
    "ServiceConfigFile",
    "config_differences",
    "flatten",
    "read_service_config",
    "service_config_path",
    "write_service_config",
]

SERVICE_CONFIG = "service-config.json"
# Dotted prefixes of the settings that change what is written to the database or to files.
DATA_KEYS = (
    "paths.",
    "database.name",
    "database.uri",
    "database.embedded.storage_dir",
    "detector.",
    "ingest.",
    "calib.",
    "qc.",
    "astrometry.",
    "cameras",
    "watcher.extensions",
)


def service_config_path(config: Config) -> Path:
    return config.paths.var_dir / SERVICE_CONFIG


def write_service_config(config: Config) -> Path:
    """Write the redacted effective config atomically, owner-only (blocking: call in a thread).

    The temporary name is created with ``O_CREAT|O_EXCL|O_NOFOLLOW``: an existing file or a
    planted symlink of that name is never followed or reused.
    """
    path = service_config_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "version": __version__,
        "written": utcnow().isoformat(),
        "digest": config.digest(),
        "config": config.redacted(),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # our own leftover (same PID): never followed, only removed
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(record, out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


class ServiceConfigFile:
    """A parsed ``service-config.json``."""

    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path = path
        self.record = record
        self.pid = int(record.get("pid") or 0)
        self.data: dict[str, Any] = record["config"]

    def running(self) -> bool:
        """Whether the PID that wrote it is still alive (same host)."""
        if self.record.get("host") not in (None, socket.gethostname()) or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def describe(self) -> str:
        state = "running" if self.running() else "not running"
        return f"pid {self.pid}, {state}, {self.path}"

    def to_config(self, own: Config) -> Config:
        """The service's configuration, connectable from here.

        The stored URI is redacted, so for an external database the tool's own URI (from its
        environment or config file) is used when it names the same server; the embedded
        server's URI is found through its ``server.json`` as usual.  Logging and the
        server-selection deadline are the tool's own.
        """
        data = json.loads(json.dumps(self.data))
        database = data.setdefault("database", {})
        stored_uri = database.get("uri", "embedded")
        if stored_uri != "embedded" and own.database.uri != "embedded":
            if redact_uri(own.database.uri) == stored_uri:
                database["uri"] = own.database.uri  # the same server, with its secrets
            elif REDACTED in stored_uri:
                raise ConfigError(
                    f"the service uses the database {stored_uri}, this command's configuration "
                    f"names {redact_uri(own.database.uri)}; give --config to use your own, or set "
                    "HUNTSMAN_MONGODB_URI to the service's"
                )
            # else: the stored URI is complete (it had no secret): use the service's database
        # else: the embedded server, found through its server.json
        database["server_selection_timeout_s"] = own.database.server_selection_timeout_s
        data["logging"] = own.logging.model_dump(mode="json")
        try:
            return Config.model_validate(data)
        except ValueError as exc:
            raise ConfigError(
                f"cannot use the service's configuration {self.path} (give --config to use "
                f"another): {exc}".replace("\n", " ")
            ) from None


def read_service_config(config: Config) -> ServiceConfigFile | None:
    """The service configuration file of ``config``'s var directory, if there is a usable one."""
    path = service_config_path(config)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        return None
    return ServiceConfigFile(path, record)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): data}


def config_differences(own: Config, service: dict[str, Any]) -> list[str]:
    """Dotted names of the data-affecting settings in which ``own`` differs from ``service``."""
    a, b = flatten(own.redacted()), flatten(service)
    keys = sorted(k for k in set(a) | set(b) if k.startswith(DATA_KEYS))
    return [k for k in keys if a.get(k) != b.get(k)]
