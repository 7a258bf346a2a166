"""Build script. Everything is in pyproject.toml except this: the hot-path modules are compiled to C
with mypyc, which makes per-request Python work about a third cheaper (docs/development.md has the
instruction counts).

How the build stays short (docs/development.md, "The compiled hot path"):
- one C file per module (mypyc `multi_file`), compiled in parallel on every core, largest first,
  with a progress line per file on the terminal (pip hides a build's own output);
- the compiled modules stay one shared library, so calls between them remain native;
- an editable install whose compiled modules already match the sources (same source hashes, same
  compiler settings) compiles nothing: the second `pip install -e` of the README is instant, and a
  fresh clone of the same sources reuses the build kept in ~/.cache/tollway/build/.

The same modules run unmodified as pure Python; set TOLLWAY_PURE_PYTHON=1 when installing to skip
compiling (for example on a machine without a C compiler); an sdist falls back to pure Python by
itself when compiling fails. After editing a compiled module in an editable install, rebuild with
`pip install -e .` (tollway warns at start-up when a build is stale).

Settings (environment): TOLLWAY_PURE_PYTHON=1; TOLLWAY_OPT_LEVEL (C optimisation, default 2);
TOLLWAY_BUILD_JOBS (parallel compilers, default: the number of cores); TOLLWAY_BUILD_CACHE (a
directory, or "off"; default ~/.cache/tollway/build).
"""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError

# Modules on the per-request path. They are compiled into one shared library so calls between them
# are native.
HOT_MODULES = [
    "tollway/observability/access_log.py",
    "tollway/counters/metrics.py",
    "tollway/observability/recorder.py",
    "tollway/observability/tracecontext.py",
    "tollway/protocol/deadline.py",
    "tollway/protocol/http1.py",
    "tollway/protocol/request.py",
    "tollway/plugins/consumers.py",
    "tollway/plugins/builtin/limit_check.py",  # the limit plugins' per-request half
    "tollway/plugins/builtin/key_lookup.py",  # key-auth's header lookup
    "tollway/proxy/exchange.py",
    "tollway/proxy/match_memo.py",
    "tollway/proxy/pdk.py",
    "tollway/proxy/pipeline.py",
    "tollway/proxy/request_body.py",
    "tollway/proxy/request_ids.py",
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
    # a response-cache hit (proxy-cache's fast path, its key, the node store it reads)
    "tollway/cache/keys.py",
    "tollway/cache/store.py",
    "tollway/plugins/builtin/cache_hit.py",
]

# Robust process-shared mutexes for tollway.state.shared (0.04 us per lock+unlock; tollway.state.locks
# drives the same mutexes through ctypes when this is not built).
C_EXTENSIONS = [Extension("tollway.state._shmlock", ["tollway/state/_shmlock.c"])]

# -O2 rather than mypyc's default -O3: a third less compile time for the same instruction count per
# request (docs/development.md, "The compiled hot path", has both figures).
OPT_LEVEL = os.environ.get("TOLLWAY_OPT_LEVEL", "2")
JOBS = max(1, int(os.environ.get("TOLLWAY_BUILD_JOBS") or os.cpu_count() or 1))
MANIFEST = Path("tollway/_compiled.json")  # source hashes, so tollway can tell a stale build
EDITABLE = any(arg in sys.argv for arg in ("editable_wheel", "develop", "--inplace", "-i"))
# pip runs this script several times per install (build requirements, metadata, then the build):
# only the build itself needs the extensions type-checked and generated.
BUILDING = EDITABLE or any(cmd in sys.argv for cmd in ("build_ext", "build", "bdist_wheel", "install"))


def ext_modules() -> list:
    if os.environ.get("TOLLWAY_PURE_PYTHON"):
        _remove_compiled()
        return []
    if not BUILDING:
        return C_EXTENSIONS  # metadata or an sdist: the generated C is not part of either
    key = build_key()
    if EDITABLE and (_in_tree_build_matches(key) or _restore_from_cache(key)):
        return []  # the compiled modules beside the sources are this very build
    try:
        import mypyc  # noqa: F401
    except ImportError:  # only when the build requirements were not installed (--no-build-isolation)
        if os.environ.get("TOLLWAY_REQUIRE_COMPILED"):
            raise
        _progress("mypy is not installed: installing pure Python (the hot path runs uncompiled)")
        return []
    MANIFEST.unlink(missing_ok=True)  # written again only once the build succeeds
    _progress(f"compiling the hot path with mypyc: {len(HOT_MODULES)} modules, type-checking first…")
    started = time.monotonic()
    extensions = _generate_c()
    _progress(f"type-checked and generated C in {time.monotonic() - started:.0f} s")
    return extensions + C_EXTENSIONS


def _generate_c() -> list:
    """mypycify in a child process: the type checker leaves hundreds of megabytes of objects whose
    teardown at interpreter exit cost 4 s of CPU (20 s on a busy machine) after the build was done;
    the child exits without it. Returns the Extensions mypycify made."""
    work = Path(tempfile.mkdtemp(prefix="tollway-mypyc-"))
    # A fresh type-check cache: one left by a developer's own mypy run (with every runtime dependency
    # installed) would type the build differently from a clean build environment.
    env = dict(os.environ, MYPY_CACHE_DIR=str(work / "cache"))
    code = (
        "import os, pickle, sys\n"
        "from mypyc.build import mypycify\n"
        f"ext = mypycify({HOT_MODULES!r}, opt_level={OPT_LEVEL!r}, debug_level='0', multi_file=True)\n"
        f"open({str(work / 'ext.pickle')!r}, 'wb').write(pickle.dumps(ext))\n"
        "sys.stdout.flush(); sys.stderr.flush(); os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    from mypyc.build import setup_mypycify_vars

    setup_mypycify_vars()  # what mypycify does to the compiler settings of the process that compiles
    extensions = pickle.loads((work / "ext.pickle").read_bytes())
    shutil.rmtree(work, ignore_errors=True)
    return extensions


def build_key() -> str:
    """What the compiled output depends on: every tollway source (mypyc reads the types of what the
    hot modules import), this script and pyproject.toml (mypy reads its settings there), the compiler
    settings, the mypy and Python versions."""
    digest = hashlib.sha256()
    for path in [*sorted(Path("tollway").rglob("*.py")), Path("setup.py"), Path("pyproject.toml")]:
        digest.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        from mypy.version import __version__ as mypy_version
    except ImportError:
        mypy_version = "none"
    settings = [OPT_LEVEL, mypy_version, sys.version, sysconfig.get_config_var("EXT_SUFFIX") or ""]
    digest.update("\0".join(settings).encode())
    return digest.hexdigest()[:24]


class BuildAndRecord(build_ext):
    """Compiles the C files of each extension in parallel, then records the hash of each compiled
    source (and, for editable installs, keeps a copy of the build in the cache)."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.parallel:  # the small per-module extensions (one C file each) side by side too
            self.parallel = JOBS

    def build_extensions(self) -> None:
        self.compiler.compile = _parallel_compile(self.compiler.compile)
        started = time.monotonic()
        super().build_extensions()
        if self.extensions:
            _progress(f"compiled the hot path in {time.monotonic() - started:.0f} s")

    def run(self) -> None:
        try:
            super().run()
        except (CCompilerError, BaseError, OSError) as exc:
            if os.environ.get("TOLLWAY_REQUIRE_COMPILED"):
                raise
            # An sdist on a machine without a working C compiler still installs: pure Python.
            _progress(f"compiling failed ({exc}); installing pure Python (the hot path runs uncompiled)")
            _remove_compiled()
            self.extensions = []
            return
        if not self.extensions:
            return
        hashes = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in HOT_MODULES}
        files = sorted(self.get_ext_filename(ext.name) for ext in self.extensions)
        manifest = {**hashes, "_build": {"key": build_key(), "files": files}}
        text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        MANIFEST.write_text(text)
        if self.inplace or getattr(self, "editable_mode", False):
            _save_to_cache(build_key(), [*files, str(MANIFEST)])
        else:  # a wheel: the manifest travels with the compiled modules
            (Path(self.build_lib) / MANIFEST).write_text(text)


def _parallel_compile(compile_one_batch):
    """distutils compiles an extension's C files one after another; mypyc's multi_file output is one
    file per module, so compiling them side by side uses every core. Largest first, so the long ones
    do not start last."""

    def compile_all(sources, *args, **kwargs):
        if len(sources) < 2 or JOBS < 2:
            return compile_one_batch(sources, *args, **kwargs)
        order = sorted(sources, key=lambda s: -os.path.getsize(s) if os.path.exists(s) else 0)
        done = [0]

        def one(source):
            objects = compile_one_batch([source], *args, **kwargs)
            done[0] += 1
            _progress(f"  [{done[0]}/{len(sources)}] {Path(source).name}", transient=True)
            return source, objects

        with ThreadPoolExecutor(JOBS) as pool:
            by_source = dict(pool.map(one, order))
        return [obj for source in sources for obj in by_source[source]]

    return compile_all


# -- reusing a build -------------------------------------------------------------------------------
def _cache_dir(key: str) -> Path | None:
    setting = os.environ.get("TOLLWAY_BUILD_CACHE", "")
    if setting == "off":
        return None
    base = Path(setting) if setting else Path.home() / ".cache" / "tollway" / "build"
    return base / key


def _in_tree_build_matches(key: str) -> bool:
    try:
        recorded = json.loads(MANIFEST.read_text()).get("_build", {})
    except (OSError, ValueError):
        return False
    files = recorded.get("files", [])
    if recorded.get("key") != key or not files or not all(Path(f).exists() for f in files):
        return False
    _progress(f"the compiled hot path matches the sources (build {key}): nothing to compile")
    return True


def _restore_from_cache(key: str) -> bool:
    cached = _cache_dir(key)
    if cached is None or not (cached / MANIFEST).exists():
        return False
    for path in cached.rglob("*"):
        if path.is_file():
            target = path.relative_to(cached)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    _progress(f"reused the compiled hot path from {cached}: nothing to compile")
    return True


def _save_to_cache(key: str, files: list[str]) -> None:
    cached = _cache_dir(key)
    if cached is None:
        return
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cached.parent))
    except OSError:
        return  # no writable cache: the build simply is not kept
    try:
        for name in files:
            (partial / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(name, partial / name)
        partial.rename(cached)  # complete or absent, never half-written
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)


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


def _progress(message: str, transient: bool = False) -> None:
    """pip captures a build's output and shows it only with -v, so long steps also go straight to
    the terminal when there is one (TOLLWAY_BUILD_QUIET=1: never). A transient line (one per compiled
    file) is overwritten by the next one there."""
    line = f"tollway build: {message}"
    sys.stderr.write(line + "\n")
    if os.environ.get("TOLLWAY_BUILD_QUIET") or sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(f"\r\033[K{line}" + ("" if transient else "\n"))
    except OSError:
        pass


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildAndRecord})
