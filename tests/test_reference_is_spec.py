"""medlvr/reference/ is the spec the tests compare against (medlvr/reference/__init__.py):
outside medlvr/ops (whose ops may dispatch to it as their "reference" backend) no production
module imports it."""
from __future__ import annotations

import ast
from pathlib import Path

import medlvr

ROOT = Path(medlvr.__file__).resolve().parent

# module -> why it still imports the spec (none: a new entry needs a reason here)
STILL_IMPORTING: dict[str, str] = {}


def _imports_reference(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "medlvr.reference" or node.module.startswith("medlvr.reference."):
                return True
            if node.module == "medlvr" and any(a.name == "reference" for a in node.names):
                return True
        if isinstance(node, ast.Import) and any(a.name.startswith("medlvr.reference") for a in node.names):
            return True
    return False


def test_only_ops_import_the_reference():
    found = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py")
             if p.relative_to(ROOT).parts[0] not in ("reference", "ops") and _imports_reference(p)}
    assert found <= set(STILL_IMPORTING), sorted(found - set(STILL_IMPORTING))
