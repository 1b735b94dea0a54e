"""Run the reference tools SExtractor (``source-extractor``) and PSFEx on a FITS file.

Used by benchmarks and tests as an independent check of :mod:`huntsman.science.psf`: PSFEx
builds a pixel-basis PSF model from the SExtractor catalogue and reports its FWHM (the
``FWHM_Mean`` of its XML report, in px, of the PSF as sampled in the image).  Not used by the
service itself.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

__all__ = ["PsfexResult", "psfex_available", "run_psfex"]

_PARAMS = """\
VIGNET(35,35)
X_IMAGE
Y_IMAGE
XWIN_IMAGE
YWIN_IMAGE
FLUX_APER(1)
FLUXERR_APER(1)
FLUX_RADIUS
ELONGATION
FLAGS
SNR_WIN
"""


@dataclasses.dataclass(frozen=True)
class PsfexResult:
    """What PSFEx measured: FWHM (px), ellipticity, stars accepted/loaded and timings (s)."""

    fwhm_px: float
    fwhm_min_px: float
    fwhm_max_px: float
    ellipticity: float
    n_stars_accepted: int
    n_stars_loaded: int
    sextractor_s: float
    psfex_s: float


def _exe(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def psfex_available() -> bool:
    """Whether both ``source-extractor`` (or ``sex``) and ``psfex`` are on PATH."""
    return _exe("source-extractor", "sex") is not None and _exe("psfex") is not None


def _field(root: ET.Element, name: str) -> str:
    """Value of the PSF_Fields column ``name`` in a PSFEx VOTable XML report."""
    for table in root.iter():
        if not table.tag.endswith("TABLE") or table.get("name") != "PSF_Fields":
            continue
        names = [f.get("name") for f in table.iter() if f.tag.endswith("FIELD")]
        row = next(r for r in table.iter() if r.tag.endswith("TR"))
        cells = [td.text or "" for td in row if td.tag.endswith("TD")]
        return cells[names.index(name)]
    raise ValueError("no PSF_Fields table in the PSFEx XML report")


def run_psfex(
    path: str | Path,
    *,
    gain_e_per_adu: float = 1.145,
    saturation_adu: float = 4094.0,
    detect_sigma: float = 5.0,
    min_snr: float = 30.0,
    timeout_s: float = 120.0,
) -> PsfexResult:
    """Run SExtractor then PSFEx (constant PSF over the field) on one FITS image.

    Parameters
    ----------
    path : str or Path
        FITS image (primary HDU), raw or calibrated ADU.
    gain_e_per_adu, saturation_adu : float
        Passed to SExtractor (``GAIN``, ``SATUR_LEVEL``).
    detect_sigma : float
        SExtractor ``DETECT_THRESH`` (sigma).
    min_snr : float
        PSFEx ``SAMPLE_MINSN``.
    timeout_s : float
        Per-program timeout.

    Returns
    -------
    PsfexResult

    Raises
    ------
    FileNotFoundError
        When either program is not installed.
    RuntimeError
        When a program fails or reports no PSF.
    """
    sex, psfex = _exe("source-extractor", "sex"), _exe("psfex")
    if sex is None or psfex is None:
        raise FileNotFoundError("source-extractor and psfex must be on PATH")
    with tempfile.TemporaryDirectory(prefix="huntsman-psfex-") as tmp:
        work = Path(tmp)
        (work / "sex.param").write_text(_PARAMS)
        cat = work / "cat.ldac"
        sex_cmd = [
            sex, str(Path(path).resolve()),
            "-c", "/dev/null",
            "-CATALOG_NAME", str(cat), "-CATALOG_TYPE", "FITS_LDAC",
            "-PARAMETERS_NAME", str(work / "sex.param"),
            "-DETECT_THRESH", str(detect_sigma), "-ANALYSIS_THRESH", str(detect_sigma),
            "-DETECT_MINAREA", "5", "-FILTER", "N",
            "-PHOT_APERTURES", "10", "-GAIN", str(gain_e_per_adu),
            "-SATUR_LEVEL", str(saturation_adu), "-BACK_SIZE", "64",
            "-CHECKIMAGE_TYPE", "NONE", "-VERBOSE_TYPE", "QUIET",
        ]
        t0 = time.perf_counter()
        _run(sex_cmd, work, timeout_s)
        t1 = time.perf_counter()
        xml = work / "psfex.xml"
        psfex_cmd = [
            psfex, str(cat), "-c", "/dev/null",
            "-PSF_SIZE", "25,25", "-PSF_SAMPLING", "1.0", "-PSFVAR_DEGREES", "0",
            "-SAMPLE_MINSN", str(min_snr), "-SAMPLE_FWHMRANGE", "1.0,15.0",
            "-SAMPLE_MAXELLIP", "0.5",
            "-CHECKPLOT_TYPE", "NONE", "-CHECKIMAGE_TYPE", "NONE",
            "-WRITE_XML", "Y", "-XML_NAME", str(xml), "-PSF_DIR", str(work),
            "-VERBOSE_TYPE", "QUIET",
        ]
        _run(psfex_cmd, work, timeout_s)
        t2 = time.perf_counter()
        if not xml.exists():
            raise RuntimeError("psfex wrote no XML report")
        root = ET.parse(xml).getroot()
        try:
            return PsfexResult(
                fwhm_px=float(_field(root, "FWHM_Mean")),
                fwhm_min_px=float(_field(root, "FWHM_Min")),
                fwhm_max_px=float(_field(root, "FWHM_Max")),
                ellipticity=float(_field(root, "Ellipticity_Mean")),
                n_stars_accepted=int(_field(root, "NStars_Accepted_Total")),
                n_stars_loaded=int(_field(root, "NStars_Loaded_Total")),
                sextractor_s=t1 - t0,
                psfex_s=t2 - t1,
            )
        except (ValueError, StopIteration) as exc:
            raise RuntimeError(f"cannot read the psfex report: {exc}") from exc


def _run(cmd: list[str], cwd: Path, timeout_s: float) -> None:
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{Path(cmd[0]).name} exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
        )
