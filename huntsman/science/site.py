"""The observatory: Siding Spring, the one site record of the service.

Latitude −31.27°, longitude 149.07° E, 1165 m: the Huntsman Telescope at Siding Spring
Observatory.  The sample raw headers say ``LAT-OBS = -31.16``, ``LONG-OBS = 149.13``,
``ELEV-OBS = 1160`` (a coarse value of the control software's configuration, 12 km off); a
header's own keywords are still used as written where present (translation), this record where
they are missing and for the alt/az and Moon distance of a solved frame.
"""

from __future__ import annotations

import astropy.units as u
from astropy.coordinates import EarthLocation

__all__ = ["SITE"]

SITE: EarthLocation = EarthLocation.from_geodetic(
    lon=149.07 * u.deg, lat=-31.27 * u.deg, height=1165.0 * u.m
)
