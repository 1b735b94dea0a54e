"""What a test needs from the machine (root, the Debian tools, a browser), and what happens when
it is missing: outside CI the test is skipped with a reason naming the need and how to get it;
inside CI (environment variable ``CI`` set, and not ``0``/``false``) it fails, because a test
that silently skips in CI checks nothing.

Tests declare needs with markers, checked by the hook in ``tests/conftest.py``::

    @pytest.mark.root                                # tmpfs mounts, chown, /proc/sys knobs
    @pytest.mark.tools("solve-field", "tycho2")      # named tools; bare ``tools`` = all of them
    @pytest.mark.browser                             # chromium (none yet: issue 11)

A need only found out inside a test (a mount refused, a solver unusable) goes through
:func:`lacking`, which skips or fails by the same rule.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Iterable
from typing import NoReturn

import pytest

from huntsman.science.astrometry import available as astrometry_available
from huntsman.testing.starfield import DEFAULT_TYCHO_INDEX

SYSTEM_DEPS = "install them with `make system-deps` (scripts/system-deps.sh, Debian packages)"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _which(*names: str) -> str | None:
    return next((p for p in map(shutil.which, names) if p), None)


def _solve_field() -> str | None:
    ok, reason = astrometry_available()
    if not ok:
        return reason
    if _which("build-astrometry-index", "build-index") is None:
        return "build-astrometry-index not found on PATH (astrometry.net package)"
    return None


def _tycho2() -> str | None:
    if DEFAULT_TYCHO_INDEX.is_file():
        return None
    return f"no Tycho-2 index {DEFAULT_TYCHO_INDEX} (astrometry-data-tycho2-* packages)"


def _program(*names: str) -> Callable[[], str | None]:
    def check() -> str | None:
        return None if _which(*names) else f"{' or '.join(names)} not found on PATH"
    return check


# Each tool: a check returning what is missing (None when present).
TOOLS: dict[str, Callable[[], str | None]] = {
    "solve-field": _solve_field,
    "tycho2": _tycho2,
    "source-extractor": _program("source-extractor", "sex"),
    "psfex": _program("psfex"),
}
BROWSERS = ("chromium", "chromium-browser")


@functools.cache
def missing_tool(name: str) -> str | None:
    if name not in TOOLS:
        raise ValueError(f"unknown tool {name!r} in @pytest.mark.tools (known: {', '.join(TOOLS)})")
    return TOOLS[name]()


def missing_tools(names: Iterable[str]) -> list[str]:
    return [reason for reason in map(missing_tool, names) if reason is not None]


def missing_root() -> str | None:
    if os.geteuid() == 0:
        return None
    return "needs root (tmpfs mounts, chown to another owner, /proc/sys knobs): run as root, as CI does"


def missing_browser() -> str | None:
    if _which(*BROWSERS):
        return None
    return "needs chromium (not found on PATH): install the Debian package chromium"


def needs_of(item: pytest.Item) -> list[str]:
    """What ``item``'s markers ask for and this machine lacks, one sentence each."""
    missing: list[str] = []
    if item.get_closest_marker("root") is not None and (reason := missing_root()):
        missing.append(reason)
    tools = [name for mark in item.iter_markers("tools") for name in (mark.args or TOOLS)]
    if tools and (reasons := missing_tools(dict.fromkeys(tools))):
        missing.append(f"needs the Debian tools: {'; '.join(reasons)}: {SYSTEM_DEPS}")
    if item.get_closest_marker("browser") is not None and (reason := missing_browser()):
        missing.append(reason)
    return missing


def lacking(reason: str) -> NoReturn:
    """A need is missing: skip outside CI, fail inside CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: a missing need is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)
