"""Which hot-path modules are compiled (mypyc, see setup.py), and whether a build is stale.

In an editable install the compiled extension sits next to its source and wins the import, so an
edited source would silently not run. The build records a hash of each compiled source in
`_compiled.json`; `stale_modules` lists sources that no longer match their build.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_ROOT = _PACKAGE.parent
_MANIFEST = _PACKAGE / "_compiled.json"


def compiled_modules() -> list[str]:
    """Dotted names of tollway modules that import from a compiled extension."""
    names = []
    for source in _sources_with_extension():
        names.append(".".join(source.relative_to(_ROOT).with_suffix("").parts))
    return sorted(names)


def stale_modules() -> list[str]:
    """Compiled modules whose source changed since they were built (rebuild: pip install -e .)."""
    try:
        recorded: dict[str, str] = json.loads(_MANIFEST.read_text())
    except (OSError, ValueError):
        recorded = {}
    stale = []
    for source in _sources_with_extension():
        key = str(source.relative_to(_ROOT))
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        if recorded.get(key) != digest:
            stale.append(key)
    return sorted(stale)


def _sources_with_extension() -> list[Path]:
    found = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for ext in _PACKAGE.rglob(f"*{suffix}"):
            source = ext.with_name(ext.name[: -len(suffix)] + ".py")
            if source.exists():
                found.append(source)
    return found
