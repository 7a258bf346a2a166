"""Rules for the modules compiled with mypyc (setup.py HOT_MODULES) that mypy itself does not enforce
(docs/development.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOT_MODULES = re.findall(r'"(tollway/[^"]+\.py)"', (ROOT / "setup.py").read_text())


def test_hot_modules_are_listed_and_exist() -> None:
    assert len(HOT_MODULES) > 10
    for path in HOT_MODULES:
        assert (ROOT / path).is_file(), path


def test_class_bodies_assign_plain_names_only() -> None:
    offenders = []
    for path in HOT_MODULES:
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            if isinstance(node, ast.ClassDef):
                for statement in node.body:
                    if isinstance(statement, ast.Assign) and not all(
                        isinstance(t, ast.Name) for t in statement.targets
                    ):
                        offenders.append(f"{path}:{statement.lineno}")
    assert not offenders, "tuple assignments in compiled class bodies: " + ", ".join(offenders)
