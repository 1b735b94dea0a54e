"""The product never imports its test helpers: no module of huntsman/ outside huntsman/testing
imports huntsman.testing (read from the source by AST, so lazy imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "huntsman"
TESTING = "huntsman.testing"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, module) of every ``import`` and ``from ... import`` in the module at ``path``
    (its text, or ``source``), relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    text = path.read_text() if source is None else source
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # ``from huntsman import testing`` names the package as an attribute
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def is_testing(module: str) -> bool:
    return module == TESTING or module.startswith(TESTING + ".")


def test_the_resolver_sees_every_import_form() -> None:
    # The check below passes trivially if the resolver misses a form: it is tested on its own.
    as_module = PACKAGE / "science" / "x.py"
    forms = {
        "import huntsman.testing.synthetic": True,
        "from huntsman.testing import synthetic": True,
        "from huntsman import testing": True,
        "from ..testing import starfield": True,
        "from .. import testing": True,
        "def f():\n    from huntsman.testing.starfield import tycho_stars": True,
        "from huntsman.science import psf": False,
        "from . import testing_notes": False,
    }
    for source, expected in forms.items():
        names = [m for _, m in imported_modules(as_module, source)]
        assert any(is_testing(m) for m in names) is expected, (source, names)


def test_no_product_module_imports_the_test_helpers() -> None:
    offenders = []
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 30  # the walk found the package
    for path in modules:
        if path.is_relative_to(PACKAGE / "testing"):
            continue
        offenders += [
            f"{path.relative_to(ROOT)}:{line} imports {module}"
            for line, module in imported_modules(path)
            if is_testing(module)
        ]
    assert offenders == []
