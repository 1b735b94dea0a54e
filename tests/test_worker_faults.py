"""Whatever a worker meets, the file ends with a document, and no worker outlives the service.

Through the real service (real embedded-free database server, real process pool, real files):
a corrupt tile of a ``.fits.fz`` (astropy raises an exception that cannot be pickled back), a
frame whose header asks for 4 GiB, and the same decompressed under the worker's memory cap
(``MemoryError``).  Then ``python -m huntsman run`` as a subprocess, killed with real signals:
no process that descended from it may remain.
"""

from __future__ import annotations

import functools
import io
import json
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from astropy.io import fits

from huntsman.models import FileSource, IngestRequest, utcnow
from huntsman.store.database import Database
from tests.conftest import (
    PYTHON,
    RAW_SAMPLES,
    ROOT,
    ServiceHandle,
    copy_sample,
    make_config,
    python_env,
    wait_for,
)

_BLOCK = 2880


def _fits_bytes(hdul: fits.HDUList) -> bytearray:
    buffer = io.BytesIO()
    hdul.writeto(buffer)
    return bytearray(buffer.getvalue())


def corrupt_fz(dest: Path) -> Path:
    """The science sample tile-compressed (one tile per row), with part of its heap garbled."""
    with fits.open(RAW_SAMPLES / "science_0.fits") as hdul:
        data, header = hdul[0].data, hdul[0].header.copy()
    raw = _fits_bytes(fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header, "RICE_1")]))
    with fits.open(io.BytesIO(bytes(raw))) as hdul:
        heap = hdul[1].fileinfo()["datLoc"] + 20_000
    raw[heap : heap + 20_000] = bytes((7 * i + 13) & 0xFF for i in range(20_000))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(bytes(raw))
    return dest


def huge_header_frame(dest: Path) -> Path:
    """A 35 kB file whose header asks for 32768 x 32768 float32 pixels (4 GiB)."""
    header = fits.getheader(RAW_SAMPLES / "science_0.fits")
    for key in ("BZERO", "BSCALE"):
        header.remove(key, ignore_missing=True)
    header["BITPIX"], header["NAXIS1"], header["NAXIS2"] = -32, 32768, 32768
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(header.tostring().encode("ascii") + bytes(_BLOCK * 4))
    return dest


def _set_card(buf: bytearray, start: int, key: str, value: int) -> None:
    for i in range(start, start + _BLOCK, 80):
        if buf[i : i + 8].decode("ascii").rstrip() == key:
            buf[i : i + 80] = f"{key:<8}= {value:>20}".ljust(80).encode("ascii")
            return
    raise KeyError(key)


def decompression_bomb(dest: Path) -> Path:
    """A 9 kB ``.fits.fz`` whose single gzip tile claims to hold 32768 x 32768 float32."""
    data = np.zeros((64, 64), np.float32)
    header = fits.getheader(RAW_SAMPLES / "science_0.fits")
    primary = fits.PrimaryHDU(header=fits.Header([c for c in header.cards if c.keyword not in (
        "SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "BZERO", "BSCALE")]))
    comp = fits.CompImageHDU(data, compression_type="GZIP_1", tile_shape=(64, 64))
    raw = _fits_bytes(fits.HDUList([primary, comp]))
    ext = raw.index(b"XTENSION")
    for key in ("ZNAXIS1", "ZNAXIS2", "ZTILE1", "ZTILE2"):
        _set_card(raw, ext, key, 32768)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(bytes(raw))
    return dest


async def _doc(database: Database, path: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def stored() -> bool:
        doc = await database.exposures.get(str(path))
        if doc is not None and doc["ingest"]["status"] in ("ok", "failed", "quarantined"):
            found.update(doc)
            return True
        return False

    await wait_for(stored, 30)
    return found


async def test_corrupt_tile_and_huge_header_get_failed_documents(
    service: ServiceHandle, database: Database
) -> None:
    night = service.raw / "2021-01-18" / "TESTCAM03"
    tile = corrupt_fz(night / "corrupt.fits.fz")
    huge = huge_header_frame(night / "huge.fits")
    bomb = decompression_bomb(night / "bomb.fits.fz")

    doc = await _doc(database, tile)
    assert doc["ingest"]["status"] == "failed"
    assert doc["ingest"]["error"].startswith("cannot read pixel data: CfitsioException: ")
    assert "decompression error" in doc["ingest"]["error"]
    assert doc["header"]["CAM-ID"] == "TESTCAM03" and doc["camera"] == "TESTCAM03"

    for path, axes in ((huge, "32768×32768"), (bomb, "32768×32768")):
        doc = await _doc(database, path)
        assert doc["ingest"]["status"] == "failed"
        assert doc["ingest"]["error"].startswith(f"frame too large: {axes} = 1073.7 Mpx")
        assert "ingest.max_pixels" in doc["ingest"]["error"]
        assert doc["header"]["NAXIS1"] == 32768  # the header is kept, the data never read

    good = copy_sample("science_0", night)
    assert (await _doc(database, good))["ingest"]["status"] == "ok"
    assert service.app.pool.rebuilds == 0  # no worker died: each fault was a plain result

    # The usual rules then hold: a rescan leaves it alone, each start-up reconciliation retries
    # it once, and after ingest.max_tries it is quarantined, not crashed on again.
    async def tries() -> tuple[int, str]:
        doc = await database.exposures.get(str(tile))
        assert doc is not None
        return int(doc["ingest"]["tries"]), doc["ingest"]["status"]

    assert await tries() == (1, "failed")
    ingestor = service.app.ingestor
    await ingestor.submit(IngestRequest(str(tile), utcnow(), FileSource.SCAN))
    await ingestor.submit(IngestRequest(str(good), utcnow(), FileSource.SCAN))
    await wait_for(lambda: _idle(ingestor), 30)
    assert await tries() == (1, "failed")
    for n, status in ((2, "failed"), (3, "quarantined")):
        await ingestor.submit(IngestRequest(str(tile), utcnow(), FileSource.RECONCILE))
        await wait_for(functools.partial(_tries_at_least, database, tile, n), 30)
        # The document is written before the ingestor lets the file go: a request for a file
        # still in hand is (rightly) dropped, so wait until it is done with it.
        await wait_for(lambda: _idle(ingestor), 30)
        assert await tries() == (n, status)
    await ingestor.submit(IngestRequest(str(tile), utcnow(), FileSource.RECONCILE))
    await wait_for(lambda: _idle(ingestor), 30)
    assert await tries() == (3, "quarantined")


async def _idle(ingestor: Any) -> bool:
    return bool(ingestor.idle())


async def _tries_at_least(database: Database, path: Path, n: int) -> bool:
    doc = await database.exposures.get(str(path))
    return doc is not None and int(doc["ingest"]["tries"]) >= n


async def test_memory_error_under_the_cap_is_a_failed_document(
    tmp_path: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    """Without the pixel ceiling, the 4 GiB tile runs into the worker's address-space cap."""
    config = make_config(
        tmp_path, mongo_uri, db_name, ingest__max_pixels=0, pool__worker_memory_mb=2048
    )
    handle = await ServiceHandle(config).start()
    try:
        night = handle.raw / "2021-01-18" / "TESTCAM03"
        bomb = decompression_bomb(night / "bomb.fits.fz")
        doc = await _doc(database, bomb)
        assert doc["ingest"]["status"] == "failed"
        assert doc["ingest"]["error"].startswith("cannot read pixel data: MemoryError: ")
        assert "4.00 GiB" in doc["ingest"]["error"]
        assert doc["header"]["CAM-ID"] == "TESTCAM03"
        good = copy_sample("science_0", night)
        assert (await _doc(database, good))["ingest"]["status"] == "ok"
        assert handle.app.pool.rebuilds == 0
    finally:
        await handle.shutdown()


# --- nothing orphaned -----------------------------------------------------------------------


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _start_service(
    tmp_path: Path, mongo_uri: str, db_name: str, context: str
) -> subprocess.Popen[str]:
    env = python_env(
        HUNTSMAN_VAR_DIR=str(tmp_path / "var"),
        HUNTSMAN_MONGODB_URI=mongo_uri,
        HUNTSMAN_DATABASE__NAME=db_name,
        HUNTSMAN_LOGGING__FORMAT="json",
        HUNTSMAN_POOL__MAX_WORKERS="2",
        HUNTSMAN_POOL__BACKGROUND_WORKERS="1",
        HUNTSMAN_POOL__CONTEXT=context,
    )
    proc = subprocess.Popen(
        [PYTHON, "-m", "huntsman", "--config", str(ROOT / "etc" / "huntsman.yaml"), "run"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    ready = threading.Event()
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        with proc.stdout:  # closed at the end of the output: the service has exited
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("{") and json.loads(line).get("event") == "watcher_started":
                    ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(90):
        proc.kill()
        raise AssertionError(f"service did not start: {''.join(lines)[-3000:]}")
    return proc


@pytest.mark.parametrize(
    ("sig", "context"),
    [
        (signal.SIGKILL, "forkserver"),
        (signal.SIGTERM, "forkserver"),
        (signal.SIGHUP, "forkserver"),
        (signal.SIGKILL, "spawn"),
    ],
    ids=["SIGKILL", "SIGTERM", "SIGHUP", "SIGKILL-spawn"],
)
def test_no_process_outlives_the_service(
    sig: signal.Signals, context: str, tmp_path: Path, mongo_uri: str, db_name: str
) -> None:
    """Record every descendant of ``python -m huntsman run``, signal it: none may remain."""
    proc = _start_service(tmp_path, mongo_uri, db_name, context)
    descendants: list[psutil.Process] = []
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
        commands = [" ".join(p.cmdline()) for p in descendants]
        # Three pool workers (and the fork server) and the resource tracker at least.
        workers = sum(("forkserver" in c or "multiprocessing.spawn" in c) for c in commands)
        assert workers >= (4 if context == "forkserver" else 3), commands
        assert any("resource_tracker" in c for c in commands), commands
        proc.send_signal(sig)
        proc.wait(30)
        start = time.monotonic()
        while any(_alive(p) for p in descendants) and time.monotonic() - start < 10:
            time.sleep(0.05)
        left = [(p.pid, " ".join(p.cmdline())[:120]) for p in descendants if _alive(p)]
        assert not left, f"still running 10 s after {sig.name}: {left}"
        print(f"{sig.name}: {len(descendants)} descendants gone {time.monotonic() - start:.2f} s "
              "after the service ended")
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in descendants:
            if _alive(p):
                p.kill()
