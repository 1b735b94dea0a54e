"""The master-building job run in pool workers.

Paths and a small frozen record in, a small :class:`~huntsman.science.masters.MasterResult`
out (the master itself is written atomically by the science layer)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from huntsman.models import ObservationType
from huntsman.paths import inside, make_dirs
from huntsman.science.masters import (
    MasterParams,
    MasterResult,
    build_master_bias,
    build_master_dark,
    build_master_flat,
)
from huntsman.science.provenance import Provenance

__all__ = ["CalibJob", "build_calib_master"]


@dataclasses.dataclass(frozen=True, slots=True)
class CalibJob:
    """One master to build: its type, raw frames (with exposure times, s), output path and the
    masters it is calibrated with (bias for darks; bias and dark for flats)."""

    calib_type: str
    paths: tuple[str, ...]
    exptimes: tuple[float, ...]
    out_path: str
    params: MasterParams
    provenance: Provenance
    bias_path: str | None = None
    dark_path: str | None = None
    out_root: str | None = None  # out_path must lie inside it (None: its own directory)


def build_calib_master(job: CalibJob) -> MasterResult:
    """Build and write one master; raises ``ValueError`` for unusable inputs and
    :class:`~huntsman.paths.UnsafePathError` for an output outside ``out_root``."""
    out = Path(job.out_path)
    root = job.out_root if job.out_root is not None else out.parent
    make_dirs(out.parent, root)
    inside(out, root)
    if job.calib_type == ObservationType.BIAS:
        return build_master_bias(job.paths, job.out_path, job.params, job.provenance)
    if job.bias_path is None:
        raise ValueError(f"a master {job.calib_type} needs a master bias")
    if job.calib_type == ObservationType.DARK:
        return build_master_dark(
            job.paths, job.exptimes, job.out_path, job.bias_path, job.params, job.provenance
        )
    if job.calib_type == ObservationType.FLAT:
        return build_master_flat(
            job.paths, job.out_path, job.bias_path, job.dark_path, job.exptimes, job.params,
            job.provenance,
        )
    raise ValueError(f"unknown calibration type {job.calib_type!r}")
