"""The ingestion worker on its own: every kind of unreadable input becomes a clear reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from huntsman.models import IngestParams
from huntsman.workers.ingest import ingest_file
from tests.conftest import PYTHON, RAW_SAMPLES, ROOT, python_env


def test_unreadable_file_is_a_clear_failure() -> None:
    """A file the service's user may not read.

    Root reads everything, so the worker runs without the capabilities that bypass file
    permissions (util-linux ``setpriv``, present on every Debian system).
    """
    base = Path(tempfile.mkdtemp(prefix="huntsman-unreadable-", dir="/tmp"))
    try:
        base.chmod(0o755)
        target = base / "locked.fits"
        shutil.copyfile(RAW_SAMPLES / "science_0.fits", target)
        target.chmod(0o000)
        code = (
            "import json, sys; from huntsman.workers.ingest import ingest_file; "
            "from huntsman.models import IngestParams; "
            "r = ingest_file(sys.argv[1], IngestParams()); "
            "print(json.dumps({'error': r.error, 'size': r.file_size}))"
        )
        drop = "-dac_override,-dac_read_search"
        run = subprocess.run(
            ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", PYTHON, "-c", code, str(target)],
            cwd="/", env=python_env(), capture_output=True, text=True, timeout=120,
        )
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert "not readable" in result["error"] and "permission denied" in result["error"]
        # The same file readable again ingests normally: the reason was the permission.
        target.chmod(0o644)
        assert ingest_file(str(target), IngestParams()).error is None
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_fifo_named_fits_is_not_read() -> None:
    base = Path(tempfile.mkdtemp(prefix="huntsman-fifo-"))
    try:
        fifo = base / "pipe.fits"
        os.mkfifo(fifo)
        result = ingest_file(str(fifo), IngestParams())
        assert result.error == "not a regular file"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_worker_result_is_small_and_plain() -> None:
    result = ingest_file(str(RAW_SAMPLES / "science_0.fits"), IngestParams())
    assert result.error is None
    encoded = json.dumps({"fields": {k: str(v) for k, v in result.fields.items()}, "m": result.metrics})
    assert len(encoded) < 20_000  # a record, not pixels
    assert ROOT.exists()
