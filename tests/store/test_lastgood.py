"""The last-known-good file: written atomically, read back, refused clearly when damaged."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tollway.store import lastgood


def test_written_atomically_private_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "node" / "last-good.json"
    doc = {"services": [{"name": "s", "url": "http://127.0.0.1:9"}], "consumers": [{"username": "u"}]}
    lastgood.write(path, 7, doc)
    lastgood.write(path, 8, doc)  # replaces the file in one rename
    saved = lastgood.read(path)
    assert (saved.store_version, saved.document) == (8, doc)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # it holds credentials
    assert [p.name for p in path.parent.iterdir()] == ["last-good.json"]  # no temporary file left


def test_missing_or_damaged_files_say_why(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no last-known-good file"):
        lastgood.read(tmp_path / "none.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": 1, "entities": ')  # cut short
    with pytest.raises(ValueError, match="cannot read the last-known-good file"):
        lastgood.read(broken)
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="is not a last-known-good file"):
        lastgood.read(other)
