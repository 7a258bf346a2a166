"""Build script. Everything is in pyproject.toml except this: the hot-path modules are compiled to C
with mypyc, which makes per-request Python work about a third cheaper (bench/hotpath.py measures it).

The same modules run unmodified as pure Python; set TOLLWAY_PURE_PYTHON=1 when installing to skip
compiling (for example on a machine without a C compiler). After editing a compiled module in an
editable install, rebuild with `pip install -e .` (tollway warns at start-up when a build is stale).
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Modules on the per-request path. They are compiled together so calls between them are native.
HOT_MODULES = [
    "tollway/observability/access_log.py",
    "tollway/counters/metrics.py",
    "tollway/observability/recorder.py",
    "tollway/observability/tracecontext.py",
    "tollway/protocol/deadline.py",
    "tollway/protocol/http1.py",
    "tollway/protocol/request.py",
    "tollway/plugins/consumers.py",
    "tollway/proxy/exchange.py",
    "tollway/proxy/pdk.py",
    "tollway/proxy/pipeline.py",
    "tollway/proxy/responses.py",
    "tollway/proxy/server.py",
    "tollway/proxy/snapshot.py",
    "tollway/proxy/tries.py",
    "tollway/router/index.py",
    "tollway/router/matchers.py",
    "tollway/router/paths.py",
    "tollway/router/table.py",
    "tollway/upstream/balancers/base.py",
    "tollway/upstream/balancers/chash.py",
    "tollway/upstream/balancers/ewma_p2c.py",
    "tollway/upstream/balancers/least_conn.py",
    "tollway/upstream/balancers/round_robin.py",
    "tollway/upstream/balancers/weighted_random.py",
    "tollway/upstream/cluster.py",
    "tollway/upstream/connection.py",
    "tollway/upstream/outlier.py",
    "tollway/upstream/pool.py",
    "tollway/upstream/retry.py",
    "tollway/upstream/target.py",
    # node-shared rate-limit counters (tollway.state): one check per request with a limit
    "tollway/state/spec.py",
    "tollway/state/shared.py",
    "tollway/state/local.py",
    "tollway/state/policy_stats.py",
    "tollway/state/redis_health.py",
    "tollway/state/redis_policy.py",
    "tollway/state/batched.py",
    "tollway/state/limits.py",
    "tollway/state/headers.py",
]

# Robust process-shared mutexes for tollway.state.shared (0.04 us per lock+unlock; tollway.state.locks
# drives the same mutexes through ctypes when this is not built).
C_EXTENSIONS = [Extension("tollway.state._shmlock", ["tollway/state/_shmlock.c"])]


MANIFEST = Path("tollway/_compiled.json")  # source hashes, so tollway can tell a stale build


def ext_modules() -> list:
    if os.environ.get("TOLLWAY_PURE_PYTHON"):
        _remove_compiled()
        return []
    from mypyc.build import mypycify

    # A fresh type-check cache: one left by a developer's own mypy run (with every runtime dependency
    # installed) would type the build differently from a clean build environment.
    os.environ["MYPY_CACHE_DIR"] = tempfile.mkdtemp(prefix="tollway-mypyc-")
    MANIFEST.unlink(missing_ok=True)  # written again only once the build succeeds
    return mypycify(HOT_MODULES, opt_level="3", debug_level="0") + C_EXTENSIONS


class BuildAndRecord(build_ext):
    """Builds the extensions, then records the hash of each compiled source."""

    def run(self) -> None:
        super().run()
        if not self.extensions:
            return
        hashes = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in HOT_MODULES}
        text = json.dumps(hashes, indent=1, sort_keys=True) + "\n"
        MANIFEST.write_text(text)
        if not self.inplace:  # a wheel: the manifest travels with the compiled modules
            (Path(self.build_lib) / MANIFEST).write_text(text)


def _remove_compiled() -> None:
    """A pure-Python install must not leave old compiled modules shadowing the sources."""
    MANIFEST.unlink(missing_ok=True)
    for path in HOT_MODULES:
        for ext in Path(path).parent.glob(Path(path).stem + ".cpython-*.so"):
            ext.unlink()
    for ext in Path(".").glob("*__mypyc.cpython-*.so"):
        ext.unlink()
    for ext in Path("tollway/state").glob("_shmlock.cpython-*.so"):
        ext.unlink()


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildAndRecord})
