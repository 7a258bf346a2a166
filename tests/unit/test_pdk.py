"""The plugin development kit (tollway.proxy.pdk) and the layers of the request path: what the plugin
guide documents exists on the type plugins receive, and the protocol and proxy packages import nothing
from the layers above them."""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path

import pytest

from tollway.config.loader import load_text
from tollway.observability.tracecontext import TraceSettings
from tollway.protocol.request import RequestHead
from tollway.proxy.exchange import Exchange
from tollway.proxy.pdk import RequestContext
from tollway.proxy.server import ClientConnection
from tollway.proxy.snapshot import build_snapshot
from tollway.proxy.tries import UpstreamTries
from tollway.upstream.pool import Pool, PoolSettings

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "plugins" / "writing-plugins.md"


def documented_names() -> set[str]:
    """`ex.<name>` in the first column of the guide's tables of the request context."""
    section = GUIDE.read_text().split("## The request context", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `ex."):
            names.update(re.findall(r"`ex\.([a-z_]+)", line.split("|")[1]))
    return names


def test_every_field_and_method_the_guide_documents_is_on_the_context(client: ClientConnection) -> None:
    names = documented_names()
    assert {"method", "headers", "set_header", "consumer", "status", "bytes_sent", "upstream_time"} <= names
    ex = Exchange(client, client.worker.snapshot)
    assert isinstance(ex, RequestContext)
    for name in sorted(names):
        assert hasattr(ex, name), f"the plugin guide documents ex.{name}, which the context lacks"
        # ... on the documented type itself, not only on the exchange that subclasses it
        declared = any(name in vars(cls) for cls in (RequestContext, RequestHead)) or name in _slots()
        assert declared, f"ex.{name} is documented but only the Exchange has it"


def _slots() -> set[str]:
    """The attributes RequestContext and RequestHead declare (compiled classes keep no __slots__ at
    run time, so read them from the source)."""
    found: set[str] = set()
    for module in ("proxy/pdk.py", "protocol/request.py"):
        for node in ast.walk(ast.parse((ROOT / "tollway" / module).read_text())):
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "__slots__":
                found.update(ast.literal_eval(node.value))
    return found


def test_the_exchange_is_split_into_small_parts_without_a_second_object(client: ClientConnection) -> None:
    ex = Exchange(client, client.worker.snapshot)
    assert isinstance(ex, UpstreamTries) and isinstance(ex, RequestContext) and isinstance(ex, RequestHead)
    tree = ast.parse((ROOT / "tollway" / "proxy" / "exchange.py").read_text())
    (exchange,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Exchange"]
    (slots,) = [
        ast.literal_eval(n.value)
        for n in exchange.body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "__slots__"
    ]
    assert len(slots) < 30


def _runtime_imports(path: Path) -> set[str]:
    """Modules imported outside `if TYPE_CHECKING:` blocks (those are for annotations only)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.module:
                found.add(child.module)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("protocol", ("tollway.proxy", "tollway.plugins", "tollway.observability", "tollway.router")),
        ("proxy", ("tollway.plugins", "tollway.observability", "tollway.runtime")),
    ],
)
def test_the_request_path_imports_nothing_from_the_layers_above(
    package: str, forbidden: tuple[str, ...]
) -> None:
    for path in sorted((ROOT / "tollway" / package).glob("*.py")):
        upward = {m for m in _runtime_imports(path) if m.startswith(forbidden)}
        assert not upward, f"{path.relative_to(ROOT)} imports {sorted(upward)}"


def test_build_snapshot_refuses_a_config_with_plugins_and_no_pipeline_builder() -> None:
    loop = asyncio.new_event_loop()
    try:
        config = load_text(
            "services: [{name: s, url: 'http://127.0.0.1:9'}]\n"
            "routes: [{name: r, service: s, paths: [/], plugins: [{name: correlation-id}]}]"
        )

        def pool_for(host, port, tls, sni, settings=None, owner=None):  # type: ignore[no-untyped-def]
            return Pool(loop, host, port, settings or PoolSettings())

        trace = TraceSettings.from_config(config.gateway.tracing)
        with pytest.raises(ValueError, match="attach_pipelines"):
            build_snapshot(config, 1, pool_for, trace=trace)
        calls: list[list[str]] = []
        snapshot = build_snapshot(
            config,
            1,
            pool_for,
            trace=trace,
            attach_pipelines=lambda c, routes: calls.append([r.name for r in routes]),
        )
        assert calls == [["r"]] and snapshot.trace is trace
    finally:
        loop.close()
