"""The shape of the house: every module says its job in one line; rooms import only downwards."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "huntsman"
MODULES = sorted(ROOT.rglob("*.py"))

# Room -> the rooms it may import.  A room is a top-level module or package of huntsman; the
# foundation (models, values, paths) imports nothing of ours but itself.  docs/design.md draws
# the same table.
FOUNDATION = {"models", "values", "paths"}
ALLOWED: dict[str, set[str]] = {
    "models": set(),
    "values": set(),
    "paths": set(),
    "config": {"models"},
    "logs": {"config"},
    "lock": set(),
    "science": {"models", "values", "paths"},
    "workers": {"science", "models", "values", "paths", "logs"},
    "store": {"config", "lock", "logs", "models", "values", "paths"},
    "report": {"store", "science", "models", "values", "paths"},
    "services": {"config", "logs", "models", "values", "paths", "science", "store", "workers", "report"},
    "service_config": {"config", "models"},
    "testing": {"science", "models", "values", "paths"},
    "app": {"config", "lock", "logs", "models", "values", "paths", "science", "service_config",
            "services", "store", "workers", "report"},
    "cli": {"app", "config", "lock", "logs", "models", "values", "paths", "science",
            "service_config", "services", "store", "workers", "report"},
    "__main__": {"cli"},
    "__init__": set(),
}


def _room(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_rooms(path: Path) -> set[str]:
    rooms: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "huntsman" and len(parts) > 1:
                rooms.add(parts[1])
            elif name == "huntsman":
                rooms.add("__init__")
    return rooms


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_every_module_opens_with_one_line_saying_its_job(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path.relative_to(ROOT.parent)} has no module docstring"
    first = doc.splitlines()[0].strip()
    assert first.endswith("."), f"first line is not one sentence: {first!r}"
    assert 10 <= len(first) <= 110, first


def test_rooms_import_only_the_rooms_below_them() -> None:
    unknown = {_room(p) for p in MODULES} - set(ALLOWED)
    assert not unknown, f"rooms missing from the table (and from docs/design.md): {unknown}"
    wrong = {
        f"{p.relative_to(ROOT.parent)} imports huntsman.{r}"
        for p in MODULES
        for r in _imported_rooms(p) - ALLOWED[_room(p)] - {_room(p), "__init__"}
    }
    assert not wrong, "\n".join(sorted(wrong))


def test_design_doc_lists_every_room() -> None:
    design = (ROOT.parent / "docs" / "design.md").read_text()
    missing = [r for r in ALLOWED if not r.startswith("__") and f"`{r}" not in design]
    assert not missing, f"docs/design.md does not name the rooms {missing}"
