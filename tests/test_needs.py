"""Tests that need root, the Debian tools or a browser: skipped with the reason where the need is
missing, failed instead when ``CI`` is set (run through pytester with the suite's own hook)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support import needs

pytest_plugins = ["pytester"]

INNER = """
import pytest

@pytest.mark.root
def test_root():
    pass

@pytest.mark.tools("psfex")
def test_psfex():
    pass

@pytest.mark.tools
def test_every_tool():
    pass

@pytest.mark.browser
def test_browser():
    pass

def test_plain():
    pass
"""


@pytest.fixture
def inner(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[pytest.Pytester]:
    """A suite using the real hook of tests/conftest.py and the suite's markers, on a machine
    with nothing: no root, an empty PATH (no tools, no chromium)."""
    markers = "".join(f"\n    {line}" for line in request.config.getini("markers"))
    pytester.makeini(f"[pytest]\nasyncio_default_fixture_loop_scope = function\nmarkers ={markers}\n")
    pytester.makeconftest("from tests.conftest import pytest_runtest_setup  # noqa: F401\n")
    pytester.makepyfile(test_inner=INNER)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("PATH", str(pytester.path / "empty"))
    needs.missing_tool.cache_clear()
    yield pytester
    needs.missing_tool.cache_clear()


def test_missing_needs_skip_outside_ci_with_the_reason(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = inner.runpytest_inprocess("-rs", "-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=1, skipped=4)
    out = result.stdout.str()
    assert "needs root" in out
    assert "psfex not found on PATH" in out and "make system-deps" in out
    assert "solve-field not found on PATH" in out and "source-extractor or sex not found" in out
    assert "needs chromium" in out


@pytest.mark.parametrize("value", ["true", "1", "yes"])
def test_missing_needs_fail_in_ci(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CI", value)
    result = inner.runpytest_inprocess("-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=1, errors=4)
    assert "a missing need is a failure, not a skip" in result.stdout.str()


def test_ci_false_is_not_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("", "0", "false", "False"):
        monkeypatch.setenv("CI", value)
        assert not needs.in_ci()
    monkeypatch.setenv("CI", "true")
    assert needs.in_ci()


def test_lacking_skips_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="cannot mount"):
        needs.lacking("cannot mount a tmpfs here")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="cannot mount"):
        needs.lacking("cannot mount a tmpfs here")


def test_an_unknown_tool_is_a_mistake_in_the_test() -> None:
    with pytest.raises(ValueError, match="unknown tool 'sextractor'"):
        needs.missing_tool("sextractor")
