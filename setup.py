"""Build script. Everything is in pyproject.toml except this: the hot-path modules are compiled to C
with mypyc, which makes per-request Python work about a third cheaper (bench/hotpath.py measures it).

The same modules run unmodified as pure Python; set TOLLWAY_PURE_PYTHON=1 when installing to skip
compiling (for example on a machine without a C compiler). After editing a compiled module in an
editable install, rebuild with `pip install -e .` (tollway warns at start-up when a build is stale).
"""

import os

from setuptools import setup

# Modules on the per-request path. They are compiled together so calls between them are native.
HOT_MODULES = [
    "tollway/protocol/deadline.py",
    "tollway/protocol/http1.py",
    "tollway/protocol/server.py",
    "tollway/proxy/exchange.py",
    "tollway/proxy/pipeline.py",
    "tollway/proxy/responses.py",
    "tollway/proxy/snapshot.py",
    "tollway/router/index.py",
    "tollway/router/matchers.py",
    "tollway/router/paths.py",
    "tollway/router/table.py",
    "tollway/upstream/cluster.py",
    "tollway/upstream/connection.py",
    "tollway/upstream/pool.py",
]


def ext_modules() -> list:
    if os.environ.get("TOLLWAY_PURE_PYTHON"):
        return []
    from mypyc.build import mypycify

    return mypycify(HOT_MODULES, opt_level="3", debug_level="0")


setup(ext_modules=ext_modules())
