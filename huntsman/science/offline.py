"""No code path may need the network: astropy must never try to download IERS tables."""

from __future__ import annotations

__all__ = ["configure_offline_astropy"]


def configure_offline_astropy() -> None:
    """Use the bundled IERS tables for every date instead of downloading newer ones.

    Without this, dates past the bundled table trigger a download that fails offline, and
    alt/az computations silently disappear.
    """
    from astropy.utils import iers

    iers.conf.auto_download = False
    iers.conf.auto_max_age = None
    iers.conf.iers_degraded_accuracy = "warn"
