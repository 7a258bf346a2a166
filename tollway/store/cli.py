"""`tollway db …` and `tollway config …`: manage a config store from the command line, in the style of
decK: export the store to a file, diff a file against it, apply a file (idempotently).

The store is the one a gateway config file names (`-c tollway.yaml`, its `gateway.store`), or given
directly with `--store` (`sqlite:///path/to/tollway.db`, `postgresql://user@host/db`); with neither, the
SQLite store ./tollway.db that `tollway run` uses without a config file.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from tollway.errors import ConfigError, TollwayError
from tollway.plugins.registry import PLUGIN_CHECK

if TYPE_CHECKING:  # imported when a command runs: `tollway --help` stays fast
    from tollway.config.store_settings import StoreSettings

T = TypeVar("T")
_UNKNOWN_REFERENCE = re.compile(r": unknown (service|upstream|route|consumer) '")
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

db_app = typer.Typer(help="Create and upgrade the config store's schema.", no_args_is_help=True)
config_app = typer.Typer(
    help="Export, diff and apply declarative config against the store.", no_args_is_help=True
)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Gateway config file naming the store (gateway.store).")
]
StoreOption = Annotated[
    str | None,
    typer.Option("--store", help="The store itself: sqlite:///path/to/file.db or postgresql://user@host/db."),
]


def _settings(config: Path | None, store: str | None) -> tuple[StoreSettings, Path]:
    from tollway.config.store_settings import StoreSettings

    if store:
        if store.startswith("sqlite://"):
            # sqlite:///abs/path or sqlite://relative/path, as SQLAlchemy spells them
            return StoreSettings(backend="sqlite", path=store.removeprefix("sqlite://")), Path.cwd()
        if store.startswith(("postgres://", "postgresql://")):
            return StoreSettings(backend="postgres", dsn=store), Path.cwd()
        _fail(f"--store {store}: expected sqlite:///path or postgresql://…")
    if config is None:  # the store `tollway run` uses without a config file
        return StoreSettings(backend="sqlite"), Path.cwd()
    from tollway.config.loader import load_file

    try:
        settings = load_file(config).gateway.store
    except ConfigError as exc:
        _fail("\n  ".join([f"{exc.source}: the file is invalid:", *exc.issues]))
    if settings.backend == "file":
        _fail(f'{config}: gateway.store.backend is "file": there is no store (set sqlite or postgres)')
    return settings, config.resolve().parent


def _with_store(
    config: Path | None, store: str | None, fn: Callable[[Any], Awaitable[T]], *, migrate: bool = False
) -> T:
    from tollway.store.factory import make_store

    settings, base = _settings(config, store)
    backend = make_store(settings, base, listen=False)

    async def run() -> T:
        try:
            if migrate:
                return await fn(backend)
            await backend.open()
            return await fn(backend)
        finally:
            await backend.close()

    try:
        return asyncio.run(run())
    except TollwayError as exc:
        issues = getattr(exc, "issues", None)
        _fail(
            "\n  ".join(["the store refused the write; nothing was changed:", *issues])
            if issues
            else str(exc)
        )


def _fail(message: str) -> NoReturn:
    err.print(f"[red]{message}[/red]", markup=True)
    raise typer.Exit(1)


# -- tollway db -------------------------------------------------------------------------------------------
@db_app.command("migrate")
def migrate(config: ConfigOption = None, store: StoreOption = None) -> None:
    """Create the store's tables, or bring them to this version's schema. Refuses a newer schema."""
    from tollway.store.migrations import LATEST

    done = _with_store(config, store, lambda s: s.migrate(), migrate=True)
    if done:
        out.print(f"applied migration(s) {', '.join(map(str, done))}; schema is at {LATEST}")
    else:
        out.print(f"schema is up to date (version {LATEST})")


# -- tollway config ---------------------------------------------------------------------------------------
@config_app.command("export")
def export(
    config: ConfigOption = None,
    store: StoreOption = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """Print every entity in the store as a declarative YAML file (what `config apply` takes)."""

    async def read(s: Any) -> Any:
        return await s.load()

    import yaml

    rows = _with_store(config, store, read)
    doc = {kind: items for kind, items in rows.document().items() if items}
    text = f"# tollway config export: store version {rows.version}\n" + yaml.safe_dump(
        doc, sort_keys=False, allow_unicode=True
    )
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        out.print(f"wrote {rows.count()} entities (store version {rows.version}) to {output}")


def _read_document(path: Path, whole: bool) -> dict[str, Any]:
    """The file, checked on its own first, so its mistakes come with line numbers as `tollway check`
    gives them. Unless the file is the whole config (`--prune`), it may refer to entities only the store
    holds: those references are left to the store, which validates the config the write would leave."""
    from tollway.config.loader import load_file

    try:
        load_file(path, PLUGIN_CHECK)
    except ConfigError as exc:
        issues = exc.issues if whole else [i for i in exc.issues if not _UNKNOWN_REFERENCE.search(i)]
        if issues:
            _fail("\n  ".join([f"✗ {exc.source}: {len(issues)} error(s)", *issues]))
    import yaml

    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if doc.get("gateway"):
        err.print("note: the gateway section stays in each node's file; it is not written to the store")
    return dict(doc)


@config_app.command("diff")
def diff_cmd(
    file: Annotated[Path, typer.Argument(help="Declarative config file.", show_default=False)],
    config: ConfigOption = None,
    store: StoreOption = None,
    prune: Annotated[bool, typer.Option(help="Show what --prune would delete.")] = False,
) -> None:
    """What `config apply FILE` would change, entity by entity. Exit code 2 when something would."""
    from tollway.store.model import diff

    doc = _read_document(file, whole=prune)

    async def read(s: Any) -> Any:
        return await s.load()

    differences = diff(_with_store(config, store, read), doc, prune)
    changing = [d for d in differences if d.action != "keep"]
    for d in differences:
        out.print(_describe(d), markup=False)
    if not changing:
        out.print("no changes")
    raise typer.Exit(2 if changing else 0)


@config_app.command("apply")
def apply(
    file: Annotated[Path, typer.Argument(help="Declarative config file.", show_default=False)],
    config: ConfigOption = None,
    store: StoreOption = None,
    prune: Annotated[
        bool, typer.Option(help="Also delete what the store holds and the file does not.")
    ] = False,
    author: Annotated[str | None, typer.Option(help="Recorded in the store's change log.")] = None,
) -> None:
    """Make the store hold FILE's entities, in one transaction; applying the same file again changes
    nothing and bumps no version."""
    from tollway.store.model import ops_from_document, prune_ops

    doc = _read_document(file, whole=prune)

    async def write(s: Any) -> Any:
        ops = ops_from_document(doc)
        if prune:
            ops += prune_ops(await s.load(), doc)
        return await s.write(ops, author=author or "tollway config apply")

    result = _with_store(config, store, write)
    if not result.changes:
        out.print(f"no changes (store version {result.version})")
        return
    for change in result.changes:
        out.print(f"{_SIGN[change.action]} {change.kind[:-1]} {change.key!r}", markup=False)
    out.print(f"store version {result.version}: {len(result.changes)} change(s) applied")


_SIGN = {"create": "+", "update": "~", "delete": "-", "keep": "="}


def _describe(d: Any) -> str:
    line = f"{_SIGN[d.action]} {d.kind[:-1]} {d.key!r}"
    if d.fields:
        line += f" ({', '.join(d.fields)})"
    if d.action == "keep":
        line += " (in the store, not in the file; --prune deletes it)"
    return line


@config_app.command("nodes")
def nodes(config: ConfigOption = None, store: StoreOption = None) -> None:
    """The gateway nodes registered in the store: applied config version, source, last heartbeat."""
    import time

    async def read(s: Any) -> Any:
        return await s.version(), await s.nodes()

    version, found = _with_store(config, store, read)
    out.print(f"store version {version}; {len(found)} node(s)")
    now = time.time()
    for n in found:
        behind = "" if n.config_version >= version else f"  BEHIND by {version - n.config_version}"
        error = f"  error: {n.error}" if n.error else ""
        out.print(
            f"{n.node_id}  v{n.config_version} ({n.source})  tollway {n.software_version}  "
            f"seen {max(0.0, now - n.last_seen):.0f}s ago  {n.address}{behind}{error}",
            markup=False,
        )
