"""Which hot-path modules are compiled (mypyc, see setup.py), and whether a build is stale.

In an editable install the compiled extension sits next to its source and wins the import, so an
edited source would silently not run. `stale_modules` finds sources newer than their compiled build.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def compiled_modules() -> list[str]:
    """Dotted names of tollway modules that import from a compiled extension."""
    names = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for ext in _PACKAGE.rglob(f"*{suffix}"):
            stem = ext.name[: -len(suffix)]
            if "__mypyc" in stem or not ext.with_name(stem + ".py").exists():
                continue
            names.append(".".join(ext.relative_to(_PACKAGE.parent).with_name(stem).parts))
    return sorted(names)


def stale_modules() -> list[str]:
    """Compiled modules whose source changed after they were built (rebuild: pip install -e .)."""
    stale = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for ext in _PACKAGE.rglob(f"*{suffix}"):
            source = ext.with_name(ext.name[: -len(suffix)] + ".py")
            if source.exists() and source.stat().st_mtime > ext.stat().st_mtime:
                stale.append(str(source.relative_to(_PACKAGE.parent)))
    return sorted(stale)
