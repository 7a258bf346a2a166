"""What `python -m build` makes, installed as a user would install it, into a clean virtual environment
(no PYTHONPATH, outside the repository): the sdist on a machine whose C compiler fails still installs,
as pure Python; the wheel carries the compiled hot path and runs the demo.

Slow (it compiles the hot path once and installs every dependency): a few minutes on two cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

SOURCES = ("pyproject.toml", "setup.py", "README.md", "tollway")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "TOLLWAY"))}
    return {**env, "TOLLWAY_BUILD_CACHE": "off", "NO_COLOR": "1", "COLUMNS": "200", **extra}


def _run(cmd: list[str], cwd: Path, timeout: float, **extra: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        cmd, cwd=cwd, env=_clean_env(**extra), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist and wheel built from a copy of the sources (nothing compiled in the working tree leaks in)."""
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("*.so", "__pycache__", "_compiled.json")
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    _run([sys.executable, "-m", "build", "--outdir", str(work / "dist"), str(source)], work, 1500)
    return work / "dist"


def test_the_sdist_has_sources_only_and_the_wheel_the_compiled_hot_path(dist: Path) -> None:
    (sdist,) = dist.glob("tollway-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    assert any(n.endswith("/setup.py") for n in names) and any(n.endswith("_shmlock.c") for n in names)
    assert not [n for n in names if n.endswith(".so") or "__native" in n]
    (wheel,) = dist.glob("tollway-*.whl")
    assert "-linux_" in wheel.name or "manylinux" in wheel.name  # a platform wheel, not py3-none-any
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert any(n.startswith("tollway/proxy/exchange.cpython-") and n.endswith(".so") for n in names)
    assert any("__mypyc" in n and "/" not in n for n in names)  # the shared library, top level
    assert "tollway/_compiled.json" in names and "tollway/proxy/exchange.py" in names


def test_sdist_falls_back_to_pure_python_then_the_wheel_runs_the_demo(dist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, 120)
    python, tollway = str(venv / "bin" / "python"), str(venv / "bin" / "tollway")
    where = "import tollway.proxy.exchange as m; print(m.__file__)"

    # A machine whose C compiler does not work: the sdist still installs, as pure Python.
    (sdist,) = dist.glob("tollway-*.tar.gz")
    _run([python, "-m", "pip", "install", str(sdist)], tmp_path, 900, CC="false")
    assert _run([python, "-c", where], tmp_path, 60).stdout.strip().endswith("exchange.py")
    _run([tollway, "check", str(ROOT / "examples" / "users.yaml")], tmp_path, 60)

    (wheel,) = dist.glob("tollway-*.whl")
    _run([python, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)], tmp_path, 300)
    assert ".cpython-" in _run([python, "-c", where], tmp_path, 60).stdout  # the compiled module
    demo = _run([tollway, "demo", "--port", "0", "--exit", "--requests", "9"], tmp_path, 180)
    assert "Round-robin spread over both instances" in demo.stdout, demo.stdout
    assert "2 × 429" in demo.stdout, demo.stdout
