"""Shared fixtures: a real embedded database server, real temporary raw trees, real pools."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from huntsman.config import Config, load_config
from huntsman.store.database import Database, connect
from huntsman.store.embedded import _free_port, server_command
from tests.support.needs import lacking, needs_of

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "huntsman-drp"
RAW_SAMPLES = DATA / "raw"
SAMPLE_NAMES = ("bias_0", "dark_0", "flat_0", "science_0", "sky_offset_0")


# A test using one of these fixtures runs the database server (and, through ``config`` and
# ``service``, usually the service): marked ``service``, it stays out of ``make test-fast``.
SERVICE_FIXTURES = frozenset({"mongo_uri", "workdir"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.service)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``root``, ``tools`` or ``browser`` whose need is missing: skipped with the
    reason outside CI, failed inside CI (:mod:`tests.support.needs`)."""
    missing = needs_of(item)
    if missing:
        lacking("; ".join(missing))


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real SecantusDB server for the session (each test uses its own database)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("secantus") / "server.log"
    cmd = [*server_command(), "--host", "127.0.0.1", "--port", str(port), "--storage-path", ":memory:"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
    uri = f"mongodb://127.0.0.1:{port}/"
    client: MongoClient[dict[str, Any]] = MongoClient(uri, serverSelectionTimeoutMS=300)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.admin.command("ping")
            break
        except PyMongoError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"test database server did not start: {log.read_text()}") from None
            time.sleep(0.1)
    client.close()
    yield uri
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def db_name() -> str:
    return f"test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def database(mongo_uri: str, db_name: str) -> AsyncIterator[Database]:
    db = connect(mongo_uri, db_name)
    await db.ensure_indexes()
    yield db
    await db.client.drop_database(db_name)
    await db.close()


def make_config(tmp_path: Path, mongo_uri: str, db_name: str, **overrides: Any) -> Config:
    """A config for a service under test: temporary tree, the shared server, a small pool."""
    env = {
        "HUNTSMAN_VAR_DIR": str(tmp_path / "var"),
        "HUNTSMAN_MONGODB_URI": mongo_uri,
        "HUNTSMAN_DATABASE__NAME": db_name,
        "HUNTSMAN_WATCHER__SETTLE_S": "0.5",
        "HUNTSMAN_POOL__MAX_WORKERS": "2",
        "HUNTSMAN_POOL__JOB_TIMEOUT_S": "60",
        "HUNTSMAN_SERVICE__HEARTBEAT_INTERVAL_S": "0.5",
        "HUNTSMAN_LOGGING__FORMAT": "json",
    }
    for key, value in overrides.items():
        env["HUNTSMAN_" + key.upper()] = str(value)
    return load_config(ROOT / "etc" / "huntsman.yaml", environ=env, root=tmp_path)


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], timeout_s: float = 30.0, interval_s: float = 0.05
) -> None:
    """Wait until an async predicate holds; fail the test with a clear message otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


def copy_sample(name: str, dest_dir: Path, new_name: str | None = None) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / (new_name or f"{name}.fits")
    shutil.copyfile(RAW_SAMPLES / f"{name}.fits", dest)
    return dest


def python_env(**extra: str) -> dict[str, str]:
    """Environment for running ``python -m huntsman`` as a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUNTSMAN_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


PYTHON = sys.executable


class ServiceHandle:
    """A service running in the test's event loop, stopped through its injectable trigger."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stop = asyncio.Event()
        self.app: Any = None
        self.task: asyncio.Task[int] | None = None

    @property
    def raw(self) -> Path:
        return self.config.paths.raw_dir

    async def start(self) -> ServiceHandle:
        from huntsman.app import run_service

        started: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(
            run_service(self.config, self.stop, started=started.set_result), name="service"
        )
        done, _ = await asyncio.wait([self.task, started], timeout=60, return_when="FIRST_COMPLETED")
        if self.task in done:
            self.task.result()
            raise AssertionError("service stopped during start-up")
        self.app = started.result()
        await asyncio.wait_for(self.app.watcher.ready.wait(), 30)
        return self

    async def shutdown(self) -> int:
        """Stop the service; a shutdown that hangs fails with every task's stack."""
        assert self.task is not None
        self.stop.set()
        done, _ = await asyncio.wait({self.task}, timeout=30)
        if not done:
            import io

            stacks = io.StringIO()
            for task in asyncio.all_tasks():
                print(f"--- {task.get_name()}", file=stacks)
                task.print_stack(file=stacks)
            raise AssertionError(f"service did not stop within 30 s:\n{stacks.getvalue()}")
        return self.task.result()


@pytest.fixture
def config(tmp_path: Path, mongo_uri: str, db_name: str) -> Config:
    return make_config(tmp_path, mongo_uri, db_name)


@pytest.fixture
async def service(config: Config) -> AsyncIterator[ServiceHandle]:
    handle = await ServiceHandle(config).start()
    yield handle
    if handle.task is not None and not handle.task.done():
        await handle.shutdown()


async def docs_ok(db: Database, n: int) -> bool:
    return await db.exposures.count({"ingest.status": "ok"}) >= n
