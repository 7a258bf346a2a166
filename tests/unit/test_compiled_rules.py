"""Rules for the modules compiled with mypyc (setup.py HOT_MODULES) that mypy itself does not enforce.

mypyc miscompiles a `return` inside a `try` that has a `finally` (the function returns garbage), so
such code is refused here rather than discovered in production. See docs/development.md.
"""

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


def test_no_return_inside_try_with_finally() -> None:
    offenders = []
    for path in HOT_MODULES:
        tree = ast.parse((ROOT / path).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and node.finalbody:
                for statement in node.body + node.handlers:
                    offenders += [
                        f"{path}:{n.lineno}" for n in ast.walk(statement) if isinstance(n, ast.Return)
                    ]
    assert not offenders, "return inside try/finally in compiled modules: " + ", ".join(offenders)


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
